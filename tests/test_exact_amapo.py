"""AMaPO's batch statistics are exact to fp64 rounding at any spread: loss and gradients against an exact
computation (rational gaps, mpmath at 60 digits) at spreads 1e-2, 1e-4, 1e-6 (the one-pass
(sum, sum of squares) variance once lost 4e-6 relative at 1e-6). The 2-process version is in
tests/test_distributed.py."""

import math
from fractions import Fraction

import pytest
import torch
from helpers import exact_amapo, small_spread_pairs

import amapo_kernels as ak
from amapo_kernels import reference as ref
from amapo_kernels.batch_statistics import combine_moments, local_moments

SPREADS = [1e-2, 1e-4, 1e-6]
REL = 1e-12


def assert_exact(loss, grads, exact):
    exact_loss, exact_grads = exact
    assert loss.item() == pytest.approx(exact_loss, rel=REL, abs=0)
    for grad, expected in zip(grads[0].tolist(), exact_grads):
        assert grad == pytest.approx(expected, rel=REL, abs=0)
    assert grads[1].tolist() == [-g for g in grads[0].tolist()]


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("variant", ak.VARIANTS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_one_process_is_exact(device, spread, variant, label_smoothing):
    chosen, rejected = small_spread_pairs(spread, seed=int(spread**-0.5))
    c, r = chosen.to(device).requires_grad_(), rejected.to(device).requires_grad_()
    loss, stats = ak.amapo_loss(c, r, beta=2.0, label_smoothing=label_smoothing, variant=variant, return_stats=True)
    assert torch.count_nonzero(stats["adaptive_margin"]) > 0  # the margin is exercised
    grads = torch.autograd.grad(loss, (c, r))
    exact = exact_amapo(chosen, rejected, beta=2.0, label_smoothing=label_smoothing, variant=variant)
    assert_exact(loss.cpu(), [g.cpu() for g in grads], exact)


def test_chan_combine_equals_one_shard():
    """Moments of unequal shards (one empty) merged by Chan's formula give the mean and M2 of the whole batch
    to fp64 rounding at a spread of 1e-6 around 0.3."""
    chosen, rejected = small_spread_pairs(1e-6, pairs=9, seed=3)
    d = chosen - rejected
    whole = combine_moments(local_moments(d)[None])
    shards = torch.stack([local_moments(part) for part in (d[:2], d[2:2], d[2:])])
    merged = combine_moments(shards)
    assert merged[0].item() == 9
    mean = lambda m: (m[1] + m[2]).item()  # noqa: E731
    assert mean(merged) == pytest.approx(mean(whole), rel=1e-15)
    assert merged[3].item() == pytest.approx(whole[3].item(), rel=1e-13)
    exact_m2 = float(sum((x - sum(d.tolist()) / 9) ** 2 for x in d.tolist()))  # spread 1e-6: fp64 sum is fine here
    assert merged[3].item() == pytest.approx(exact_m2, rel=1e-6)


def test_equal_gaps_have_no_spread():
    """Every d equal (to rounding-free fp64): M2 is exactly 0, so every margin is 0 without a tolerance."""
    chosen = torch.tensor([-1.2, -0.7, -2.5], dtype=torch.float64)
    loss, stats = ak.amapo_loss(chosen, chosen - 0.25, return_stats=True)
    assert stats["batch_margin_std"].item() == 0.0
    assert torch.count_nonzero(stats["adaptive_margin"]) == 0


def test_chan_combine_keeps_the_gaps_exact_around_an_empty_shard():
    """An empty shard has no data to pivot on (its pivot is 0): the combine pivots on the largest shard's, so that
    mu - d_i = (pivot - d_i) + offset keeps full fp64 precision. Pivoting on the first or smallest shard's (here
    the empty one, as the first rank's in an uneven last batch) cancels at 0.3 and leaves ~1e-9 relative at a
    spread of 1e-6."""
    chosen, rejected = small_spread_pairs(1e-6, pairs=9, seed=3)
    d = chosen - rejected
    _, pivot, offset, _ = combine_moments(torch.stack([local_moments(part) for part in (d[:0], d[:2], d[2:])]))
    exact_mean = sum(Fraction(x) for x in d.tolist()) / 9
    for x, gap in zip(d.tolist(), ((pivot - d) + offset).tolist()):
        assert gap == pytest.approx(float(exact_mean - Fraction(x)), rel=1e-13, abs=0)


def test_equal_gaps_whose_mean_rounds_have_no_spread():
    """Every d = 0.1: the fp64 mean of three 0.1's is not 0.1 (the sum rounds), so a plain two-pass variance is
    5.8e-34, not 0, and would give every pair a margin. The ops (pivot d_0: every deviation is exactly 0) and the
    fp64 reference (which tests for equal d) both give no margin: the loss is softplus(-beta * 0.1)."""
    chosen, rejected = torch.full((3,), 0.1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    d = chosen - rejected
    assert ((d - d.mean()) ** 2).sum().item() > 0  # the test can fail
    expected = math.log1p(math.exp(-2.0 * 0.1))
    for variant in ak.VARIANTS:
        loss, stats = ak.amapo_loss(chosen, rejected, variant=variant, return_stats=True)
        assert stats["batch_margin_std"].item() == 0.0 and torch.count_nonzero(stats["adaptive_margin"]) == 0
        assert torch.count_nonzero(ref.amapo_margin(chosen, rejected, variant=variant)) == 0
        for value in (loss, ref.amapo_loss(chosen, rejected, variant=variant)):
            assert value.item() == pytest.approx(expected, rel=1e-15)
