"""sequence_logps(inplace_backward=True): the same gradient, written over the logits, and never silently."""

import itertools

import pytest
import torch
from helpers import peaked_logits, random_labels
from hypothesis import given
from hypothesis import strategies as st

import amapo_kernels as ak
from amapo_kernels._ops import ops
from amapo_kernels.sequence_logps import _elements_are_distinct
from amapo_kernels.testing import LargestTensor


def inputs(device, dtype, layout="contiguous", seed=0):
    generator = torch.Generator().manual_seed(seed)
    if layout == "time_major":
        base = peaked_logits(7, 4, 61, dtype=dtype, generator=generator, device=device).transpose(0, 1)
    else:
        base = peaked_logits(4, 7, 61, dtype=dtype, generator=generator, device=device)
    labels = random_labels(4, 7, 61, ignore_prob=0.3, generator=generator, device=device, all_ignored_rows=[1])
    return base, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])  # fp64: ATen's ops on the CPU
@pytest.mark.parametrize("layout", ["contiguous", "time_major"])
@pytest.mark.parametrize("shift", [False, True])
def test_same_gradient_written_over_the_logits(device, dtype, layout, shift):
    base, labels = inputs(device, dtype, layout)
    expected_leaf = base.detach().clone().requires_grad_()
    ak.amapo_loss_from_logits(expected_leaf * 1, labels, shift=shift).backward()
    leaf = base.detach().clone().requires_grad_()
    logits = leaf * 1  # the model's output: a non-leaf buffer that the backward may overwrite
    ak.amapo_loss_from_logits(logits, labels, shift=shift, inplace_backward=True).backward()
    # Rows that score nothing hold exact zeros, not what the logits held there: the all-ignored sequence, and the
    # last step with shift. Checked directly: the out-of-place gradient compared below is a fresh buffer, whose
    # rows a backward that skips them leaves arbitrary.
    assert torch.count_nonzero(logits.detach()[1]) == 0
    if shift:
        assert torch.count_nonzero(logits.detach()[:, -1]) == 0
    assert torch.equal(leaf.grad, expected_leaf.grad)
    assert torch.equal(logits.detach(), expected_leaf.grad)


VIEWS = {  # a view of a larger logits buffer, as a trainer may pass it: (the buffer's [B, T, V], the view)
    "time slice": ((4, 8, 61), lambda x: x[:, :-1]),
    "every other step": ((4, 14, 61), lambda x: x[:, ::2]),
    "vocabulary sub-range": ((4, 7, 64), lambda x: x[:, :, 1:62]),
}


@pytest.mark.parametrize("view", VIEWS)
def test_same_gradient_written_over_a_view(device, view):
    """Non-overlapping views that are not contiguous are accepted (they were refused as possibly overlapping,
    torch's own check answering "too hard to tell"), and the gradient lands in the viewed elements only."""
    shape, take = VIEWS[view]
    generator = torch.Generator().manual_seed(5)
    base = peaked_logits(*shape, dtype=torch.float32, generator=generator, device=device)
    labels = random_labels(4, 7, 61, ignore_prob=0.3, generator=generator, device=device)
    expected_leaf = base.detach().clone().requires_grad_()
    ak.amapo_loss_from_logits(take(expected_leaf * 1), labels, shift=True).backward()
    leaf = base.detach().clone().requires_grad_()
    logits = take(leaf * 1)
    assert not logits.is_contiguous()
    ak.amapo_loss_from_logits(logits, labels, shift=True, inplace_backward=True).backward()
    assert torch.equal(leaf.grad, expected_leaf.grad)


@given(layout=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 12)), min_size=1, max_size=3))
def test_distinct_elements_are_proven_only_when_true(layout):
    """The stride proof never calls overlapping elements distinct (every offset enumerated), and takes every
    permutation of a dense layout."""
    sizes, strides = zip(*layout)
    offsets = [sum(i * stride for i, stride in zip(index, strides))
               for index in itertools.product(*(range(size) for size in sizes))]
    view = torch.empty(max(offsets) + 1).as_strided(sizes, strides)
    if _elements_are_distinct(view):
        assert len(set(offsets)) == len(offsets), layout
    for order in itertools.permutations(range(len(sizes))):
        assert _elements_are_distinct(torch.empty(sizes).permute(order))


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


@pytest.mark.parametrize("halves", ["slices", "chunk"])
def test_raises_on_two_views_of_one_buffer(device, halves):
    """The chosen and rejected halves of concatenated logits, each with inplace_backward=True: the first backward
    writes its half, and the second, whose view shares the buffer's version counter (and, for chunk's views,
    may not be written in place at all), raises instead of computing. One call on the whole logits works."""
    base, labels = inputs(device, torch.float32)
    logits = base.clone().requires_grad_() * 1
    chosen, rejected = logits.chunk(2) if halves == "chunk" else (logits[:2], logits[2:])
    margin = (ak.sequence_logps(chosen, labels[:2], inplace_backward=True)
              - ak.sequence_logps(rejected, labels[2:], inplace_backward=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified inplace"):
        margin.sum().backward()


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


@pytest.mark.parametrize("view", [False, True])
def test_refuses_a_leaf_that_requires_grad(view):
    """Writing the gradient over a leaf that requires grad (or a view of one) destroyed the leaf's values and left
    leaf.grad aliasing leaf (an optimizer step then computed from the gradient); torch refuses such an in-place
    op, and so does the wrapper, before the forward."""
    base, labels = inputs("cpu", torch.float32)
    leaf = base.clone().requires_grad_()
    logits = leaf[:2] if view else leaf
    with pytest.raises(ValueError, match="inplace_backward=True writes the gradient over the logits"):
        ak.sequence_logps(logits, labels[: logits.shape[0]], inplace_backward=True)
    with pytest.raises(ValueError, match="a leaf that requires grad"):
        ak.amapo_loss_from_logits(logits, labels[: logits.shape[0]], inplace_backward=True)
    assert torch.equal(leaf.detach(), base) and leaf.grad is None
