"""sequence_logps (CPU and CUDA op) against the fp64 reference: values and gradients."""

import pytest
import torch
from helpers import (assert_within_rule, conditioning_floor, logits_beyond_int32, peaked_logits, random_labels,
                     softmax_grad_floor)
from hypothesis import given
from hypothesis import strategies as st

import amapo_kernels as ak
from amapo_kernels import reference as ref
from amapo_kernels._ops import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(batch, steps, vocab, dtype, layout, generator, device):
    """Logits in a given memory layout; every layout keeps the vocabulary dimension dense."""
    if layout == "padded_vocab":  # a slice of a wider buffer: time/batch strides are not V
        wide = peaked_logits(batch, steps, vocab + 3, dtype=dtype, generator=generator, device=device)
        return wide[..., :vocab]
    if layout == "time_major":  # [T, B, V] transposed to [B, T, V]
        return peaked_logits(steps, batch, vocab, dtype=dtype, generator=generator, device=device).transpose(0, 1)
    return peaked_logits(batch, steps, vocab, dtype=dtype, generator=generator, device=device)


def check_against_reference(logits, labels, *, average, shift, generator):
    kwargs = dict(ignore_index=-100, average=average, shift=shift)
    leaf = logits.detach().requires_grad_()
    leaf64 = logits.detach().double().requires_grad_()
    leaf_same = logits.detach().requires_grad_()
    out = ak.sequence_logps(leaf, labels, **kwargs)
    out64 = ref.sequence_logps(leaf64, labels, **kwargs)
    out_same = ref.sequence_logps(leaf_same, labels, **kwargs)
    upstream = torch.randn(logits.shape[0], generator=generator, dtype=torch.float64).to(logits.device)

    def fp64(x):
        x = x.requires_grad_()
        value = ref.sequence_logps(x, labels, **kwargs)
        return [value, *torch.autograd.grad(value, x, upstream)]

    # the kernels compute in fp32: their floor is what one fp32 rounding of the logits does to the fp64 result
    conditioning = conditioning_floor(fp64, [logits], torch.float32)
    assert out.dtype == torch.float32 and out.shape == (logits.shape[0],)
    assert_within_rule(out, out64, out_same, k=2, dtype=torch.float32, what="sequence_logps",
                       conditioning=conditioning[0])

    (grad,) = torch.autograd.grad(out, leaf, upstream.float())
    (grad64,) = torch.autograd.grad(out64, leaf64, upstream)
    (grad_same,) = torch.autograd.grad(out_same, leaf_same, upstream.to(out_same.dtype))
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    grad_floor = max(conditioning[1], softmax_grad_floor(upstream, labels, shift=shift, average=average))
    assert_within_rule(grad, grad64, grad_same, k=3, dtype=logits.dtype, what="grad logits", conditioning=grad_floor)


@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 9),
    vocab=st.sampled_from([1, 2, 7, 33, 130, 1000]),
    dtype=st.sampled_from(DTYPES),
    ignore_prob=st.sampled_from([0.0, 0.3, 1.0]),
    shift=st.booleans(),
    average=st.booleans(),
    layout=st.sampled_from(["contiguous", "padded_vocab", "time_major"]),
    seed=st.integers(0, 2**20),
)
def test_matches_reference(device, batch, steps, vocab, dtype, ignore_prob, shift, average, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = make_logits(batch, steps, vocab, dtype, layout, generator, device)
    labels = random_labels(batch, steps, vocab, ignore_prob=ignore_prob, generator=generator, device=device,
                           all_ignored_rows=[0] if batch > 1 else ())
    check_against_reference(logits, labels, average=average, shift=shift, generator=generator)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shift_on_noncontiguous_view(device, dtype):
    generator = torch.Generator().manual_seed(1)
    logits = make_logits(3, 6, 50, dtype, "time_major", generator, device)[:, 1:]  # a strided view of a view
    assert not logits.is_contiguous()
    labels = random_labels(3, 5, 50, ignore_prob=0.2, generator=generator, device=device)
    check_against_reference(logits, labels, average=True, shift=True, generator=generator)


def test_one_pair_one_step(device):
    generator = torch.Generator().manual_seed(2)
    logits = peaked_logits(2, 1, 11, dtype=torch.float32, generator=generator, device=device)
    labels = random_labels(2, 1, 11, ignore_prob=0.0, generator=generator, device=device)
    check_against_reference(logits, labels, average=True, shift=False, generator=generator)


def test_all_ignored_row_is_zero_with_zero_gradient(device):
    logits = torch.randn(2, 4, 9, device=device, requires_grad=True)
    labels = torch.tensor([[-100] * 4, [1, 2, -100, 3]], device=device)
    out = ak.sequence_logps(logits, labels, average=True)
    assert out[0].item() == 0.0 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.count_nonzero(logits.grad[0]) == 0
    assert torch.count_nonzero(logits.grad[1, 2]) == 0


def test_shift_leaves_last_step_without_gradient(device):
    logits = torch.randn(2, 5, 9, device=device, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5), device=device)
    ak.sequence_logps(logits, labels, shift=True).sum().backward()
    assert torch.count_nonzero(logits.grad[:, -1]) == 0
    assert torch.count_nonzero(logits.grad[:, :-1]) > 0


def test_deterministic(device):
    generator = torch.Generator().manual_seed(3)
    logits = peaked_logits(4, 16, 3000, dtype=torch.bfloat16, generator=generator, device=device).requires_grad_()
    labels = random_labels(4, 16, 3000, ignore_prob=0.1, generator=generator, device=device)
    runs = []
    for _ in range(2):
        out = ak.sequence_logps(logits, labels, shift=True)
        (grad,) = torch.autograd.grad(out.sum(), logits)
        runs.append((out, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("shape", [(1, 70_000, 4), (2, 8, 2**20)], ids=["one long sequence", "one-row blocks"])
def test_the_same_bits_at_any_thread_count(shape):
    """ATen splits a sum to one output of 32,768 elements or more between the threads, at points that depend on
    their number: the sum of one sequence's 70,000 log-probs, and on ATen's path (fp64; fp32 under
    AMAPO_CPU_KERNELS=aten, test_cpu_paths) the sum of exp over a vocabulary of 2^20 (one row a block). The op
    sums in one order: the same bits at 1, 2 and 3 threads (3: more than CI's cores), forward and backward, and
    within the testing rule of the fp64 reference. The labels' logits stand 5 above the rest: a log-prob near 0 shows the last bit of its sum of exp."""
    generator = torch.Generator().manual_seed(0)
    batch, steps, vocab = shape
    logits = torch.randn(shape, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    logits.scatter_(2, labels[..., None], logits.amax(2, keepdim=True) + 5)
    labels[0, 0] = -100
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.float64):
        runs = []
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                x = logits.to(dtype).requires_grad_()
                out = ak.sequence_logps(x, labels, average=False)
                runs.append((out, *torch.autograd.grad(out.sum(), x)))
        finally:
            torch.set_num_threads(threads)
        for count, run in zip((2, 3), runs[1:]):
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run)), (dtype, count, runs[0][0], run[0])
        if dtype == torch.float32:  # the blocked sums against the fp64 reference, under the testing rule
            out64, out_same = (ref.sequence_logps(logits.to(d), labels, average=False) for d in (torch.float64, dtype))
            assert_within_rule(runs[0][0], out64, out_same, k=2, dtype=dtype, what="blocked sums")


def test_float64_logits_give_float64(device):
    logits = torch.randn(2, 3, 5, dtype=torch.float64, device=device)
    labels = torch.randint(0, 5, (2, 3), device=device)
    out = ak.sequence_logps(logits, labels)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.sequence_logps(logits, labels), rtol=1e-13, atol=1e-13)


def test_reference_never_reads_an_ignored_row():
    """The fp64 reference, as the ops: an ignored position's row (all -inf, or NaN) reaches neither the
    log-prob nor the gradient (the reference once multiplied the token log-probs by the mask: NaN * 0)."""
    generator = torch.Generator().manual_seed(3)
    logits = peaked_logits(2, 5, 13, dtype=torch.float64, generator=generator)
    labels = random_labels(2, 5, 13, ignore_prob=0.0, generator=generator)
    labels[0, 1] = labels[1, 3] = -100
    logits[0, 1] = float("-inf")
    logits[1, 3] = float("nan")
    leaf = logits.clone().requires_grad_()
    expected = ak.sequence_logps(logits, labels)
    got = ref.sequence_logps(leaf, labels)
    (grad,) = torch.autograd.grad(got.sum(), leaf)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert (grad[0, 1] == 0).all() and (grad[1, 3] == 0).all() and grad.isfinite().all()


# The row kernels' layout of a row of V = 2088 (csrc/sequence_logps_cpu_rows.cpp): sums of exp in blocks of 1024
# elements, a vectorized body of V - V % 32 (AVX-512) or V - V % 16 (AVX2) elements, then a scalar tail. The CUDA
# kernels cut the same row into an unaligned head, 16-byte packs and a tail.
LAYOUT_VOCAB = 2088
LAYOUT_PLACES = [0, 1, 1023, 1024, 2047, 2048, 2079, 2080, 2081, 2087]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dominant_logit_anywhere_in_the_row_layout(device, dtype):
    """Each row's largest logit stands 200 above the rest (a confident model), at a different place of the row's
    layout: either side of a sum block's end, of the vectorized body's end, first and last. The log-probs and
    gradients are within the rule of the fp64 reference: a max that missed that logit would overflow exp
    (e^200 in fp32), and a sum of exp that dropped a block would lose the row's whole mass."""
    generator = torch.Generator().manual_seed(21)
    batch, steps = 2, len(LAYOUT_PLACES) // 2
    base = peaked_logits(batch, steps, LAYOUT_VOCAB, dtype=torch.float64, generator=generator)
    labels = random_labels(batch, steps, LAYOUT_VOCAB, ignore_prob=0.0, generator=generator)
    for row, place in enumerate(LAYOUT_PLACES):
        b, t = divmod(row, steps)
        base[b, t, place] = base[b, t].max() + 200.0
        if row % 3 == 0:
            labels[b, t] = place  # the dominant token itself: log-prob ~ 0, gradient ~ 0 (cancellation)
    logits = base.to(dtype).to(device)
    labels = labels.to(device)
    weights = torch.randn(batch, generator=generator, dtype=torch.float64)
    results = []
    for compute_dtype in (None, torch.float64, dtype):  # the op, fp64 reference, reference in the logits' dtype
        x = logits.detach().clone() if compute_dtype is None else logits.detach().to(compute_dtype)
        x.requires_grad_()
        fn = ak.sequence_logps if compute_dtype is None else ref.sequence_logps
        out = fn(x, labels, average=True)
        (grad,) = torch.autograd.grad(out, x, weights.to(out.dtype).to(out.device))
        results.append((out, grad))
    (out, grad), (out64, grad64), (out_same, grad_same) = results
    assert_within_rule(out, out64, out_same, k=2, dtype=torch.float32, what="sequence_logps")
    floor = softmax_grad_floor(weights, labels.cpu(), shift=False, average=True)
    assert_within_rule(grad, grad64, grad_same, k=3, dtype=dtype, what="grad logits", conditioning=floor)


def test_offsets_beyond_int32_on_the_cpu():
    """The CPU op on two sequences 2^31 + 2^20 elements apart in one (untouched, lazily mapped) buffer: the
    second one's rows lie beyond 2^31 elements, and its log-probs and in-place gradient must be within the rule
    (the emulated CUDA kernels have the same test in test_cuda_emulation.py)."""
    logits, labels = logits_beyond_int32()
    dense = logits.clone()
    weights = torch.tensor([0.5, -1.5])
    expected = []
    for dtype in (torch.float64, torch.bfloat16):
        x = dense.to(dtype).requires_grad_()
        out = ref.sequence_logps(x, labels, shift=True)
        expected.append((out, *torch.autograd.grad(out, x, weights.to(dtype))))
    (out64, grad64), (out_same, grad_same) = expected
    out, stats = ops.sequence_logps_fwd(logits, labels, -100, True, True)
    assert_within_rule(out, out64, out_same, k=2, dtype=torch.float32, what="sequence_logps")
    floor = softmax_grad_floor(weights, labels, shift=True, average=True)
    grad = ops.sequence_logps_bwd(weights, logits, labels, stats, -100, True, True)
    assert_within_rule(grad, grad64, grad_same, k=3, dtype=torch.bfloat16, what="grad logits", conditioning=floor)
    ops.sequence_logps_bwd_inplace(weights, logits, labels, stats, -100, True, True)
    assert_within_rule(logits, grad64, grad_same, k=3, dtype=torch.bfloat16, what="in-place grad logits",
                       conditioning=floor)
