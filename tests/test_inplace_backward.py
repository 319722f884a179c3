"""sequence_logps(inplace_backward=True): the same gradient, written over the logits, and never silently."""

import pytest
import torch
from helpers import peaked_logits, random_labels

import amapo_kernels as ak
from amapo_kernels._ops import ops
from amapo_kernels.testing import LargestTensor


def inputs(device, dtype, layout="contiguous", seed=0):
    generator = torch.Generator().manual_seed(seed)
    if layout == "time_major":
        base = peaked_logits(7, 4, 61, dtype=dtype, generator=generator, device=device).transpose(0, 1)
    else:
        base = peaked_logits(4, 7, 61, dtype=dtype, generator=generator, device=device)
    labels = random_labels(4, 7, 61, ignore_prob=0.3, generator=generator, device=device, all_ignored_rows=[1])
    return base, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
@pytest.mark.parametrize("shift", [False, True])
def test_same_gradient_written_over_the_logits(device, dtype, layout, shift):
    base, labels = inputs(device, dtype, layout)
    expected_leaf = base.detach().clone().requires_grad_()
    ak.amapo_loss_from_logits(expected_leaf * 1, labels, shift=shift).backward()
    leaf = base.detach().clone().requires_grad_()
    logits = leaf * 1  # the model's output: a non-leaf buffer that the backward may overwrite
    ak.amapo_loss_from_logits(logits, labels, shift=shift, inplace_backward=True).backward()
    assert torch.equal(leaf.grad, expected_leaf.grad)
    assert torch.equal(logits.detach(), expected_leaf.grad)


def test_backward_allocates_no_logits_sized_buffer():
    """Logits from an lm_head (hidden [4, 7, 8] x weight [61, 8]): the in-place backward creates nothing
    as large as the logits; the ordinary one does (its gradient buffer)."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 7, 8, generator=generator, requires_grad=True)
    weight = torch.randn(61, 8, generator=generator, requires_grad=True)
    labels = random_labels(4, 7, 61, ignore_prob=0.3, generator=generator)
    largest = {}
    for inplace in (True, False):
        loss = ak.amapo_loss_from_logits(hidden @ weight.t(), labels, shift=True, inplace_backward=inplace)
        with LargestTensor() as tracker:
            loss.backward()
        largest[inplace] = tracker.largest_numel
    assert largest[True] < 4 * 7 * 61 <= largest[False]


def test_raises_when_the_logits_are_needed_later(device):
    base, labels = inputs(device, torch.float32)
    logits = base.clone().requires_grad_() * 1
    other = (logits**2).mean()  # saves the logits; created first, so its backward runs after ours
    logps = ak.sequence_logps(logits, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logps.sum() + other).backward()


def test_raises_when_the_logits_changed_before_backward(device):
    base, labels = inputs(device, torch.float32)
    logits = base.clone().requires_grad_() * 1
    logps = ak.sequence_logps(logits, labels, inplace_backward=True)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logps.sum().backward()


def test_opcheck(device):
    base, labels = inputs(device, torch.float32)
    _, stats = ops.sequence_logps_fwd(base, labels, -100, True, True)
    grad = torch.randn(4, device=device)
    torch.library.opcheck(ops.sequence_logps_bwd_inplace.default, (grad, base.clone(), labels, stats, -100, True, True))


def test_compiled_caller_uses_the_ordinary_backward():
    torch._dynamo.reset()
    base, labels = inputs("cpu", torch.float32)
    compiled = torch.compile(lambda x: ak.amapo_loss_from_logits(x, labels, shift=True, inplace_backward=True),
                             fullgraph=True)
    leaf = base.clone().requires_grad_()
    compiled(leaf).backward()
    expected = base.clone().requires_grad_()
    ak.amapo_loss_from_logits(expected, labels, shift=True).backward()
    torch.testing.assert_close(leaf.grad, expected.grad)
