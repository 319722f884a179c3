"""What only the CPU emulation of the CUDA kernels (tests/emulated_cuda.py) checks off the GPU: results that do not
depend on the order of blocks and threads (a data race would), no read or write outside the tensors (NaN guard
bands around them); and that the emulator itself catches the defects it claims to. The CUDA kernels' functional
cases run through the emulation in every device-parametrized test, in test_cuda_kernels.py and in
test_nan_propagation.py (the CPU op's NaNs)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from emulated_cuda import BUILD, as_cpu_kernels, module
from helpers import (assert_within_rule, conditioning_floor, logits_beyond_int32, peaked_logits, random_labels,
                     softmax_grad_floor)
from hypothesis import example, given
from hypothesis import strategies as st

import amapo_kernels as ak
from amapo_kernels import reference as ref

SCHEDULES = [0, 1, 7, 12345]  # lowest thread and block first, highest first, two random orders (gpu_emulator.h)


def test_emulator_rejects_a_barrier_that_some_threads_skip():
    with pytest.raises(RuntimeError, match="different synchronization points"):
        module().run_toy("divergent_barrier", 0)


def test_emulator_shows_a_missing_barrier_as_order_dependent_results():
    runs = [module().run_toy("missing_barrier", schedule) for schedule in SCHEDULES]
    assert any(not torch.equal(runs[0], other) for other in runs[1:])
    assert (runs[0] == -1).any()  # lowest thread first: reads of shared memory no thread has written yet


def test_emulator_rejects_a_misaligned_vector_load():
    """A 16-byte load 8 bytes off: the CPU reads it, a GPU faults, the emulator says so (the kernels' vector loads
    and stores must peel each row's unaligned head, whatever its offset)."""
    with pytest.raises(RuntimeError, match="misaligned 16-byte load"):
        module().run_toy("misaligned_vector_load", 0)


def test_emulator_shuffles_like_a_warp():
    sums = module().run_toy("butterfly_sum", 0)
    assert sums.tolist() == [sum(range(0, 32))] * 32 + [sum(range(32, 64))] * 32


def test_a_build_killed_midway_does_not_block_the_next():
    """Before 2.14, torch waits forever on the lock file that a build killed midway leaves behind (CI runs this
    under torch 2.11 too: scripts/check_gpu_image_stack.sh); the next build of the emulation clears it."""
    module()
    (BUILD / "lock").touch()
    subprocess.run([sys.executable, "-c", "import emulated_cuda; emulated_cuda.module()"], cwd=Path(__file__).parent,
                   check=True, timeout=120)


def logps_and_grads(logits, labels, *, inplace, **emulation):
    """Forward and backward through the emulated CUDA kernels: (seq_logps, d sum(w * seq_logps) / d logits)."""
    with as_cpu_kernels(**emulation):
        leaf = logits.detach().clone().requires_grad_()
        out = ak.sequence_logps(leaf * 1, labels, shift=True, inplace_backward=inplace)
        weights = torch.linspace(-1, 2, logits.shape[0])
        (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
    return out.detach(), grad


@pytest.mark.parametrize("multiprocessors", [1, 132])  # one block per row; rows split across blocks
@pytest.mark.parametrize("inplace", [False, True])
def test_same_bits_whatever_the_order_of_blocks_and_threads(multiprocessors, inplace):
    """Every block and thread order, and grids capped at 1 and 3 blocks (each block then loops over many rows,
    reusing its shared memory: the grid-stride loops a GPU runs only beyond 2^20 blocks), give the same bits."""
    generator = torch.Generator().manual_seed(4)
    logits = peaked_logits(3, 5, 9001, dtype=torch.bfloat16, generator=generator)
    labels = random_labels(3, 5, 9001, ignore_prob=0.2, generator=generator, all_ignored_rows=[2])
    emulations = [dict(schedule=s, max_grid=grid) for s in SCHEDULES for grid in (2**31, 1, 3)]
    runs = [logps_and_grads(logits, labels, inplace=inplace, multiprocessors=multiprocessors, **emulation)
            for emulation in emulations]
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_amapo_loss_same_bits_whatever_the_order():
    generator = torch.Generator().manual_seed(8)
    chosen = torch.randn(1000, generator=generator, dtype=torch.float64) - 1  # > 256 pairs: loops and 4 blocks
    rejected = torch.randn(1000, generator=generator, dtype=torch.float64) - 1.3
    runs = []
    for emulation in [dict(schedule=s, max_grid=grid) for s in SCHEDULES for grid in (2**31, 1)]:
        with as_cpu_kernels(**emulation):
            c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
            loss = ak.amapo_loss(c, r, beta=2.0, label_smoothing=0.1)
            runs.append((loss.detach(), *torch.autograd.grad(loss, (c, r))))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    loss64 = ref.amapo_loss(chosen, rejected, beta=2.0, label_smoothing=0.1)
    torch.testing.assert_close(runs[0][0], loss64, rtol=1e-12, atol=0)


def guarded_logits(batch, steps, vocab, *, head, row_padding, dtype, generator):
    """Logits [B, T, V] inside a NaN-filled buffer: `head` elements before the first row (a row start that is not
    16-byte aligned), `row_padding` elements between rows, NaN after the last. Any element read outside the
    tensor turns a result into NaN; any element written outside (with a finite value) leaves a guard not NaN."""
    row = vocab + row_padding
    buffer = torch.full((head + batch * steps * row + 64,), float("nan"), dtype=dtype)
    logits = buffer[head : head + batch * steps * row].view(batch, steps, row)[..., :vocab]
    logits.copy_(peaked_logits(batch, steps, vocab, dtype=dtype, generator=generator))
    inside = torch.zeros_like(buffer, dtype=torch.bool)
    inside[head : head + batch * steps * row].view(batch, steps, row)[..., :vocab] = True
    return buffer, logits, inside


def reference_logps_and_grads(logits, labels, weights, dtype):
    """seq_logps and d sum(weights * seq_logps) / d logits by the reference in `dtype`."""
    x = logits.detach().to(dtype).requires_grad_()
    out = ref.sequence_logps(x, labels, shift=True)
    (grad,) = torch.autograd.grad(out, x, weights.to(out.dtype))
    return out, grad


@given(
    batch=st.integers(1, 3),
    steps=st.integers(2, 6),
    vocab=st.sampled_from([1, 3, 8, 31, 257, 4097, 12289]),  # 12289 on 132 SMs: 3 blocks a row, unaligned chunks
    head=st.integers(0, 9),
    row_padding=st.sampled_from([0, 1, 5, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    multiprocessors=st.sampled_from([1, 132]),
    seed=st.integers(0, 2**16),
)
@example(batch=1, steps=3, vocab=12289, head=3, row_padding=5, dtype=torch.bfloat16, multiprocessors=132, seed=0)
def test_no_access_outside_the_tensors(batch, steps, vocab, head, row_padding, dtype, multiprocessors, seed):
    """Forward and in-place backward on logits inside NaN guard bands, with the extreme labels 0 and V - 1, every
    head alignment, whole and split rows: the results are finite and within the rule, and every guard is still
    NaN."""
    generator = torch.Generator().manual_seed(seed)
    buffer, logits, inside = guarded_logits(batch, steps, vocab, head=head, row_padding=row_padding, dtype=dtype,
                                            generator=generator)
    labels = random_labels(batch, steps, vocab, ignore_prob=0.2, generator=generator)
    labels[0, -1], labels[-1, 1] = 0, vocab - 1
    weights = torch.randn(batch, generator=generator, dtype=torch.float64)
    out64, grad64 = reference_logps_and_grads(logits, labels, weights, torch.float64)
    out_same, grad_same = reference_logps_and_grads(logits, labels, weights, dtype)

    def fp64(x):
        return list(reference_logps_and_grads(x, labels, weights, torch.float64))

    conditioning = conditioning_floor(fp64, [logits.detach()], torch.float32)
    emulated = module()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out, stats = emulated.sequence_logps_fwd(logits, labels, -100, True, True, True, multiprocessors=multiprocessors)
    assert_within_rule(out, out64, out_same, k=2, dtype=acc, what="sequence_logps", conditioning=conditioning[0])
    emulated.sequence_logps_bwd(weights.to(acc), logits, labels, stats, -100, True, True, inplace=True,
                                multiprocessors=multiprocessors)
    floor = max(conditioning[1], softmax_grad_floor(weights, labels, shift=True, average=True))
    assert_within_rule(logits, grad64, grad_same, k=3, dtype=dtype, what="grad logits", conditioning=floor)
    assert buffer[~inside].isnan().all(), "a guard changed: the kernels wrote outside the tensor"


def test_label_check_is_left_out_while_a_graph_is_captured():
    """The label-range check syncs with the host, which graph capture forbids: while capturing, the forward skips
    it (check_labels=True or not), and an out-of-range label gives its sequence NaN, never a read outside the
    row; outside capture the same call raises."""
    generator = torch.Generator().manual_seed(10)
    buffer, logits, inside = guarded_logits(3, 4, 33, head=1, row_padding=3, dtype=torch.bfloat16,
                                            generator=generator)
    labels = random_labels(3, 4, 33, ignore_prob=0.0, generator=generator)
    labels[1, 2] = 33
    out, _ = module().sequence_logps_fwd(logits, labels, -100, True, True, True, capturing=True)
    assert out[1].isnan() and out[[0, 2]].isfinite().all() and buffer[~inside].isnan().all()
    with pytest.raises(ValueError, match="labels must lie"):
        module().sequence_logps_fwd(logits, labels, -100, True, True, True)


def test_offsets_beyond_int32():
    """Two sequences 2^31 + 2^20 elements apart in one (untouched, lazily mapped) buffer: the second one's rows
    lie beyond 2^31 elements, and its log-probs and in-place gradient must be right."""
    logits, labels = logits_beyond_int32()
    dense = logits.detach().clone()
    out64, grad64 = reference_logps_and_grads(dense, labels, torch.ones(2, dtype=torch.float64), torch.float64)
    emulated = module()
    out, stats = emulated.sequence_logps_fwd(logits, labels, -100, True, True, True)
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    emulated.sequence_logps_bwd(torch.ones(2), logits, labels, stats, -100, True, True, inplace=True)
    torch.testing.assert_close(logits.double(), grad64, rtol=2e-2, atol=2e-3)
