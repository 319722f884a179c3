"""scripts/gpu_check.sh's own plumbing, run here with stand-ins for the GPU machine's tools (nvidia-smi, nvcc,
ncu, compute-sanitizer) and for its python, which record how they were called: every step of each part runs
and has its row in the summary, every benchmark command parses with the real argument parser, the results of
a part fit in the 8 files the device tool returns, and a budget too short skips steps instead of running
past the call. A GPU session has 15 device-minutes: a typo in this script would cost one of them."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# Each stand-in logs {"tool", "argv", "triton_cache_autotuning"} as a JSON line and exits 0 (1 where its
# arguments hold $STAND_IN_FAILS); "python" also writes the files named by --json / --markdown, as the
# benchmarks do, and a pytest run prints $STAND_IN_PRINTS.
STAND_IN = """
import json, os, sys
tool, argv = os.path.basename(sys.argv[1]), sys.argv[2:]
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps({"tool": tool, "argv": argv,
                          "triton_cache_autotuning": os.environ.get("TRITON_CACHE_AUTOTUNING")}) + "\\n")
if os.environ.get("STAND_IN_FAILS") and os.environ["STAND_IN_FAILS"] in argv:
    sys.exit(1)
if os.environ.get("STAND_IN_PRINTS") and "pytest" in argv:
    print(os.environ["STAND_IN_PRINTS"])
if tool == "python3":
    for flag in ("--json", "--markdown"):
        if flag in argv:
            with open(argv[argv.index(flag) + 1], "w") as out:
                out.write("{}")
"""
TOOLS = ("nvidia-smi", "nvcc", "ncu", "compute-sanitizer", "python3")


@pytest.fixture
def gpu_machine(tmp_path):
    """(environment, log path, results folder): PATH and AMAPO_PYTHON lead to the stand-ins."""
    bin_dir, results = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    results.mkdir()
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "stand_in.py"}" "$0" "$@"\n')
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "AMAPO_PYTHON": str(bin_dir / "python3"),
           "STAND_IN_LOG": str(log), "OUT": str(results)}
    return env, log, results


def run_part(part, env, budget=570):
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), part], env={**env, "BUDGET": str(budget)},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def calls(log):
    """The stand-ins' calls, in order (none at all where nothing ran: no log)."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def summary_rows(results, part):
    lines = (results / f"summary_{part}.md").read_text().splitlines()
    return [line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and not line.startswith("| step")]


def python_commands(log):
    """The argument lists of every python run, including those that ncu and compute-sanitizer wrap."""
    commands = []
    for call in calls(log):
        argv = call["argv"]
        if call["tool"] == "python3":
            commands.append(argv)
        elif any(arg.endswith("/python3") for arg in argv):
            commands.append(argv[next(i for i, arg in enumerate(argv) if arg.endswith("/python3")) + 1:])
    return commands


def kernel_names():
    """The names of the CUDA kernels (csrc) and of the Triton kernels, as ncu sees them."""
    cuda_source = "".join(path.read_text() for path in (ROOT / "csrc").glob("*.cuh"))
    triton_source = (ROOT / "amapo_kernels" / "triton_fused_linear.py").read_text()
    cuda = re.findall(r"__global__[^{;]*?(\w+_kernel)\(", cuda_source)
    triton = re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", triton_source)
    return set(cuda) | set(triton)


def assert_parses_up_to_the_device(script, args, capsys):
    """The real parser takes every argument; here, without a GPU, it stops at --device cuda (the last check of
    each before any tensor is made), which proves that every flag before it parsed."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        (module.parse_args if script == "bench_train" else module.main)(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--device cuda: no CUDA device is available" in err, (script, args, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the parsers stop at --device cuda without a GPU")
@pytest.mark.parametrize("part", ["part1", "part2", "part3"])
def test_every_step_runs_and_its_commands_parse(part, gpu_machine, capsys):
    env, log, results = gpu_machine
    done = run_part(part, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = summary_rows(results, part)
    assert rows and all(status == "ok" for _, status, _, _ in rows), rows
    commands = python_commands(log)
    scripts = [Path(argv[0]).stem for argv in commands if argv and argv[0].startswith("benchmarks/")]
    for argv in commands:
        if argv and argv[0].startswith("benchmarks/"):
            assert_parses_up_to_the_device(Path(argv[0]).stem, argv[1:], capsys)
        elif argv[:2] == ["-m", "pytest"]:
            paths = [arg for arg in argv if arg.startswith("tests")]
            assert paths and all((ROOT / path).exists() for path in paths), argv
        elif argv and argv[0].startswith("tools/"):
            assert (ROOT / argv[0]).exists(), argv
    files = [path for path in results.iterdir() if path.is_file()]
    assert len(files) <= 8, sorted(path.name for path in files)  # what the device tool returns
    if part == "part1":
        tools = [call["argv"][1] for call in calls(log) if call["tool"] == "compute-sanitizer"]
        assert tools == ["memcheck", "racecheck", "synccheck", "initcheck"]
        # the open-ended suite comes last: a short BUDGET cuts it, not the sanitizers
        assert rows[-1][0] == "pytest -m cuda (all files)", rows
    if part == "part2":
        assert {"bench_from_logits", "bench_fused_linear", "profile_step"} <= set(scripts)
        # each ncu filter names kernels that exist: the from-logits forward and backward, the two Triton matmuls
        filters = [call["argv"][call["argv"].index("-k") + 1] for call in calls(log) if call["tool"] == "ncu"]
        profiled = [{name for name in kernel_names() if re.search(f.removeprefix("regex:"), name)} for f in filters]
        assert profiled == [{"forward_rows_kernel", "backward_rows_kernel"}, {"_stats_kernel", "_grad_logits_kernel"}]
        # the tiles the benchmark's autotuning chose are read back by the later processes
        assert {call["triton_cache_autotuning"] for call in calls(log) if call["tool"] != "nvidia-smi"} == {"1"}
        with tarfile.open(results / "logs.tar.gz") as packed:
            assert {"bench.log", "ncu.log", "ncu_triton.log", "profile.log"} <= set(packed.getnames())
    if part == "part3":
        assert scripts == ["bench_train"]


def test_a_budget_too_short_skips_steps_and_fails(gpu_machine):
    """BUDGET below what a step needs: the steps are tabled as skipped, none runs, and the exit status is 1."""
    env, log, results = gpu_machine
    done = run_part("part2", env, budget=40)
    assert done.returncode == 1
    rows = summary_rows(results, "part2")
    assert rows and all(status.startswith("SKIPPED (out of time") for _, status, _, _ in rows), rows
    assert not [argv for argv in python_commands(log) if argv and argv[0].startswith("benchmarks/")]


def test_a_failed_wheel_install_is_a_failed_step(gpu_machine, tmp_path):
    """The carried peer wheels ($WHEELS) are installed as a step of their own: a failed pip install is a FAILED
    row and exit status 1 (it once only showed as "not installed" in the peers' benchmark rows)."""
    env, log, results = gpu_machine
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "peer-1.0-py3-none-any.whl").write_text("")
    done = run_part("part3", {**env, "WHEELS": str(wheels), "STAND_IN_FAILS": "pip"})
    assert done.returncode == 1
    rows = {name: status for name, status, _, _ in summary_rows(results, "part3")}
    assert rows["peer wheels"].startswith("FAILED"), rows
    done = run_part("part3", {**env, "WHEELS": str(wheels)})
    assert done.returncode == 0
    assert {name: status for name, status, _, _ in summary_rows(results, "part3")}["peer wheels"] == "ok"


def step_limits(stdout):
    """{step name: its time limit} from gpu_check.sh's "== NAME (limit N s)" lines."""
    return {name: int(limit) for name, limit in re.findall(r"^== (.+) \(limit (\d+) s\)$", stdout, re.M)}


def test_each_step_limit_is_cut_to_what_the_budget_leaves(gpu_machine):
    """BUDGET=200: a step may run at most BUDGET - RESERVE (15 s) less the time spent, its own limit if smaller."""
    env, log, results = gpu_machine
    done = run_part("part2", env, budget=200)
    limits = step_limits(done.stdout)
    assert limits["bench_from_logits (paper size)"] == 180, limits  # its own, below what is left
    assert 175 <= limits["bench_fused_linear"] <= 185, limits  # 240, cut to what is left
    assert all(limit <= 185 for limit in limits.values()), limits


def test_bench_train_gets_a_budget_that_ends_before_its_step_limit(gpu_machine):
    """part3's bench_train writes its rows before gpu_check.sh's own limit on the step kills it."""
    env, log, results = gpu_machine
    done = run_part("part3", env)
    (argv,) = [argv for argv in python_commands(log) if argv and argv[0] == "benchmarks/bench_train.py"]
    budget = float(argv[argv.index("--budget") + 1])
    assert 0 < budget < step_limits(done.stdout)["bench_train (llama3-1b, ZeRO-3)"], (budget, done.stdout)


def test_sanitizers_fail_on_errors_and_only_initcheck_sees_every_kernel(gpu_machine):
    env, log, results = gpu_machine
    run_part("part1", env)
    sanitizer_calls = {call["argv"][1]: call["argv"] for call in calls(log) if call["tool"] == "compute-sanitizer"}
    for tool, argv in sanitizer_calls.items():
        assert argv[argv.index("--error-exitcode") + 1] == "9", argv
        assert ("--kernel-name" in argv) == (tool != "initcheck"), argv


def test_a_failed_environment_probe_fails_part1(gpu_machine):
    """nvidia-smi failing (no driver; likewise torch or triton not importable): the environment row said "ok",
    whatever the probes printed, and part1 exited 0."""
    env, log, results = gpu_machine
    done = run_part("part1", {**env, "STAND_IN_FAILS": "--format=csv,noheader"})  # nvidia-smi's query alone
    assert done.returncode == 1
    assert {name: status for name, status, _, _ in summary_rows(results, "part1")}["environment"].startswith("FAILED")


def test_a_skipped_cuda_test_fails_part1(gpu_machine):
    """On the GPU machine a CUDA test skipped is a failure of the check, with a row of its own."""
    env, log, results = gpu_machine
    done = run_part("part1", {**env, "STAND_IN_PRINTS": "SKIPPED [1] tests/test_ops.py:12: CUDA not available"})
    assert done.returncode == 1
    assert {name: status for name, status, _, _ in summary_rows(results, "part1")}["no CUDA test skipped"] == "FAILED"


@pytest.mark.skipif(not list((ROOT / "amapo_kernels").glob("_C*.so")), reason="the extension is not built here")
def test_part2_does_not_rebuild_a_built_extension(gpu_machine):
    env, log, results = gpu_machine
    run_part("part2", env)
    assert not [name for name, *_ in summary_rows(results, "part2") if name.startswith("build")]


@pytest.mark.parametrize("extra, packed", [(0, False), (1, True)])
def test_logs_are_packed_past_eight_files(gpu_machine, tmp_path, extra, packed):
    """The device tool returns 8 files: a folder of exactly 8 is left as it is, one of 9 is packed."""
    env, log, results = gpu_machine
    first = tmp_path / "first"
    first.mkdir()
    run_part("part1", {**env, "OUT": str(first)})
    made = len([path for path in first.iterdir() if path.is_file()])
    assert made <= 8 and not (first / "logs.tar.gz").exists()
    for index in range(8 - made + extra):  # files already there, as a part run earlier in the same call leaves
        (results / f"earlier_{index}.log").write_text("")
    run_part("part1", env)
    files = [path for path in results.iterdir() if path.is_file()]
    assert (results / "logs.tar.gz").exists() == packed and len(files) <= 8, sorted(path.name for path in files)


def test_all_is_refused_under_the_device_tool(gpu_machine):
    """`all` leaves part1's and part2's results together, more files than the device tool's $OUT returns (10 with
    the stand-ins, where it takes 8): refused there in one line, exit status 2, before any step runs."""
    env, log, results = gpu_machine
    done = run_part("all", env)
    assert done.returncode == 2 and "run part1 and part2 as two calls" in done.stderr
    assert not calls(log) and not list(results.iterdir())


def test_sanitize_case_passes_on_the_cpu_and_fails_on_a_wrong_gradient(monkeypatch, capsys):
    """tools/gpu_sanitize_case.py (run by part1 under each sanitizer) exits non-zero when a case disagrees with
    the reference, here its gradient alone (50% off)."""
    import runpy

    import amapo_kernels

    script = str(ROOT / "tools" / "gpu_sanitize_case.py")
    monkeypatch.setattr(sys, "argv", [script, "cpu"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code == 0 and "BAD" not in capsys.readouterr().out
    exact = amapo_kernels.sequence_logps
    monkeypatch.setattr(amapo_kernels, "sequence_logps", lambda *args, **kwargs: (
        lambda out: out + 0.5 * (out - out.detach()))(exact(*args, **kwargs)))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code == 1 and "BAD" in capsys.readouterr().out


@pytest.mark.parametrize("wheels, clash", [(["pydantic_core-2.50.5-cp312-cp312-any.whl", "trl-1.16.0-py3-none-any.whl"],
                                            False),
                                           (["PyYAML-6.0-py3-none-any.whl", "pyyaml-6.1-py3-none-any.whl"], True)])
def test_fetch_peer_wheels_refuses_two_versions_of_a_project(tmp_path, wheels, clash):
    """pip cannot install two versions of one project: fetch_peer_wheels.sh stops on them, names compared as
    pip does (case and -_. alike). A stand-in python skips the downloads (no network here)."""
    dest, python = tmp_path / "wheels", tmp_path / "python"
    dest.mkdir()
    for name in wheels:
        (dest / name).write_text("")
    python.write_text(f'#!/bin/sh\n[ "$1" = "-m" ] && exit 0\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_peer_wheels.sh"), str(dest)],
                          env={**os.environ, "PYTHON": str(python)}, capture_output=True, text=True, timeout=60)
    assert (done.returncode != 0) == clash, done.stdout + done.stderr
    assert ("several versions of" in done.stderr) == clash, done.stderr
