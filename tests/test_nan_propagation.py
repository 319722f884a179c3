"""A NaN or +inf logit in a scored row makes that sequence's log-prob NaN and that row's gradient NaN, on
every device alike; it never leaks into other sequences or rows, and an ignored row's NaN is not read.
(The CUDA forward once dropped NaN: its online max/sum-exp update only compares, and comparisons with
NaN are false.)"""

import pytest
import torch
from helpers import assert_within_rule, peaked_logits, random_labels, softmax_grad_floor

import amapo_kernels as ak
from amapo_kernels import reference as ref

BATCH, STEPS, VOCAB = 3, 6, 37
NAN_ROW, INF_ROW, IGNORED_NAN_ROW = (0, 2), (1, 3), (2, 4)  # (sequence, step) of the logits row


def poisoned_batch(dtype, device, shift):
    generator = torch.Generator().manual_seed(11)
    logits = peaked_logits(BATCH, STEPS, VOCAB, dtype=dtype, generator=generator)
    labels = random_labels(BATCH, STEPS, VOCAB, ignore_prob=0.0, generator=generator)
    scored = 1 if shift else 0  # logits row t scores labels[:, t + 1] with shift
    logits[NAN_ROW][5] = float("nan")
    logits[INF_ROW][VOCAB - 1] = float("inf")
    logits[IGNORED_NAN_ROW][0] = float("nan")
    labels[IGNORED_NAN_ROW[0], IGNORED_NAN_ROW[1] + scored] = -100
    return logits.to(device), labels.to(device)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])  # fp64: ATen's ops on the CPU
def test_nan_and_inf_rows_propagate_like_torch(device, dtype, shift):
    logits, labels = poisoned_batch(dtype, device, shift)
    leaf = logits.clone().requires_grad_()
    out = ak.sequence_logps(leaf, labels, shift=shift)
    (grad,) = torch.autograd.grad(out.sum(), leaf)

    assert out[:2].isnan().all(), out
    clean = logits[2:].clone()
    clean[0, IGNORED_NAN_ROW[1]] = 0.0  # the ignored row's content must not matter
    out64 = ref.sequence_logps(clean.double(), labels[2:], shift=shift)
    same = ref.sequence_logps(clean, labels[2:], shift=shift).float()
    assert_within_rule(out[2:], out64, same, k=2, dtype=dtype, what="clean sequence")

    bad_rows = torch.zeros(BATCH, STEPS, dtype=torch.bool, device=device)
    bad_rows[NAN_ROW] = bad_rows[INF_ROW] = True
    assert grad[bad_rows].isnan().all()
    assert grad[~bad_rows].isfinite().all()
    assert (grad[IGNORED_NAN_ROW] == 0).all()


def poisoned_run(device, inplace_backward):
    logits, labels = poisoned_batch(torch.float32, device, shift=True)
    leaf = logits.clone().requires_grad_()
    out = ak.sequence_logps(leaf * 1.0, labels, shift=True, inplace_backward=inplace_backward)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    return out.cpu(), grad.cpu()


CUDA_KERNELS = [  # on a GPU, and through the CPU emulation of the CUDA kernels (tests/emulated_cuda.py)
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not (torch.cuda.is_available() and ak.has_cuda_kernels()), reason="needs a CUDA device")]),
    "emulated-cuda",
]


@pytest.mark.parametrize("kernels", CUDA_KERNELS)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_cuda_matches_cpu_on_poisoned_rows(kernels, inplace_backward):
    """The CUDA kernels give the CPU op's NaNs and values on the poisoned batch."""
    out_cpu, grad_cpu = poisoned_run("cpu", inplace_backward)
    if kernels == "cuda":
        out_cuda, grad_cuda = poisoned_run("cuda", inplace_backward)
    else:
        import emulated_cuda

        with emulated_cuda.as_cpu_kernels():
            out_cuda, grad_cuda = poisoned_run("cpu", inplace_backward)
    torch.testing.assert_close(out_cuda, out_cpu, equal_nan=True)
    torch.testing.assert_close(grad_cuda, grad_cpu, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert torch.equal(grad_cuda.isnan(), grad_cpu.isnan()) and grad_cuda.isnan().any()


def test_a_nan_among_masked_logits_propagates(device):
    """A NaN among -inf logits (a masked vocabulary range), in rows long enough that the CUDA forward splits
    them across blocks on an H100 (3 chunks of 4160): the first chunks hold no finite logit, so their partial
    (max, sum of exp) states merge with -inf maxima on both sides, and the NaN must survive that merge, as it does
    the CPU op's amax. The row's log-prob and gradient are NaN; a masked row without NaN is within the rule."""
    generator = torch.Generator().manual_seed(12)
    vocab, masked = 12289, 8320
    logits = peaked_logits(2, 3, vocab, dtype=torch.bfloat16, generator=generator)
    labels = random_labels(2, 3, vocab, ignore_prob=0.0, generator=generator)
    logits[0, 1, :masked] = logits[1, 2, :masked] = float("-inf")
    logits[0, 1, 5000] = float("nan")  # in the second chunk, not thread 0's
    labels[0, 1], labels[1, 2] = masked + 7, vocab - 1
    leaf = logits.to(device).requires_grad_()
    out = ak.sequence_logps(leaf, labels.to(device))
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert out[0].isnan() and grad[0, 1].isnan().all(), (out, grad[0, 1].isnan().sum())
    assert grad[0, [0, 2]].isfinite().all() and grad[1].isfinite().all()
    results = []
    for dtype in (torch.float64, torch.bfloat16):
        x = logits[1:].to(dtype).requires_grad_()
        seq = ref.sequence_logps(x, labels[1:])
        results.append((seq, *torch.autograd.grad(seq.sum(), x)))
    (out64, grad64), (out_same, grad_same) = results
    assert_within_rule(out[1:], out64, out_same.float(), k=2, dtype=torch.float32, what="masked sequence")
    assert_within_rule(grad[1:], grad64, grad_same, k=3, dtype=torch.bfloat16, what="masked sequence grad",
                       conditioning=softmax_grad_floor(torch.ones(1), labels[1:], shift=False, average=True))
