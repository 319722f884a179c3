"""The CUDA kernels' own cases: vocabulary sizes that are not a multiple of anything, rows split across blocks,
offsets beyond 2^31 elements, bit-identical reruns, CUDA-graph capture of forward + backward. Each runs on a GPU
(`bash scripts/test.sh -m cuda`) and, where it can, through the CPU emulation of the CUDA kernels as well
(`cuda_device`: tests/emulated_cuda.py), which runs everywhere. The cross-device property tests live in the
other files; the emulation's own checks (data races, guard bands) in test_cuda_emulation.py."""

import pytest
import torch
from helpers import assert_within_rule, peaked_logits, random_labels

import amapo_kernels as ak
from amapo_kernels import reference as ref

gpu_only = pytest.mark.skipif(not (torch.cuda.is_available() and ak.has_cuda_kernels()), reason="needs a CUDA device")


def compare(logits, labels, shift):
    leaf, leaf64, same = (logits.detach().clone().requires_grad_(), logits.detach().double().requires_grad_(),
                          logits.detach().clone().requires_grad_())
    out = ak.amapo_loss_from_logits(leaf, labels, shift=shift)
    out64 = ref.amapo_loss_from_logits(leaf64, labels, shift=shift)
    same_logps = ref.sequence_logps(same, labels, shift=shift).float()
    half = same_logps.shape[0] // 2
    out_same = ref.amapo_loss(same_logps[:half], same_logps[half:])
    assert_within_rule(out, out64, out_same, k=2, dtype=torch.float32, what="loss")
    grads = [torch.autograd.grad(o, x)[0] for o, x in ((out, leaf), (out64, leaf64), (out_same, same))]
    assert_within_rule(*grads, k=3, dtype=logits.dtype, what="grad logits")


@pytest.mark.parametrize("vocab", [1, 31, 32001, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_sizes(cuda_device, vocab, dtype):
    generator = torch.Generator().manual_seed(vocab)
    logits = peaked_logits(4, 33, vocab, dtype=dtype, generator=generator, device=cuda_device)
    labels = random_labels(4, 33, vocab, ignore_prob=0.2, generator=generator, device=cuda_device,
                           all_ignored_rows=[3])
    compare(logits, labels, shift=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_split_the_vocabulary(cuda_device, dtype):
    """B*T = 6 rows cannot fill the GPU: each row's vocabulary is split across blocks and merged in order."""
    generator = torch.Generator().manual_seed(5)
    logits = peaked_logits(2, 4, 128256, dtype=dtype, generator=generator, device=cuda_device)
    labels = random_labels(2, 4, 128256, ignore_prob=0.2, generator=generator, device=cuda_device)
    compare(logits, labels, shift=True)


@pytest.mark.parametrize("steps", [4, 600])  # split rows, and one block per row
def test_float64_is_exact(cuda_device, steps):
    """fp64 logits accumulate in fp64 with the exact exp: log-probs and gradients to fp64 rounding."""
    generator = torch.Generator().manual_seed(7)
    logits = peaked_logits(2, steps, 32001, dtype=torch.float64, generator=generator, device=cuda_device)
    labels = random_labels(2, steps, 32001, ignore_prob=0.2, generator=generator, device=cuda_device)
    leaf, leaf64 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out, out64 = ak.sequence_logps(leaf, labels, shift=True), ref.sequence_logps(leaf64, labels, shift=True)
    torch.testing.assert_close(out, out64, rtol=1e-12, atol=1e-12)
    weights = torch.randn(2, dtype=torch.float64, device=cuda_device)
    grad, grad64 = (torch.autograd.grad((o * weights).sum(), x)[0] for o, x in ((out, leaf), (out64, leaf64)))
    torch.testing.assert_close(grad, grad64, rtol=1e-12, atol=1e-15)


def test_check_labels_false_gives_nan_for_an_out_of_range_label(cuda_device):
    """check_labels=False: an out-of-range label makes its sequence NaN (never an out-of-bounds read); the other
    sequences and their gradients are untouched."""
    generator = torch.Generator().manual_seed(6)
    logits = peaked_logits(4, 16, 32001, dtype=torch.bfloat16, generator=generator, device=cuda_device)
    labels = random_labels(4, 16, 32001, ignore_prob=0.1, generator=generator, device=cuda_device)
    expected = ak.sequence_logps(logits, labels, shift=True)
    labels[1, 5] = 32001
    leaf = logits.detach().clone().requires_grad_()
    out = ak.sequence_logps(leaf, labels, shift=True, check_labels=False)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert out[1].isnan() and torch.equal(out[[0, 2, 3]], expected[[0, 2, 3]])
    assert grad[[0, 2, 3]].isfinite().all()
    with pytest.raises(ValueError, match="labels must lie"):
        ak.sequence_logps(leaf, labels, shift=True)


@pytest.mark.cuda
@gpu_only
def test_check_labels_false_has_no_host_sync():
    generator = torch.Generator().manual_seed(6)
    logits = peaked_logits(4, 16, 32001, dtype=torch.bfloat16, generator=generator, device="cuda")
    labels = random_labels(4, 16, 32001, ignore_prob=0.1, generator=generator, device="cuda")
    leaf = logits.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ak.sequence_logps(leaf, labels, shift=True, check_labels=False)
        torch.autograd.grad(out.sum(), leaf)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_noncontiguous_batch_strides(cuda_device):
    generator = torch.Generator().manual_seed(1)
    wide = peaked_logits(8, 17, 5003, dtype=torch.bfloat16, generator=generator, device=cuda_device)
    logits = wide[::2, :, :5000]  # every other row, a slice of the vocabulary buffer
    labels = random_labels(4, 17, 5000, ignore_prob=0.1, generator=generator, device=cuda_device)
    compare(logits, labels, shift=True)


@pytest.mark.cuda
@gpu_only
def test_offsets_beyond_int32():
    """B*T*V = 2 * 8500 * 128256 > 2^31 elements (4.4 GB of bf16 logits): the last rows must be right."""
    batch, steps, vocab = 2, 8500, 128256
    assert batch * steps * vocab > 2**31
    torch.manual_seed(0)
    logits = torch.randn(batch, steps, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (batch, steps), device="cuda")
    labels[:, : steps - 4] = -100  # only the last positions, beyond 2^31 elements for row 1, are scored
    leaf = logits.requires_grad_()
    out = ak.sequence_logps(leaf, labels, average=False)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    tail = logits[:, -4:].detach().double()
    expected = torch.log_softmax(tail, -1).gather(-1, labels[:, -4:, None]).squeeze(-1).sum(1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    expected_grad = torch.nn.functional.one_hot(labels[:, -4:], vocab).double() - torch.softmax(tail, -1)
    torch.testing.assert_close(grad[:, -4:].double(), expected_grad, rtol=2e-2, atol=2e-3)
    assert torch.count_nonzero(grad[:, : steps - 4]) == 0


@pytest.mark.parametrize("steps", [2, 256])  # split rows, and one block per row
def test_bit_identical_reruns(cuda_device, steps):
    generator = torch.Generator().manual_seed(2)
    logits = peaked_logits(8, steps, 32000, dtype=torch.bfloat16, generator=generator, device=cuda_device)
    labels = random_labels(8, steps, 32000, ignore_prob=0.2, generator=generator, device=cuda_device)
    runs = []
    for _ in range(2):
        leaf = logits.detach().clone().requires_grad_()
        loss = ak.amapo_loss_from_logits(leaf, labels, shift=True)
        runs.append((loss, torch.autograd.grad(loss, leaf)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.cuda
@gpu_only
def test_cuda_graph_capture_of_forward_and_backward():
    """With check_labels=False (no host sync): the captured step replays to the eager result, bit for bit."""
    generator = torch.Generator().manual_seed(3)
    logits = peaked_logits(8, 128, 32000, dtype=torch.bfloat16, generator=generator, device="cuda")
    labels = random_labels(8, 128, 32000, ignore_prob=0.2, generator=generator, device="cuda")
    static = logits.detach().clone().requires_grad_()

    def step():
        static.grad = None
        loss = ak.amapo_loss_from_logits(static, labels, shift=True, check_labels=False)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    eager = logits.detach().clone().requires_grad_()
    eager_loss = ak.amapo_loss_from_logits(eager, labels, shift=True)
    eager_loss.backward()
    assert torch.equal(captured_loss, eager_loss) and torch.equal(static.grad, eager.grad)


def mixed_device_calls():
    """(name, call, message fragment) of direct op calls with one tensor on the CPU, the rest on the GPU: the
    dispatcher picks the CUDA kernel, which would read the CPU tensor's host pointer without the op's own check
    (the wrappers check first; the ops are public, and the CPU emulation cannot mix devices)."""
    from amapo_kernels._ops import ops

    logits, labels = torch.randn(2, 3, 7, device="cuda"), torch.randint(0, 7, (2, 3), device="cuda")
    _, stats = ops.sequence_logps_fwd(logits, labels, -100, True, False)
    ones, pairs = torch.ones(2, device="cuda"), torch.zeros(2, device="cuda")
    moments = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64, device="cuda")
    scalar = torch.ones((), device="cuda")
    same = "must be on the same device"
    return [
        ("labels", lambda: ops.sequence_logps_fwd(logits, labels.cpu(), -100, True, False), same),
        ("logits", lambda: ops.sequence_logps_fwd(logits.cpu(), labels, -100, True, False), same),
        ("backward grad", lambda: ops.sequence_logps_bwd(ones.cpu(), logits, labels, stats, -100, True, False), same),
        ("backward stats", lambda: ops.sequence_logps_bwd(ones, logits, labels, stats.cpu(), -100, True, False), same),
        ("backward labels", lambda: ops.sequence_logps_bwd(ones, logits, labels.cpu(), stats, -100, True, False), same),
        ("in-place grad", lambda: ops.sequence_logps_bwd_inplace(ones.cpu(), logits, labels, stats, -100, True,
                                                                 False), same),
        ("rejected", lambda: ops.amapo_loss_fwd(pairs, pairs.cpu(), moments, 2.0, 0.0, "code", "none"),
         "must be on one device"),
        ("moments", lambda: ops.amapo_loss_fwd(pairs, pairs, moments.cpu(), 2.0, 0.0, "code", "none"),
         "must be on one device"),
        ("loss grad", lambda: ops.amapo_loss_bwd(scalar.cpu(), pairs, pairs, pairs, 2.0, 0.0), "must be on one device"),
        ("margins", lambda: ops.amapo_loss_bwd(scalar, pairs, pairs, pairs.cpu(), 2.0, 0.0), "must be on one device"),
    ]


@pytest.mark.cuda
@gpu_only
@pytest.mark.parametrize("case", ["labels", "logits", "backward grad", "backward stats", "backward labels",
                                  "in-place grad", "rejected", "moments", "loss grad", "margins"])
def test_direct_op_calls_refuse_a_tensor_on_another_device(case):
    _, call, fragment = next(c for c in mixed_device_calls() if c[0] == case)
    with pytest.raises(ValueError, match=fragment):
        call()
    torch.cuda.synchronize()  # no kernel ran on a host pointer: nothing is left to fault
