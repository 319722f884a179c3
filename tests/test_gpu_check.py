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
# benchmarks do.
STAND_IN = """
import json, os, sys
tool, argv = os.path.basename(sys.argv[1]), sys.argv[2:]
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps({"tool": tool, "argv": argv,
                          "triton_cache_autotuning": os.environ.get("TRITON_CACHE_AUTOTUNING")}) + "\\n")
if os.environ.get("STAND_IN_FAILS") and os.environ["STAND_IN_FAILS"] in argv:
    sys.exit(1)
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
