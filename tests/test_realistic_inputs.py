"""The benchmarks' and tests' "realistic, peaked" logits (amapo_kernels.testing.peaked_logits) are what they
claim: a few nats of entropy per position and a preferred token that holds most of the probability, at
every vocabulary size the benchmarks use. (The first version, at V = 128256, gave 7.5 nats, and its
preferred token held 0.2% of the probability.)"""

import math

import pytest
import torch
from helpers import assert_within_rule, conditioning_floor, logps_rounding_floors, random_labels, softmax_grad_floor

from amapo_kernels.testing import LargestTensor, peaked_logits


@pytest.mark.parametrize("vocab", [4096, 32000, 128256])
def test_peaked_logits_are_peaked(vocab):
    generator = torch.Generator().manual_seed(0)
    logits = peaked_logits(2, 64, vocab, dtype=torch.float32, generator=generator).double()
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top = logp.max(-1).values.exp()
    assert 2.0 <= entropy.mean().item() <= 4.5, entropy.mean()
    assert entropy.mean().item() < 0.4 * math.log(vocab)  # far from uniform
    assert 0.5 <= top.mean().item() <= 0.8, top.mean()


def test_peaked_logits_are_deterministic_in_dtype_and_temperature():
    def make(**kwargs):
        return peaked_logits(2, 8, 100, generator=torch.Generator().manual_seed(3), **kwargs)

    assert make(dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(make(dtype=torch.float64), make(dtype=torch.float64))  # every draw from the generator
    torch.testing.assert_close(make(dtype=torch.float64, temperature=2.0) * 2, make(dtype=torch.float64),
                               rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# tests/helpers.py: a bug in the tolerance rule or its floors would weaken every test that uses them
# ---------------------------------------------------------------------------------------------


def test_rule_bounds_the_worst_element_by_k_times_torchs_error():
    fp64 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    same_dtype = fp64 + torch.tensor([1e-3, 0.0], dtype=torch.float64)
    assert_within_rule(fp64 + torch.tensor([0.0, 2e-3]).double(), fp64, same_dtype, k=2, dtype=torch.float32)
    with pytest.raises(AssertionError, match="max\\|actual - fp64\\|"):
        assert_within_rule(fp64 + torch.tensor([0.0, 3e-3]).double(), fp64, same_dtype, k=2, dtype=torch.float32)


def test_rule_floor_is_ulps_of_the_dtype_at_the_largest_magnitude():
    fp64 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        floor = 4 * torch.finfo(dtype).eps * 2.0  # the rule's 4 ulps
        assert_within_rule(fp64 + 0.9 * floor, fp64, fp64, k=2, dtype=dtype)
        with pytest.raises(AssertionError):
            assert_within_rule(fp64 + 1.1 * floor, fp64, fp64, k=2, dtype=dtype)


def test_rule_floor_adds_k_times_the_conditioning():
    fp64 = torch.ones(3, dtype=torch.float64)
    assert_within_rule(fp64 + 1.9e-3, fp64, fp64, k=2, dtype=torch.float32, conditioning=1e-3)
    with pytest.raises(AssertionError):
        assert_within_rule(fp64 + 2.1e-3, fp64, fp64, k=2, dtype=torch.float32, conditioning=1e-3)


def test_rule_rejects_non_finite_output_and_a_wrong_shape():
    fp64 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_rule(torch.tensor([1.0, float("inf")]), fp64, fp64, k=2, dtype=torch.float32)
    with pytest.raises(AssertionError):  # [2, 1] against [2] would broadcast to a passing comparison
        assert_within_rule(torch.ones(2, 1), fp64, fp64, k=2, dtype=torch.float32)


def test_conditioning_floor_takes_the_worst_of_both_perturbations():
    ulp = 2.0**-23  # one fp32 ulp in [1, 2)
    x = torch.full((8,), 1.5, dtype=torch.float64)
    # every input one ulp up moves the sum by 8 ulps and the difference of halves not at all; random signs both
    halves, total = conditioning_floor(lambda v: [v[:4].sum() - v[4:].sum(), v.sum()], [x], torch.float32)
    assert 0 < halves <= 8 * ulp
    assert total == pytest.approx(8 * ulp, rel=1e-9)


def test_softmax_grad_floor_counts_the_shifted_labels():
    eps = torch.finfo(torch.float32).eps
    labels = torch.tensor([[3, 4, 5, -100], [7, -100, -100, -100]])  # shifted: 2 scored tokens, then none
    row_grads = torch.tensor([2.0, 8.0])
    assert softmax_grad_floor(row_grads, labels, shift=True, average=True) == pytest.approx(eps)
    assert softmax_grad_floor(row_grads, labels, shift=True, average=False) == pytest.approx(2 * eps)


def test_logps_rounding_floors_move_each_log_prob_by_one_fp32_ulp():
    ulp = 2.0**-20  # one fp32 ulp in [8, 16)
    logps = torch.tensor([8.5, 9.5], dtype=torch.float64)
    labels = torch.tensor([[3, 4, -100, -100], [5, 6, 7, 8]])  # 2 and 4 scored tokens (no shift)
    value, coefficient = logps_rounding_floors(lambda lp: (lp**2).sum() / 2, logps, labels, shift=False)
    # every log-prob one ulp up moves the value by (8.5 + 9.5) ulps, to first order, and each row's gradient (its
    # log-prob) by one ulp, over the row's count of scored tokens
    assert value == pytest.approx(18 * ulp, rel=1e-5)
    assert coefficient == pytest.approx(ulp / 2, rel=1e-9)


def test_random_labels_ignore_the_given_share_and_rows():
    labels = random_labels(64, 64, 10, ignore_prob=0.25, generator=torch.Generator().manual_seed(0),
                           all_ignored_rows=[1])
    assert (labels[1] == -100).all()
    ignored = (labels[2:] == -100).double().mean().item()
    assert 0.2 < ignored < 0.3, ignored
    assert ((labels == -100) | ((labels >= 0) & (labels < 10))).all()
    labels = random_labels(4, 8, 10, ignore_prob=0.0, generator=torch.Generator().manual_seed(0), all_ignored_rows=[2])
    assert (labels[2] == -100).all() and (labels[[0, 1, 3]] != -100).all()


def test_largest_tensor_counts_bytes_by_dtype_and_leaves_out_views():
    """The CPU benchmarks' memory column: bytes of the largest tensor an op allocates (a bf16 [6, 10] is 120, an fp64
    [3] is 24), not of its inputs or their views."""
    small = torch.ones(3, dtype=torch.float64)
    big = torch.ones(6, 10, dtype=torch.bfloat16)
    with LargestTensor() as tracker:
        big.view(60)
        small * 2
        big + 1
    assert (tracker.largest_numel, tracker.largest_bytes) == (60, 120)
    with LargestTensor() as tracker:
        big.view(60)
        (small * 2).double()
    assert (tracker.largest_numel, tracker.largest_bytes) == (3, 24)
