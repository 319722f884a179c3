"""The README's main command runs the demo; a small version of it here."""

import re

import pytest
import torch

import amapo_kernels as ak
from amapo_kernels import demo, reference

SMALL = ["--pairs", "2", "--steps", "16", "--vocab", "64", "--repeats", "1"]


def test_demo_runs_and_agrees(capsys):
    demo.main(SMALL)
    out = capsys.readouterr().out
    for method in ("dpo", "simpo", "amapo"):
        assert f"\n{method} " in out
    worst = float(out.split("worst relative loss difference, op (fp32) vs reference (fp64): ")[1].split()[0])
    assert worst < 1e-5


def test_built_in_batch_pairs_share_prompts_and_rank_scores():
    logits, ref_logits, labels, extras = demo.built_in_batch(3, 32, 50)
    assert logits.shape == ref_logits.shape == (6, 32, 50) and labels.shape == (6, 32)
    first_scored = (labels != demo.IGNORE).int().argmax(-1)
    assert torch.equal(first_scored[:3], first_scored[3:])  # chosen row i and rejected row i share a prompt
    assert (first_scored > 0).all()
    assert (extras["chosen_scores"] >= extras["rejected_scores"]).all()


@pytest.mark.parametrize("method", ["dpo", "simpo", "odpo", "amapo"])
def test_run_method_is_the_methods_loss_on_shifted_chosen_first_rows(method):
    logits, ref_logits, labels, extras = demo.built_in_batch(2, 16, 40)
    logits, ref_logits, extras = logits.double(), ref_logits.double(), {k: v.double() for k, v in extras.items()}
    (loss, grad), _ = demo.run_method(method, logits, ref_logits, labels, extras, reference, 1)
    average = method in ("simpo", "amapo")  # length-normalized log-probs; dpo and odpo sum them
    leaf = logits.clone().requires_grad_()
    logps = reference.sequence_logps(leaf, labels, average=average, shift=True)
    ref_logps = reference.sequence_logps(ref_logits, labels, average=average, shift=True)
    expected = reference.preference_loss(logps[:2], logps[2:], method=method, ref_chosen_logps=ref_logps[:2],
                                         ref_rejected_logps=ref_logps[2:], **(extras if method == "odpo" else {}))
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-15)


def test_timed_returns_milliseconds_per_repeat_after_a_warm_up(monkeypatch):
    clock, calls = [0.0], []

    def fn():
        calls.append(None)
        clock[0] += 0.002  # each call takes 2 ms of the fake clock
        return len(calls)

    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock[0])
    out, ms = demo.timed(fn, 4)
    assert len(calls) == 5 and out == 5
    assert ms == pytest.approx(2.0)


def test_demo_table_reports_the_op_the_fp64_reference_and_eager_fp32(monkeypatch, capsys):
    """Each row: the op in fp32, the reference in fp64 and the reference in fp32 (eager), and the printed
    differences and worst relative difference are those of the op against the fp64 reference."""
    calls = {}
    run_method = demo.run_method

    def spy(method, logits, ref_logits, labels, extras, impl, repeats):
        result = run_method(method, logits, ref_logits, labels, extras, impl, repeats)
        calls.setdefault(method, []).append((impl, logits.dtype, {v.dtype for v in extras.values()}, result[0]))
        return result

    monkeypatch.setattr(demo, "run_method", spy)
    demo.main(SMALL)
    out = capsys.readouterr().out
    assert list(calls) == list(ak.METHODS)
    worst = 0.0
    for method, runs in calls.items():
        assert [(impl, dtype, dtypes) for impl, dtype, dtypes, _ in runs] == [
            (ak, torch.float32, {torch.float32}), (reference, torch.float64, {torch.float64}),
            (reference, torch.float32, {torch.float32})], method
        (loss, grad), (loss64, grad64) = runs[0][3], runs[1][3]
        row = re.search(rf"^{method} +(\S+) +(\S+) +(\S+) +(\S+) ", out, re.M).groups()
        diff = abs(loss.double() - loss64).item()
        assert float(row[0]) == pytest.approx(loss.item(), abs=1e-6)
        assert float(row[1]) == pytest.approx(loss64.item(), abs=1e-6)
        assert float(row[2]) == pytest.approx(diff, rel=0.06, abs=1e-300)
        assert float(row[3]) == pytest.approx((grad.double() - grad64).abs().max().item(), rel=0.06)
        worst = max(worst, diff / abs(loss64.item()))
    printed = float(out.split("vs reference (fp64): ")[1].split()[0])
    assert printed == pytest.approx(worst, rel=0.06)


def test_demo_header_and_metrics_describe_the_built_in_batch(capsys):
    demo.main(SMALL)
    out = capsys.readouterr().out
    logits, _, labels, _ = demo.built_in_batch(2, 16, 64)
    assert f"built-in batch: 2 pairs, T=16, V=64, fp32 logits (0 MiB), shifted labels, " \
           f"{int((labels != demo.IGNORE).sum())} scored tokens" in out
    stats = ak.amapo_loss_from_logits(logits, labels, shift=True, return_stats=True)[1]
    expected = ", ".join(f"{name}={value.item():.4f}" for name, value in stats.items() if value.dim() == 0)
    assert expected and f"AMaPO metrics: {expected}\n" in out
