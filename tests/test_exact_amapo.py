"""AMaPO's batch statistics are exact to fp64 rounding at any spread: loss and gradients against an exact
computation (rational gaps, mpmath at 60 digits) at spreads 1e-2, 1e-4, 1e-6 (the one-pass
(sum, sum of squares) variance once lost 4e-6 relative at 1e-6). The 2-process version is in
tests/test_distributed.py."""

import pytest
import torch
from helpers import exact_amapo, small_spread_pairs

import amapo_kernels as ak
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
