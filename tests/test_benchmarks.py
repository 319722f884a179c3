"""Both benchmark scripts run end to end at a tiny size on the CPU, every peer included: a row with numbers, or
a note saying why the peer cannot run here. (A GPU session has minutes of device time: a benchmark that dies
of a Python error there costs a call.) No timing is asserted."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from amapo_kernels import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_common  # noqa: E402
import bench_from_logits  # noqa: E402
from bench_common import AGREEMENT_LIMIT  # noqa: E402
import bench_fused_linear  # noqa: E402
import profile_step  # noqa: E402


def test_from_logits_every_peer_has_a_row(tmp_path):
    out = tmp_path / "rows.json"
    rows = bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32,bf16", "--repeats", "1", "--json", str(out),
                                   "--markdown", str(tmp_path / "rows.md")])
    assert [row["peer"] for row in rows] == bench_from_logits.PEERS * 2
    by_peer = {row["peer"]: row for row in rows if row["dtype"] == "fp32"}
    for name in ("ours", "ours_inplace", "eager", "compile"):
        assert by_peer[name]["ms"] > 0, by_peer[name]
    measured = [row for row in rows if "ms" in row]
    assert {row["peer"] for row in measured} == {"ours", "ours_inplace", "eager", "compile", "trl"}
    assert all(max(row["loss_error"], row["grad_error"]) <= AGREEMENT_LIMIT and "note" not in row
               for row in measured), measured
    assert "CUDA" in by_peer["ours_unchecked"]["note"] and "CUDA" in by_peer["liger"]["note"]
    assert by_peer["ours"]["time_vs_ours"] == pytest.approx(1.0)
    assert len(json.loads(out.read_text())["rows"]) == len(rows)
    assert json.loads(out.read_text())["meta"]["complete"] is True
    assert "| 2x8x64 | fp32 | ours |" in (tmp_path / "rows.md").read_text()
    assert "| err vs ref | note |" in (tmp_path / "rows.md").read_text()
    assert "Partial" not in (tmp_path / "rows.md").read_text()
    assert "| largest MiB |" in (tmp_path / "rows.md").read_text()  # the CPU measure, not CUDA's "extra"
    assert "extra MiB" not in (tmp_path / "rows.md").read_text()


def unshifted_loss(logits, labels):
    """A peer wired wrongly: logits[:, t] scored against labels[:, t] (the causal shift forgotten)."""
    return bench_from_logits.pair_loss(reference.sequence_logps(logits.float(), labels, shift=False))


def test_from_logits_marks_a_peer_that_disagrees_with_the_reference(tmp_path, monkeypatch):
    """A timing of a peer that computes something else is worth nothing: its row says so."""
    peers = bench_from_logits.peer_fns
    monkeypatch.setattr(bench_from_logits, "peer_fns", lambda device: {**peers(device), "trl": unshifted_loss})
    rows = bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32", "--peers", "ours,trl", "--repeats", "1",
                                   "--markdown", str(tmp_path / "rows.md")])
    ours, wrong = rows
    assert "note" not in ours and ours["grad_error"] < 1e-5, ours
    assert wrong["grad_error"] > 0.5 and wrong["note"].startswith("DISAGREES with the reference"), wrong
    assert "| trl |" in (tmp_path / "rows.md").read_text() and "DISAGREES" in (tmp_path / "rows.md").read_text()


def stop_after_first(function):
    """function, then a stop (as a time limit's) at its second call."""
    calls = []

    def first_then_stop(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return function(*args, **kwargs)

    return first_then_stop


def assert_partial(out, md, key, rows):
    saved = json.loads(out.read_text())
    assert saved["meta"]["complete"] is False
    assert saved[key] == rows
    assert md.read_text().endswith("Partial: the run stopped before its last row.\n")


def test_from_logits_stopped_midway_keeps_its_rows(tmp_path, monkeypatch):
    """gpu_check.sh gives each benchmark a time limit: the (size, dtype) groups measured before it hits it stay
    in the results files, marked partial."""
    first_group = bench_from_logits.bench_size("2x8x64", "fp32", "cpu", ["ours", "eager"], 1, None)
    monkeypatch.setattr(bench_from_logits, "bench_size", stop_after_first(lambda *args: first_group))
    out, md = tmp_path / "rows.json", tmp_path / "rows.md"
    with pytest.raises(KeyboardInterrupt):
        bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32,bf16", "--peers", "ours,eager", "--repeats",
                                "1", "--json", str(out), "--markdown", str(md)])
    assert_partial(out, md, "rows", first_group)
    assert "| 2x8x64 | fp32 | eager |" in md.read_text() and "bf16" not in md.read_text()


def test_fused_linear_stopped_midway_keeps_its_rows(tmp_path, monkeypatch):
    """The same for the from-hidden benchmark, row by row."""
    monkeypatch.setattr(bench_fused_linear, "time_ms", stop_after_first(lambda *args, **kwargs: 1.0))
    out, md = tmp_path / "rows.json", tmp_path / "rows.md"
    with pytest.raises(KeyboardInterrupt):
        bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--json", str(out), "--markdown", str(md)])
    first = bench_fused_linear.DEFAULT_METHODS["cpu"].split(",")[0]
    rows = json.loads(out.read_text())["results"]
    assert [(row["method"], row["ms"]) for row in rows] == [(first, 1.0)]
    assert_partial(out, md, "results", rows)


ALLOCATION_FAILURES = [  # (what the allocator raised, the size the note names)
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 4303557230592 bytes. Error code 12 (Cannot allocate memory)"), "4008.0 GiB"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB. GPU 0 has a total capacity of 79.19 "
                            "GiB of which 12.00 GiB is free."), "64.00 GiB"),
]


def inputs_too_large_for(big, failure, make_inputs):
    """make_inputs, raising `failure` for the size whose first dimension is `big` (as its allocator would)."""

    def make(*args, **kwargs):
        if args[0] == big:
            raise failure
        return make_inputs(*args, **kwargs)

    return make


@pytest.mark.parametrize("failure, amount", ALLOCATION_FAILURES, ids=["cpu", "cuda"])
def test_a_size_whose_inputs_do_not_fit_gets_a_row_saying_so(tmp_path, monkeypatch, failure, amount):
    """A size too large for the device was a traceback from inside the inputs' maker, the sizes after it lost:
    now a row of the size says how much was asked, and the other sizes run."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    note = f"the inputs do not fit in this device's memory ({amount} asked at once)"
    monkeypatch.setattr(bench_from_logits, "make_inputs",
                        inputs_too_large_for(64, failure, bench_from_logits.make_inputs))
    md = tmp_path / "logits.md"
    rows = bench_from_logits.main(["--sizes", "64x8x64,2x8x64", "--dtypes", "fp32", "--peers", "ours", "--repeats", "1",
                                   "--markdown", str(md)])
    assert [(row["size"], row["peer"], row.get("note")) for row in rows] == [
        ("64x8x64", "every peer", note), ("2x8x64", "ours", None)], rows
    assert f"| 64x8x64 | fp32 | every peer | - | - | - | - | - | {note} |" in md.read_text()
    monkeypatch.setattr(bench_fused_linear, "make_inputs",
                        inputs_too_large_for(64, failure, bench_fused_linear.make_inputs))
    out = tmp_path / "hidden.json"
    bench_fused_linear.main(["--sizes", "64x8x16x64,2x8x16x64", "--repeats", "1", "--warmup", "1", "--methods",
                             "fused", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(row["batch"], row["method"], row["ms"] is None, row["note"]) for row in rows] == [
        (64, "every method", True, note), (2, "fused", False, None)], rows


@pytest.mark.parametrize("failure, amount", ALLOCATION_FAILURES, ids=["cpu", "cuda"])
def test_profile_step_of_inputs_that_do_not_fit_is_one_line_and_status_2(monkeypatch, capsys, failure, amount):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_from_logits, "make_inputs", inputs_too_large_for(64, failure, None))
    with pytest.raises(SystemExit) as stop:
        profile_step.main(["--size", "64x8x64"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert lines[0].endswith(f": error: --size 64x8x64: the inputs do not fit in this device's memory ({amount} "
                             "asked at once)"), lines


def test_results_paths_in_the_home_are_written_where_they_were_checked(tmp_path, monkeypatch):
    """A quoted `--json '~/r.json'` was checked as $HOME/r.json and written to ./~/r.json."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32", "--peers", "ours", "--repeats", "1",
                            "--json", "~/r.json", "--markdown", "~/r.md"])
    assert (home / "r.json").is_file() and (home / "r.md").is_file() and list(cwd.iterdir()) == []
    assert bench_common.output_path(directory=True)("~/work") == home / "work"


def test_an_error_other_than_an_allocation_failure_is_not_called_one():
    """allocated() turns allocation failures only: any other error of the inputs' maker stays what it is."""
    def broken():
        raise RuntimeError("expected a tensor on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        bench_common.allocated(broken)


def test_fused_linear_default_cpu_methods_run(tmp_path):
    out = tmp_path / "rows.json"
    bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "1", "--json", str(out),
                             "--markdown", str(tmp_path / "rows.md")])
    assert "| 2x8x16x64 | fp32 | fused |" in (tmp_path / "rows.md").read_text()
    assert "| largest MiB |" in (tmp_path / "rows.md").read_text()  # the CPU measure, not CUDA's "extra"
    assert "extra MiB" not in (tmp_path / "rows.md").read_text()
    rows = json.loads(out.read_text())["results"]
    assert [row["method"] for row in rows] == bench_fused_linear.DEFAULT_METHODS["cpu"].split(",")
    assert json.loads(out.read_text())["meta"]["triton_autotuned"] == {}  # the CPU methods tune nothing
    assert all(row["ms"] > 0 and row["note"] is None for row in rows), rows


@pytest.mark.parametrize("args", [["--path", "from_logits", "--size", "2x16x64"],
                                  ["--path", "from_logits", "--size", "2x16x64", "--inplace"],
                                  ["--path", "from_hidden", "--backend", "torch", "--size", "2x8x16x64"]])
def test_profile_step_tables_a_step(tmp_path, args):
    """gpu_check.sh part2's profile commands, at a CPU size: a wall time and ops that account for it."""
    out = tmp_path / "profile.json"
    wall_ms, kernels = profile_step.main([*args, "--dtype", "fp32", "--warmup", "1", "--steps", "1",
                                         "--json", str(out)])
    assert wall_ms > 0 and kernels and all(ms >= 0 for _, _, ms in kernels)
    assert any(name.startswith("amapo_kernels::") for name, _, _ in kernels)
    assert json.loads(out.read_text())["wall_ms"] == wall_ms


def test_profile_step_says_what_its_total_sums_on_each_device():
    """The CPU table sums the ops' self times, the CUDA one the kernels' device times (it said "CPU ops"
    on both)."""
    assert profile_step.summary("x", 2.0, 1.0, "cpu").endswith("(50% of the wall time; CPU ops: their self times)")
    on_gpu = profile_step.summary("x", 2.0, 1.0, "cuda")
    assert "kernel time 1.000 ms" in on_gpu and on_gpu.endswith("kernels: their device times)") and "CPU" not in on_gpu


def test_profile_step_rejects_a_size_of_the_other_path(capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(["--path", "from_hidden", "--size", "2x16x64"])
    assert exit_info.value.code == 2
    assert "--size for from_hidden: '2x16x64' is not BxTxHxV in positive integers" in capsys.readouterr().err


def test_the_floor_is_four_matmuls():
    """The fused-linear floor times exactly the four products an exact method needs (it once timed five)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Matmuls.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
            return func(*args, **(kwargs or {}))

    hidden, weight, labels = bench_fused_linear.make_inputs(2, 8, 16, 64, torch.float32, "cpu")
    with Matmuls():
        bench_fused_linear.four_matmuls(hidden, weight, labels)
    assert Matmuls.count == 4


def test_fused_linear_triton_rows_run_in_the_interpreter(tmp_path):
    """The Triton-module rows (CUDA only in a plain run) through the interpreter at a tiny fp32 size: their
    wiring is checked here, before a GPU session spends device time on it."""
    import os
    import subprocess

    out = tmp_path / "rows.json"
    script = Path(bench_fused_linear.__file__)
    command = [sys.executable, str(script), "--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "1", "--dtype",
               "fp32", "--methods", "triton,triton_filter,cublas", "--json", str(out)]
    done = subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=300)
    if done.returncode and "only 0-dimensional arrays can be converted to Python scalars" in done.stderr:
        pytest.skip("this Triton's interpreter cannot run loops with this numpy (triton-lang/triton#9171; see "
                    "tests/test_triton_fused_linear.py)")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [row["method"] for row in rows] == ["triton", "triton_filter", "cublas"]
    assert all(row["ms"] > 0 and row["note"] is None for row in rows), rows


def test_fused_linear_gpu_peers_say_why_they_cannot_run_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    peers = "cce_filter,cce_nofilter,liger_simpo,trl_chunked"
    bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "1", "--methods", f"fused,{peers}",
                             "--json", str(out)])
    rows = {row["method"]: row for row in json.loads(out.read_text())["results"]}
    for name in peers.split(","):
        assert rows[name]["ms"] is not None or rows[name]["note"], rows[name]
    assert "CUDA only" in rows["cce_filter"]["note"] and "CUDA only" in rows["cce_nofilter"]["note"]
    assert rows["trl_chunked"]["grad_error"] <= AGREEMENT_LIMIT and rows["trl_chunked"]["note"] is None


def test_fused_linear_checks_each_method_against_the_reference_of_its_loss(tmp_path, monkeypatch):
    """Each row is compared with the reference of the loss it computes: liger_simpo's with SimPO (beta 2,
    gamma 1), the others with AMaPO; a method computing another loss than its reference is marked."""
    from amapo_kernels.fused_linear import preference_loss_from_hidden

    def our_simpo(hidden, weight, labels):
        return preference_loss_from_hidden(hidden, weight, labels, method="simpo", beta=2.0, gamma=1.0, shift=True,
                                           backend="torch")

    monkeypatch.setitem(bench_fused_linear.PEER_LOSSES, "liger_simpo", our_simpo)
    monkeypatch.setitem(bench_fused_linear.PEER_LOSSES, "trl_chunked", our_simpo)  # SimPO where AMaPO is due
    out = tmp_path / "rows.json"
    bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "1", "--methods",
                             "fused,liger_simpo,trl_chunked,floor_4mm", "--json", str(out)])
    rows = {row["method"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["fused"]["grad_error"] < 1e-5 and rows["liger_simpo"]["grad_error"] < 1e-5, rows
    assert rows["trl_chunked"]["note"].startswith("DISAGREES with the reference"), rows["trl_chunked"]
    assert "grad_error" not in rows["floor_4mm"] and rows["floor_4mm"]["note"] is None


def test_train_benchmark_trains_every_impl_under_zero3(tmp_path):
    """bench_train at a CPU size: each loss impl trains through amapo-train (ZeRO-3, random:llama3-vocab-tiny,
    the full 128256-token vocabulary) and gets a row; every sequence of a step has --seq-len tokens."""
    import bench_train

    out = tmp_path / "rows.json"
    status = bench_train.main(["--seq-len", "96", "--steps", "2", "--warmup-steps", "1", "--work-dir", str(tmp_path),
                               "--json", str(out), "--markdown", str(tmp_path / "rows.md")])
    rows = json.loads(out.read_text())["rows"]
    assert status == 0, rows
    assert [row["impl"] for row in rows] == list(bench_train.IMPLS)
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["timed_steps"] == 1 and row["last_loss"] == row["last_loss"], row
    first_losses = {json.loads((tmp_path / impl / "metrics.jsonl").read_text().splitlines()[0])["loss"]
                    for impl in bench_train.IMPLS}
    assert max(first_losses) - min(first_losses) < 1e-3 * max(first_losses), first_losses  # one model, one batch
    assert {row["first_loss"] for row in rows} == first_losses
    assert not any((tmp_path / impl / "final").exists() for impl in bench_train.IMPLS)  # --save-final off
    table = (tmp_path / "rows.md").read_text()
    assert "| fused |" in table and "| first loss | vs eager's |" in table and "DISAGREES" not in table
    assert bench_train.LIGER_NOT_WIRED in table  # the peer the issue names says why it has no row


def test_train_benchmark_marks_a_first_loss_unlike_eagers():
    """One model, one batch: an impl whose first-step loss is not eager's computed another loss."""
    import bench_train

    assert bench_train.first_loss_note(0.70, 0.70) == "0.0e+00"
    assert bench_train.first_loss_note(0.701, 0.70) == "1.4e-03"
    assert bench_train.first_loss_note(0.80, 0.70) == "1.4e-01 DISAGREES"
    assert bench_train.first_loss_note(0.80, None) == "-"  # eager did not run


def test_train_benchmark_reports_an_impl_past_its_timeout(tmp_path):
    """An impl that runs past --timeout is killed and gets a row saying so; the others still run and the
    results files are written (gpu_check.sh part3 gives each impl a time limit)."""
    import bench_train

    out = tmp_path / "rows.json"
    status = bench_train.main(["--seq-len", "96", "--steps", "2", "--warmup-steps", "1", "--timeout", "0.5",
                               "--work-dir", str(tmp_path), "--json", str(out), "--markdown", str(tmp_path / "rows.md")])
    saved = json.loads(out.read_text())
    assert status == 1 and saved["meta"]["complete"] is True
    assert [row["impl"] for row in saved["rows"]] == list(bench_train.IMPLS)
    for row in saved["rows"]:
        assert row["error"] == "timed out after 0.5 s, 0 of 2 steps logged", row
    assert "| fused | failed: timed out after 0.5 s" in (tmp_path / "rows.md").read_text()


def test_train_benchmark_shares_its_budget_in_order(tmp_path, monkeypatch):
    """With --budget each impl may take what the ones before it left, at most --timeout; with nothing left it
    is not run, and says so in its row."""
    import bench_train

    assert bench_train.time_limit(300, None, spent=1000) == 300
    assert bench_train.time_limit(300, 520, spent=100) == 300
    assert bench_train.time_limit(300, 520, spent=400) == 120
    assert bench_train.time_limit(300, 520, spent=520) is None
    import itertools
    import types

    clock = itertools.count()  # a second a reading: the 0.5 s budget is spent before the first impl
    monkeypatch.setattr(bench_train, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    out = tmp_path / "rows.json"
    status = bench_train.main(["--seq-len", "96", "--steps", "2", "--warmup-steps", "1", "--budget", "0.5",
                               "--work-dir", str(tmp_path), "--json", str(out)])
    assert status == 1
    assert json.loads(out.read_text())["rows"] == [
        {"impl": impl, "error": "not run: --budget 0.5 s spent by the impls before it"} for impl in bench_train.IMPLS]


def test_train_benchmark_reports_the_error_not_the_progress_bar(tmp_path, monkeypatch):
    """A failed run's row gives its error, although tqdm drew a bar after it (the row showed the bar)."""
    import bench_train

    output = ("Traceback (most recent call last):\n  raise RuntimeError(message)\nRuntimeError: the loss is nan\n"
              "  0%|          | 0/2 [00:00<?, ?it/s]\r 50%|#####     | 1/2 [00:01<00:01,  1.02s/it]\n")
    script = f"import sys; sys.stderr.write({output!r}); sys.exit(1)"
    monkeypatch.setattr(bench_train, "train_command", lambda *args: [sys.executable, "-c", script])
    args = bench_train.parse_args(["--work-dir", str(tmp_path)])
    row = bench_train.measure(args, "fused", {}, tmp_path, limit=60)
    assert row["error"] == "RuntimeError: the loss is nan", row
    # with no error line: the last line that is not a progress bar
    assert bench_train.failure_reason("loading\nKilled\n 50%|#####     | 1/2 [00:01<00:01,  1.02s/it]\n"
                                      "3it [00:02,  1.50it/s]\n") == "Killed"
    assert bench_train.failure_reason("") is None


def test_long_pairs_fill_every_sequence_to_seq_len():
    import bench_train
    from amapo_train.config import TrainConfig
    from amapo_train.data import PreferenceDataset
    from amapo_train.model import load_tokenizer

    tokenizer = load_tokenizer(TrainConfig(model="random:llama3-vocab-tiny"))
    dataset = PreferenceDataset(bench_train.long_pairs(3, 256), tokenizer, fmt="pairs", max_length=256,
                                max_prompt_length=128)
    assert len(dataset) == 3
    for index in range(3):
        pair = dataset[index]
        for side in ("chosen", "rejected"):
            assert len(pair[f"{side}_input_ids"]) == 256
            assert sum(label != -100 for label in pair[f"{side}_labels"]) == 128


def nan_gradient_loss(logits, labels):
    """eager's loss exactly, its gradient NaN: a kernel that writes garbage in its backward."""
    scaled = logits * 1
    scaled.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    return bench_from_logits.eager_loss(scaled, labels)


def test_results_carry_the_variables_that_shape_the_run(monkeypatch):
    """A results file's command line starts with the environment variables that change what runs (the README's
    CPU variations: AMAPO_CPU_KERNELS=avx2, THP_MEM_ALLOC_ENABLE=1), so that it reproduces the run; others stay
    out."""
    for name in [name for name in dict(bench_common.os.environ) if bench_common.RUN_SHAPING_VARIABLES.fullmatch(name)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("AMAPO_CPU_KERNELS", "avx2")
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_from_logits.py", "--sizes", "4x1024x32000"])
    monkeypatch.setattr(sys, "executable", "/venv/bin/python")
    assert bench_common.environment("cpu")["command"] == (
        "AMAPO_CPU_KERNELS=avx2 THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_from_logits.py --sizes 4x1024x32000")


def test_a_nan_gradient_disagrees_with_the_reference(tmp_path, monkeypatch):
    """A NaN error loses every comparison: max() over (loss, gradient) errors kept the loss's, and the row of a
    peer whose gradient is all NaN read "err vs ref 0.0e+00", agreeing."""
    exact, nan = torch.ones(3), torch.full((3,), float("nan"))
    assert bench_common.relative_error(nan, exact) == float("inf")
    errors = bench_common.agreement(torch.tensor(1.0), (exact, nan), torch.tensor(1.0), (exact, exact))
    assert errors == {"loss_error": 0.0, "grad_error": float("inf")}  # the second gradient's NaN counts too
    assert bench_common.disagreement(errors).startswith("DISAGREES") and bench_common.format_error(errors) == "inf"
    peers = bench_from_logits.peer_fns
    monkeypatch.setattr(bench_from_logits, "peer_fns", lambda device: {**peers(device), "trl": nan_gradient_loss})
    ours, wrong = bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32", "--peers", "ours,trl", "--repeats",
                                          "1", "--markdown", str(tmp_path / "rows.md")])
    assert wrong["note"].startswith("DISAGREES with the reference"), wrong
    assert "| trl | " in (tmp_path / "rows.md").read_text() and "DISAGREES" in (tmp_path / "rows.md").read_text()


def test_a_gradient_filter_is_held_to_its_loss_and_reports_its_gradient_error():
    from bench_common import disagreement

    assert disagreement({"loss_error": 1e-4, "grad_error": 1e-3}, gradient_filter=True) is None
    assert disagreement({"loss_error": 1e-4, "grad_error": 0.2}, gradient_filter=True) == (
        "gradient filter: its gradient is off the exact one by 0.2 (relative)")
    assert disagreement({"loss_error": 0.3, "grad_error": 0.2}, gradient_filter=True).startswith("DISAGREES")
    assert disagreement({"loss_error": 1e-4, "grad_error": 0.2}).startswith("DISAGREES")


@pytest.mark.parametrize("short_of_memory", ["reference", "agreement run"])
def test_out_of_memory_for_the_check_leaves_rows_unchecked(tmp_path, monkeypatch, short_of_memory):
    """A reference, or a row's extra run for its agreement, that runs out of device memory costs the rows
    their agreement, not their timings or the benchmark."""
    import torch

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("no memory left")

    if short_of_memory == "reference":
        monkeypatch.setattr(bench_from_logits, "eager_loss", out_of_memory)
        monkeypatch.setattr(bench_fused_linear, "reference_results", out_of_memory)
    else:
        monkeypatch.setattr(bench_from_logits, "agreement", out_of_memory)
        monkeypatch.setattr(bench_fused_linear, "agreement", out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32", "--peers", "ours", "--repeats", "1",
                                   "--markdown", str(tmp_path / "logits.md")])
    assert rows[0]["ms"] > 0 and "grad_error" not in rows[0] and "note" not in rows[0], rows
    out = tmp_path / "rows.json"
    bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "1", "--methods", "fused",
                             "--json", str(out), "--markdown", str(tmp_path / "hidden.md")])
    (row,) = json.loads(out.read_text())["results"]
    assert row["ms"] > 0 and "grad_error" not in row and row["note"] is None, row
    assert "| 2x8x16x64 | fp32 | fused |" in (tmp_path / "hidden.md").read_text()


ARGUMENT_MISTAKES = [  # (script, its arguments, the one-line error): refused before any input is made
    ("bench_from_logits", ["--sizes", "4x10"], "argument --sizes: '4x10' is not BxTxV in positive integers"),
    ("bench_from_logits", ["--sizes", "3x8x64"], "argument --sizes: '3x8x64': B must be even"),
    ("bench_from_logits", ["--sizes", "0x8x64"], "is not BxTxV in positive integers"),
    ("bench_from_logits", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    ("bench_fused_linear", ["--sizes", "2x8x64"], "argument --sizes: '2x8x64' is not BxTxHxV in positive integers"),
    ("bench_fused_linear", ["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    ("bench_fused_linear", ["--token-chunk", "x"], "argument --token-chunk: expected an integer, got 'x'"),
    ("profile_step", ["--size", "2x8x64,2x8x64"], "--size for from_logits: one BxTxV size"),
    ("profile_step", ["--size", "2x8x64", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("bench_train", ["--pairs", "1"], "argument --pairs: must be >= 2, got 1"),  # AMaPO statistics over 1 pair
    ("bench_train", ["--bf16", "yes"], "argument --bf16: invalid choice: 'yes'"),
    # an unknown method ran as eager, in a row of its name
    ("bench_fused_linear", ["--sizes", "2x8x8x16", "--repeats", "1", "--methods", "fused,nosuch"],
     "argument --methods: unknown 'nosuch'; known: triton, triton_filter, cublas, fused, op_logits, eager,"),
    # no method at all: it ran the default methods
    ("bench_fused_linear", ["--sizes", "2x8x8x16", "--repeats", "1", "--methods", ","],
     "argument --methods: none given; known: triton, triton_filter,"),
    # a limit of 0 or less was a TypeError (the message formatted --budget's None)
    ("bench_train", ["--timeout", "0"], "argument --timeout: must be a finite number > 0, got 0"),
    ("bench_train", ["--timeout", "-5"], "argument --timeout: must be a finite number > 0, got -5"),
    ("bench_train", ["--budget", "nan"], "argument --budget: must be a finite number > 0, got nan"),
    # profiled without it, and labelled "inplace_backward" in the printed line, the JSON and the markdown
    ("profile_step", ["--path", "from_hidden", "--backend", "torch", "--size", "2x8x16x64", "--dtype", "fp32",
                      "--inplace", "--warmup", "0", "--steps", "1"], "--inplace: from_logits only"),
    # a typo amapo-train refuses: every impl was launched and failed on it, exit status 1
    ("bench_train", ["--deepspeed", "zero4"],
     "argument --deepspeed: zero4: no such file, and not one of ['zero2', 'zero3'] or none"),
    ("bench_train", ["--shape", "llama3-1B"],
     "argument --shape: unknown shape 'llama3-1B'; shapes: ['llama3-1b', 'llama3-vocab-tiny']"),
]


@pytest.mark.parametrize("script, args, message", ARGUMENT_MISTAKES, ids=[" ".join([s, *a]) for s, a, _ in ARGUMENT_MISTAKES])
def test_bad_arguments_are_one_line_and_status_2(script, args, message, capsys):
    """A typo in a size costs a GPU session's call nothing: one line, exit status 2, before any tensor."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        (module.parse_args if script == "bench_train" else module.main)(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and message in lines[0], lines


HERE = str(Path(__file__).parent)  # a directory
NOT_A_FOLDER = f"{Path(__file__)}/out"  # below a file
OUTPUT_MISTAKES = [  # (script, its arguments, the one-line error): refused before measuring, nothing written
    ("bench_from_logits", ["--json", HERE], f"argument --json: {HERE}: is a directory, not a file"),
    ("bench_from_logits", ["--markdown", NOT_A_FOLDER], f"argument --markdown: {NOT_A_FOLDER}: {__file__} is not a"),
    ("bench_fused_linear", ["--markdown", HERE], f"argument --markdown: {HERE}: is a directory, not a file"),
    ("bench_fused_linear", ["--json", NOT_A_FOLDER], f"argument --json: {NOT_A_FOLDER}: {__file__} is not a"),
    ("profile_step", ["--size", "2x8x64", "--json", HERE], f"argument --json: {HERE}: is a directory, not a file"),
    ("profile_step", ["--size", "2x8x64", "--markdown", NOT_A_FOLDER], f"argument --markdown: {NOT_A_FOLDER}:"),
    ("bench_train", ["--work-dir", __file__], f"argument --work-dir: {__file__}: {__file__} is not a directory"),
    ("bench_train", ["--json", HERE], f"argument --json: {HERE}: is a directory, not a file"),
    ("bench_train", ["--markdown", NOT_A_FOLDER], f"argument --markdown: {NOT_A_FOLDER}: {__file__} is not a"),
]


@pytest.mark.parametrize("script, args, message", OUTPUT_MISTAKES,
                         ids=[" ".join([s, a[-2]]) for s, a, _ in OUTPUT_MISTAKES])
def test_unwritable_outputs_are_refused_before_measuring(script, args, message, capsys, monkeypatch):
    """An output that cannot be written is one line and exit status 2 when parsing: it was a traceback after
    all the measuring (a directory given as --markdown also left a stray .partial beside it)."""
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(module, "time_ms", None, raising=False)  # measuring would raise (TypeError)
    sizes = {"bench_from_logits": ["--sizes", "2x8x64"], "bench_fused_linear": ["--sizes", "2x8x8x16"]}
    with pytest.raises(SystemExit) as stop:
        (module.parse_args if script == "bench_train" else module.main)([*sizes.get(script, []), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not Path(HERE + ".partial").exists()  # where the --markdown of a directory was staged


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of our CUDA-only backends on a CPU-only machine")
@pytest.mark.parametrize("script, args, message", [
    ("bench_fused_linear", ["--methods", "fused,triton"], "--methods triton: backend='triton' needs CUDA tensors"),
    ("bench_fused_linear", ["--methods", "triton_filter"], "--methods triton_filter: backend='triton' needs CUDA"),
    ("bench_fused_linear", ["--methods", "cublas"], "--methods cublas: backend='cublas' needs CUDA tensors"),
    ("profile_step", ["--path", "from_hidden", "--size", "2x16x16x64", "--steps", "1"],  # its default backend
     "--backend triton: backend='triton' needs CUDA tensors"),
])
def test_cuda_only_backends_on_the_cpu_are_one_line_and_status_2(script, args, message, capsys, monkeypatch):
    """The Triton-module backends on CPU tensors were a ValueError traceback (after the rows before them):
    refused when parsing, by amapo_loss_from_hidden's own rule (which lets them run under TRITON_INTERPRET=1:
    test_fused_linear_triton_rows_run_in_the_interpreter)."""
    import importlib

    from amapo_kernels import triton_fused_linear

    if triton_fused_linear.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: the Triton backends run on the CPU")
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "time_ms", None)  # measuring would raise (TypeError)
    sizes = ["--sizes", "2x8x8x16"] if script == "bench_fused_linear" else []
    with pytest.raises(SystemExit) as stop:
        module.main([*sizes, *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and f"error: {message}" in lines[0], lines


class FakeCudaMemory:
    """torch.cuda's allocation counters, driven by a test: `allocated` now, and its peak since the reset."""

    def __init__(self, monkeypatch, allocated):
        self.allocated = self.peak = allocated
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: setattr(self, "peak", self.allocated))

    def allocate(self, size):
        self.allocated += size
        self.peak = max(self.peak, self.allocated)


def test_extra_memory_is_the_peak_beyond_inputs_and_their_gradients(monkeypatch):
    """The accounting of "extra MiB" (CUDA), with a fake probe: inputs of 1000 bytes, gradients of 100 that
    the previous run left. A method that writes its gradients and a workspace of 500 needs 500 beyond them; the
    floor, which keeps no gradient (logits 300, a gradient-sized product 100), is charged the same allowance."""
    from bench_common import cuda_peak_extra_bytes

    memory = FakeCudaMemory(monkeypatch, allocated=1000 + 100)
    gradients = {"held": True}  # by the previous run

    def clear_gradients():
        if gradients["held"]:
            memory.allocate(-100)
        gradients["held"] = False

    def method():
        memory.allocate(100)  # its gradients, kept
        gradients["held"] = True
        memory.allocate(500)  # its workspace
        memory.allocate(-500)

    def floor():
        memory.allocate(300 + 100)  # logits and a gradient-sized product, both freed
        memory.allocate(-400)

    assert cuda_peak_extra_bytes(method, clear_gradients, gradient_bytes=100) == 500
    assert cuda_peak_extra_bytes(floor, clear_gradients, gradient_bytes=100) == 300


def test_fused_linear_memory_baseline_holds_no_gradients(monkeypatch):
    """Every row, the floor included, reads its memory baseline with hidden's and weight's gradients freed
    (the timed runs before it left them) and has the same gradient size left out: the baseline counted the
    previous run's gradients, and the floor, whose runs freed them, was charged them."""
    import types

    from bench_common import time_ms

    hidden, weight, labels = bench_fused_linear.make_inputs(2, 8, 16, 64, torch.float32, "cpu")
    seen = {}

    def probe(run, prepare=None, gradient_bytes=0):
        if prepare:
            prepare()
        seen[name] = (hidden.grad, weight.grad, gradient_bytes)
        run()
        return 0

    monkeypatch.setattr(bench_fused_linear, "cuda_peak_extra_bytes", probe)
    monkeypatch.setattr(bench_fused_linear, "time_ms", lambda run, device, *args: time_ms(run, "cpu", *args))
    args = types.SimpleNamespace(device="cuda", warmup=1, repeats=1, token_chunk=8, vocab_chunk=16)
    for name in ("fused", "floor_4mm"):
        bench_fused_linear.measure(name, hidden, weight, labels, None, args)
    size = (hidden.numel() + weight.numel()) * 4
    assert seen == {"fused": (None, None, size), "floor_4mm": (None, None, size)}


CUDA_RUNS = {  # script -> the smallest arguments of a GPU run besides --device cuda
    "bench_from_logits": [], "bench_fused_linear": [], "profile_step": ["--size", "2x8x64"], "bench_train": [],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of --device cuda where there is no GPU")
@pytest.mark.parametrize("script", sorted(CUDA_RUNS))
def test_device_cuda_without_a_gpu_is_one_line_and_status_2(script, capsys):
    """--device cuda on a machine without a GPU: one line naming the flag, exit status 2, nothing written (a
    traceback from torch.cuda in bench_train before)."""
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        (module.parse_args if script == "bench_train" else module.main)(["--device", "cuda", *CUDA_RUNS[script]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert lines[0].endswith("error: --device cuda: no CUDA device is available"), lines


class FakeClock:
    """A clock that only runs() move: perf_counter (seconds) and torch.cuda.Event pairs (ms) both read it."""

    def __init__(self, monkeypatch, durations_ms):
        self.now, self.durations, self.calls = 0.0, list(durations_ms), []
        clock = self
        monkeypatch.setattr(bench_common, "time", types.SimpleNamespace(perf_counter=lambda: clock.now / 1e3))

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = clock.now

            def elapsed_time(self, end):
                return end.at - self.at

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: clock.calls.append("sync"))

    def run(self):
        self.calls.append("run")
        self.now += self.durations.pop(0)

    def prepare(self):
        self.calls.append("prepare")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_time_ms_is_the_median_of_the_timed_runs_after_the_warmup(monkeypatch, device):
    """Two slow warm-ups (compiles, autotuning) are left out; the median of 5, 1 and 6 ms is 5 (not the mean 4 or
    the minimum 1); prepare() runs before every run, warm-ups included. On a GPU prepare()'s work is finished
    before the start event (a logits-sized copy left pending let the host run ahead, its launches untimed)."""
    clock = FakeClock(monkeypatch, [100, 100, 5, 1, 6])
    assert bench_common.time_ms(clock.run, device, warmup=2, repeats=3, prepare=clock.prepare) == pytest.approx(5)
    timed = ["prepare", "sync", "run", "sync"] if device == "cuda" else ["prepare", "run"]
    assert clock.calls == ["prepare", "run"] * 2 + timed * 3


def test_compile_is_compiled_anew_and_static_for_each_size():
    """Dynamo keys its graphs by the function's code, so a torch.compile wrapper per size shared one cache: the
    second size made the graph dynamic and the third reused it (2 graphs for 3 sizes). Each size gets its own."""
    from torch._dynamo.utils import counters

    def loss(x):
        return (x * 2).sum()

    before = counters["stats"]["unique_graphs"]
    for n in (16, 24, 32):
        bench_common.compiled_for_this_size(loss)(torch.ones(n))
    assert counters["stats"]["unique_graphs"] - before == 3


def test_fused_linear_reference_takes_the_log_softmax_in_fp32():
    """The eager reference of bench_fused_linear took the log-softmax of bf16 logits in bf16: its AMaPO loss was
    9% off the fp64 one at this size, beyond the agreement limit of every correct row."""
    import torch.nn.functional as F

    hidden, weight, labels = bench_fused_linear.make_inputs(2, 128, 64, 8192, torch.bfloat16, "cpu")
    exact = reference.amapo_loss(*reference.sequence_logps(F.linear(hidden.double(), weight.double()), labels,
                                                           shift=True).chunk(2))
    loss = bench_fused_linear.eager_loss(hidden, weight, labels)
    assert abs(loss.item() - exact.item()) < 0.01 * abs(exact.item()) < AGREEMENT_LIMIT * abs(exact.item())


def test_copy_bandwidth_counts_bytes_read_and_written_over_ten_copies(monkeypatch):
    """1 GiB copied 10 times in 100 ms (fake events): 2 x 2**30 x 10 bytes moved, 214.7 GB/s."""
    clock = FakeClock(monkeypatch, [])

    class Buffer:
        def numel(self):
            return 2**30

        def copy_(self, source):
            clock.now += 10 if source is not None else 0  # each copy: 10 ms of the fake clock

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: Buffer())
    monkeypatch.setattr(torch, "empty_like", lambda tensor: Buffer())
    # 3 warm-up copies outside the events, 10 timed: 100 ms
    assert bench_common.copy_bandwidth_gbs() == pytest.approx(2 * 2**30 * 10 / 0.1 / 1e9)


def test_memory_baseline_frees_the_gradients_a_run_would_accumulate_into(monkeypatch):
    """prepare() runs before the baseline is read: a run that accumulates into gradients left from the previous
    run allocates none, and would be charged 100 bytes less than one that writes them afresh."""
    memory = FakeCudaMemory(monkeypatch, allocated=1000 + 100)
    gradients = {"held": True}

    def clear_gradients():
        memory.allocate(-100 if gradients["held"] else 0)
        gradients["held"] = False

    def method():  # autograd's accumulation: gradients allocated only where none is held
        if not gradients["held"]:
            memory.allocate(100)
            gradients["held"] = True
        memory.allocate(500)
        memory.allocate(-500)

    assert bench_common.cuda_peak_extra_bytes(method, clear_gradients, gradient_bytes=100) == 500


def test_errors_are_relative_to_the_reference_and_the_worst_gradient_counts():
    assert bench_common.relative_error(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])) == 1.0  # / ||expected||
    assert bench_common.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert bench_common.relative_error(torch.ones(2), torch.zeros(2)) == float("inf")
    exact, wrong = torch.ones(3), torch.full((3,), 1.5)
    errors = bench_common.agreement(torch.tensor(1.0), (exact, wrong), torch.tensor(1.0), (exact, exact))
    assert errors == {"loss_error": 0.0, "grad_error": 0.5}
    assert bench_common.format_error({"loss_error": 1e-3, "grad_error": 2e-2}) == "2.0e-02"
    assert bench_common.format_error({"loss_error": 3e-2, "grad_error": 2e-3}) == "3.0e-02"
    assert bench_common.format_error({"note": "OOM"}) == bench_common.format_error(None) == "-"


def test_results_are_written_into_a_folder_that_does_not_exist_yet(tmp_path):
    """output_path accepts a folder that can be made: write_results makes it."""
    out, md = tmp_path / "new" / "rows.json", tmp_path / "new" / "md" / "rows.md"
    bench_common.write_results(out, {"meta": {}, "rows": [1]}, md, "table\n", complete=True)
    assert json.loads(out.read_text()) == {"meta": {"complete": True}, "rows": [1]} and md.read_text() == "table\n"
    assert sorted(path.name for path in out.parent.iterdir()) == ["md", "rows.json"]  # no .partial left


def test_markdown_table_has_one_separator_per_column():
    assert bench_common.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |\n"


def test_bytes_moved_read_scored_rows_twice_and_write_the_whole_gradient():
    """Logits [2, 4, 8] fp32 (rows of 32 bytes), shift: row t is scored where labels[:, t + 1] is not ignored,
    3 rows here (labels[0, 0] scores no row). 2 x 3 rows read + 8 rows of gradient written."""
    logits = torch.zeros(2, 4, 8)
    labels = torch.tensor([[7, 1, -100, -100], [-100, -100, 5, 6]])
    assert bench_from_logits.must_move_bytes(logits, labels) == (2 * 3 + 8) * 32
    assert bench_from_logits.must_move_bytes(logits.bfloat16(), labels) == (2 * 3 + 8) * 16


def test_from_logits_limit_fraction_and_ratios(monkeypatch):
    """With a measured bandwidth, each row's limit is the bytes moved at that bandwidth, "% of limit" is
    limit time / measured time, and "x ours" is the peer's time / ours (fake timings: ours 2 ms, eager 5 ms)."""
    timings = {"ours": 2.0, "eager": 5.0}
    monkeypatch.setattr(bench_from_logits, "peer_fns", lambda device: dict.fromkeys(timings))
    monkeypatch.setattr(bench_from_logits, "measure",
                        lambda name, fn, logits, labels, *args: (timings[name], 3 * 2**20, None))
    ours, eager = bench_from_logits.bench_size("2x8x64", "fp32", "cpu", ["ours", "eager"], 1, bandwidth=0.001)
    logits, labels = bench_from_logits.make_inputs(2, 8, 64, torch.float32, "cpu")
    limit_ms = bench_from_logits.must_move_bytes(logits, labels) / 1e6 * 1e3  # 1 MB/s
    assert ours["limit_ms"] == eager["limit_ms"] == pytest.approx(limit_ms)
    assert eager["fraction_of_limit"] == pytest.approx(limit_ms / 5.0)
    assert (ours["time_vs_ours"], eager["time_vs_ours"]) == (1.0, 2.5)
    row = {**eager, "fraction_of_limit": 0.5, "loss_error": 1e-3, "grad_error": 2e-3}
    assert bench_from_logits.format_row(row) == ["2x8x64", "fp32", "eager", "5.00", "2.50", "3.0", "50%", "2.0e-03", ""]


def test_from_logits_times_after_three_warmups_and_counts_the_logits_gradient_on_cuda(monkeypatch):
    """The docstring's protocol: 3 untimed warm-ups, --repeats timed runs; CUDA's memory figure keeps the logits'
    gradient in (what in-place saves), and a peer that overwrites the logits gets them back before each run."""
    seen = {}
    monkeypatch.setattr(bench_from_logits, "time_ms",
                        lambda run, device, warmup, repeats, prepare: seen.update(timing=(warmup, repeats)) or 1.0)
    monkeypatch.setattr(bench_from_logits, "cuda_peak_extra_bytes",
                        lambda run, prepare, gradient_bytes: seen.update(memory=(prepare, gradient_bytes)) or 7)
    logits, labels = bench_from_logits.make_inputs(2, 8, 64, torch.float32, "cpu")
    fns = bench_from_logits.peer_fns("cpu")
    assert bench_from_logits.measure("ours", fns["ours"], logits, labels, "cuda", 5, None) == (1.0, 7, None)
    assert seen == {"timing": (3, 5), "memory": (None, 0)}
    bench_from_logits.measure("ours_inplace", fns["ours_inplace"], logits, labels, "cuda", 5, None)
    assert seen["memory"][0] is not None and seen["memory"][1] == 0


def test_from_logits_inputs_are_peaked_with_a_quarter_prompt():
    """Logits of a few nats of entropy (uniform noise has about log V), the first quarter of labels ignored."""
    logits, labels = bench_from_logits.make_inputs(2, 8, 4096, torch.float32, "cpu")
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert 1.0 < entropy.mean().item() < 5.0 < torch.log(torch.tensor(4096.0)).item()
    assert (labels[:, :2] == -100).all() and (labels[:, 2:] >= 0).all()


def test_from_logits_adds_ours_as_the_baseline_of_the_ratios(tmp_path):
    rows = bench_from_logits.main(["--sizes", "2x8x64", "--dtypes", "fp32", "--peers", "eager", "--repeats", "1"])
    assert [row["peer"] for row in rows] == ["ours", "eager"] and rows[1]["time_vs_ours"] > 0, rows


def test_the_floor_multiplies_only_the_scored_positions():
    """Its products are over hidden[:, :-1] at the positions whose next label is scored (shift=True): logits of
    [scored, V], not of every position."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, labels = bench_fused_linear.make_inputs(2, 8, 16, 64, torch.float32, "cpu")
    labels[0, 7] = labels[1, 2] = -100
    products = []

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.mm:
                products.append(args)
            return func(*args, **(kwargs or {}))

    with Matmuls():
        bench_fused_linear.four_matmuls(hidden, weight, labels)
    scored = hidden[:, :-1][labels[:, 1:] != -100]
    assert torch.equal(products[0][0], scored) and torch.equal(products[1][0], scored)


def test_fused_linear_inputs_give_peaked_logits():
    """Weight scaled so that logits have std ~4: a few nats of entropy, far below uniform noise's log V."""
    hidden, weight, labels = bench_fused_linear.make_inputs(2, 8, 64, 4096, torch.float32, "cpu")
    logits = (hidden @ weight.t()).detach()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean().item()
    assert 3.5 < logits.std().item() < 4.5 and entropy < torch.log(torch.tensor(4096.0)).item() - 3, entropy
    assert (labels[:, :2] == -100).all() and (labels[:, 2:] >= 0).all()


def approximate_gradient_loss(hidden, weight, labels):
    """AMaPO's loss exactly, its gradients 20% off: a gradient filter's row in miniature."""
    loss = bench_fused_linear.eager_loss(hidden, weight, labels)
    return loss + 0.2 * (loss - loss.detach())


def test_a_filtered_peer_is_held_to_its_loss_an_exact_one_to_its_gradient(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_fused_linear.PEER_LOSSES, "cce_filter", approximate_gradient_loss)
    monkeypatch.setitem(bench_fused_linear.PEER_LOSSES, "cce_nofilter", approximate_gradient_loss)
    out = tmp_path / "rows.json"
    bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--warmup", "0", "--methods",
                             "cce_filter,cce_nofilter", "--json", str(out)])
    filtered, exact = json.loads(out.read_text())["results"]
    assert filtered["note"] == "gradient filter: its gradient is off the exact one by 0.2 (relative)", filtered
    assert exact["note"].startswith("DISAGREES with the reference"), exact


def test_fused_linear_ratios_are_to_ours_per_size():
    """"x fused" on the CPU ("x triton" on CUDA): each method's time over ours at the same size."""
    def row(size, method, ms):
        return {"batch": 2, "steps": size, "width": 16, "vocab": 64, "method": method, "ms": ms, "memory_bytes": 2**20,
                "note": None}

    rows = [row(8, "fused", 2.0), row(8, "eager", 5.0), row(16, "fused", 4.0), row(16, "eager", 6.0),
            row(16, "liger_simpo", None)]
    env = {"torch": "2", "date": "today", "command": "bench"}
    cpu = bench_fused_linear.markdown_report(rows, types.SimpleNamespace(device="cpu", dtype="fp32"), env, {})
    assert "| B x T x H x V | dtype | method | fwd+bwd ms | x fused | largest MiB |" in cpu
    assert "| 2x8x16x64 | fp32 | eager | 5.00 | 2.50 | 1.0 | - |  |" in cpu
    assert "| 2x16x16x64 | fp32 | eager | 6.00 | 1.50 |" in cpu and "| 2x16x16x64 | fp32 | liger_simpo | - | - |" in cpu
    gpu = bench_fused_linear.markdown_report(rows, types.SimpleNamespace(device="cuda", dtype="bf16"), env, {})
    assert "| x triton | extra MiB |" in gpu and "| 2x8x16x64 | bf16 | eager | 5.00 | - |" in gpu  # no triton row


def test_fused_linear_raises_a_failure_of_ours(monkeypatch):
    """A peer's failure is its row's note; ours (fused here) is the benchmark's subject: it raises."""
    def broken(*args, **kwargs):
        raise RuntimeError("our kernel broke")

    monkeypatch.setattr(bench_fused_linear, "amapo_loss_from_hidden", broken)
    with pytest.raises(RuntimeError, match="our kernel broke"):
        bench_fused_linear.main(["--sizes", "2x8x16x64", "--repeats", "1", "--methods", "fused"])


def test_fused_linear_methods_get_their_options(monkeypatch):
    """Each row runs what its name says: --token-chunk/--vocab-chunk reach fused, the backend and the filter
    reach the Triton-module rows."""
    calls = []

    def recording(hidden, weight, labels, **kwargs):
        calls.append(kwargs)
        return (hidden.sum() + weight.sum()) * 0

    monkeypatch.setattr(bench_fused_linear, "amapo_loss_from_hidden", recording)
    hidden, weight, labels = bench_fused_linear.make_inputs(2, 8, 16, 64, torch.float32, "cpu")
    for name in ("fused", "triton", "triton_filter", "cublas"):
        bench_fused_linear.step_fn(name, hidden, weight, labels, 8, 32)()
    assert calls == [dict(shift=True, token_chunk=8, vocab_chunk=32, backend="torch"),
                     dict(shift=True, backend="triton", gradient_filter=False),
                     dict(shift=True, backend="triton", gradient_filter=True),
                     dict(shift=True, backend="cublas", gradient_filter=False)]


def test_fused_linear_times_after_its_warmup(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_fused_linear, "time_ms", lambda run, device, *args: seen.append(args[:2]) or 1.0)
    hidden, weight, labels = bench_fused_linear.make_inputs(2, 8, 16, 64, torch.float32, "cpu")
    args = types.SimpleNamespace(device="cpu", warmup=4, repeats=7, token_chunk=8, vocab_chunk=16)
    bench_fused_linear.measure("fused", hidden, weight, labels, None, args)
    assert seen == [(4, 7)]


def fake_training_run(steps, returncode=0):
    """A train_command stand-in: it logs `steps` (loss, tokens_per_s, peak_memory_gib) rows to metrics.jsonl."""
    rows = [json.dumps({"loss": loss, "tokens_per_s": speed, "peak_memory_gib": peak}) for loss, speed, peak in steps]
    script = ("import pathlib, sys; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); "
              f"(out / 'metrics.jsonl').write_text({''.join(row + chr(10) for row in rows)!r}); sys.exit({returncode})")
    return lambda args, impl, data, output_dir: [sys.executable, "-c", script, str(output_dir)]


def test_train_row_is_the_median_after_the_warmup_steps(tmp_path, monkeypatch):
    """tokens/s: the median of the steps after --warmup-steps (a slow first step, a fast outlier left out); first
    loss: step 1's; peak memory: the most of any step."""
    import bench_train

    steps = [(0.70, 10.0, 1.0), (0.69, 500.0, 3.0), (0.68, 100.0, 2.0), (0.67, 120.0, 2.5), (0.66, 900.0, 2.0),
             (0.65, 130.0, 1.5)]
    monkeypatch.setattr(bench_train, "train_command", fake_training_run(steps))
    args = bench_train.parse_args(["--steps", "6", "--warmup-steps", "2", "--seq-len", "96", "--work-dir",
                                   str(tmp_path)])
    row = bench_train.measure(args, "fused", {}, tmp_path, limit=60)
    assert (row["tokens_per_s"], row["timed_steps"]) == (125.0, 4), row
    assert (row["first_loss"], row["last_loss"], row["peak_memory_gib"]) == (0.70, 0.65, 3.0), row
    assert row["tokens_per_step"] == 2 * 2 * 96


def test_train_timeout_counts_only_the_steps_this_run_logged(tmp_path, monkeypatch):
    """A work dir reused (gpu_check.sh part3's /tmp/bench_train, the default results/bench_train): a run stopped
    before it starts its metrics.jsonl was reported with the earlier run's steps ("2 of 2 steps logged")."""
    import bench_train

    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "metrics.jsonl").write_text('{"loss": 0.7, "tokens_per_s": 100.0}\n' * 2)  # an earlier run
    monkeypatch.setattr(bench_train, "train_command",
                        lambda *args: [sys.executable, "-c", "import time; time.sleep(60)"])
    args = bench_train.parse_args(["--steps", "2", "--warmup-steps", "1", "--work-dir", str(tmp_path)])
    row = bench_train.measure(args, "fused", {}, tmp_path, limit=0.5)
    assert row["error"] == "timed out after 0.5 s, 0 of 2 steps logged", row


def test_train_deepspeed_file_is_passed_as_an_absolute_path(tmp_path, monkeypatch):
    """The runs start in the repository's root: a JSON config named relative to the caller's directory reaches
    them as an absolute path; the bundled names pass as they are."""
    import bench_train

    (tmp_path / "ds.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert bench_train.parse_args(["--deepspeed", "ds.json"]).deepspeed == str(tmp_path / "ds.json")
    for name in ("zero2", "zero3", "none"):
        assert bench_train.parse_args(["--deepspeed", name]).deepspeed == name


def test_train_run_that_logs_too_few_steps_failed(tmp_path, monkeypatch):
    """Exit status 0 but fewer steps than --steps (a run stopped early): no row of numbers from it."""
    import bench_train

    monkeypatch.setattr(bench_train, "train_command", fake_training_run([(0.7, 100.0, 1.0)] * 2))
    args = bench_train.parse_args(["--steps", "3", "--warmup-steps", "1", "--work-dir", str(tmp_path)])
    row = bench_train.measure(args, "ops", {}, tmp_path, limit=60)
    assert "tokens_per_s" not in row and row["error"] == "exit status 0", row


def test_train_table_gives_speed_against_eager():
    import bench_train

    def row(impl, tokens_per_s):
        return {"impl": impl, "tokens_per_s": tokens_per_s, "timed_steps": 3, "first_loss": 0.7, "last_loss": 0.6}

    table = bench_train.table([row("fused", 300.0), row("eager", 100.0)])
    assert "| fused | 300 | 3.00x | - | 3 | 0.7000 | 0.0e+00 | 0.6000 |" in table
    # eager failed: nothing to compare with
    table = bench_train.table([row("fused", 300.0), {"impl": "eager", "error": "Killed"}])
    assert "| fused | 300 | - | - | 3 | 0.7000 | - | 0.6000 |" in table and "| eager | failed: Killed |" in table


def test_train_benchmark_stopped_midway_is_partial(tmp_path, monkeypatch):
    import bench_train

    monkeypatch.setattr(bench_train, "measure", stop_after_first(lambda args, impl, *rest: {"impl": impl, "error": "x"}))
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--seq-len", "32", "--steps", "2", "--warmup-steps", "1", "--work-dir", str(tmp_path),
                          "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["meta"]["complete"] is False and saved["rows"] == [{"impl": "fused", "error": "x"}]


def test_train_arguments_and_the_command_they_give(tmp_path):
    """The defaults on the CPU, --warmup-steps that leaves no step to time refused, and the amapo-train command
    as amapo-train's own parser reads it: prompts cut to half of --seq-len, no final checkpoint."""
    import bench_train
    from amapo_train.command_line import build_parser, config_from_args

    args = bench_train.parse_args(["--work-dir", str(tmp_path)])
    assert (args.shape, args.seq_len, args.steps, args.warmup_steps) == ("llama3-vocab-tiny", 256, 6, 2)
    assert (args.bf16, args.checkpointing) == (False, True)
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--steps", "3", "--warmup-steps", "3", "--work-dir", str(tmp_path)])
    args = bench_train.parse_args(["--seq-len", "96", "--pairs", "3", "--steps", "4", "--work-dir", str(tmp_path)])
    command = bench_train.train_command(args, "ops", {"train": "a.jsonl", "test": "b.jsonl"}, tmp_path / "ops")
    assert command[1:3] == ["-m", "amapo_train.train"]
    config = config_from_args(build_parser("").parse_args(command[3:]))
    assert (config.max_length, config.max_prompt_length, config.loss_impl, config.save_final) == (96, 48, "ops", False)
    assert (config.per_device_batch_size, config.total_batch_size, config.max_steps) == (3, 3, 4)
    assert (config.deepspeed, config.bf16, config.gradient_checkpointing) == ("zero3", False, True)


def test_train_failure_reason_prefers_a_console_scripts_error_line():
    import bench_train

    assert bench_train.failure_reason("amapo-train: error: --max-length 0 must be >= 2\nwandb: finishing\n") == (
        "amapo-train: error: --max-length 0 must be >= 2")


def test_profile_step_counts_calls_per_step_largest_first():
    step = profile_step.make_step("from_logits", "2x16x64", torch.float32, "cpu", "triton", False)
    kernels = profile_step.kernel_table(step, "cpu", steps=3)
    calls = {name: count for name, count, _ in kernels}
    assert calls["amapo_kernels::sequence_logps_fwd"] == calls["amapo_kernels::sequence_logps_bwd"] == 1, calls
    assert [ms for _, _, ms in kernels] == sorted((ms for _, _, ms in kernels), reverse=True)


@pytest.mark.parametrize("path, size, inplace, backend", [("from_logits", "2x16x64", True, "triton"),
                                                          ("from_hidden", "2x8x16x64", False, "cublas")])
def test_profile_step_runs_the_options_it_was_given(monkeypatch, path, size, inplace, backend):
    calls = []

    def recording(*tensors, **kwargs):
        calls.append(kwargs)
        return sum(tensor.sum() for tensor in tensors if tensor.is_floating_point()) * 0

    monkeypatch.setattr(profile_step.ak, "amapo_loss_from_logits", recording)
    monkeypatch.setattr(profile_step.ak, "amapo_loss_from_hidden", recording)
    profile_step.make_step(path, size, torch.float32, "cpu", backend, inplace)()
    assert calls == [dict(shift=True, inplace_backward=True) if path == "from_logits" else
                     dict(shift=True, backend="cublas")]


def test_profile_step_warms_up_then_times_twenty_steps(monkeypatch, tmp_path):
    """The docstring's protocol: --warmup steps, then the wall time as the median of 20; the table's total is the
    sum of its rows."""
    steps, timings = [], []
    monkeypatch.setattr(profile_step, "make_step", lambda *args: lambda: steps.append(1))
    monkeypatch.setattr(profile_step, "time_ms",
                        lambda step, device, warmup, repeats: timings.append((len(steps), warmup, repeats)) or 1.0)
    monkeypatch.setattr(profile_step, "kernel_table", lambda *args: [("aten::mm", 1, 0.5), ("aten::add", 2, 0.25)])
    out = tmp_path / "profile.json"
    profile_step.main(["--size", "2x8x64", "--warmup", "2", "--steps", "1", "--json", str(out)])
    assert timings == [(2, 0, 20)]
    assert json.loads(out.read_text())["busy_ms"] == 0.75


@pytest.mark.parametrize("script", ["bench_from_logits", "bench_fused_linear"])
def test_cuda_timings_need_twenty_repeats(script, capsys, monkeypatch):
    """On a GPU (faked here: the check comes before any CUDA call) fewer than 20 repeats are refused."""
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as stop:
        module.main(["--device", "cuda", "--repeats", "19"])
    assert stop.value.code == 2 and "--device cuda: use --repeats >= 20" in capsys.readouterr().err
