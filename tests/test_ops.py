"""The registered ops: kernels per device, torch.library.opcheck, gradcheck, torch.compile."""

import functools
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from helpers import assert_within_rule, peaked_logits, random_labels

import amapo_kernels as ak
from amapo_kernels import reference as ref
from amapo_kernels._ops import ops
from amapo_kernels.amapo import batch_moments

OPS = ["sequence_logps_fwd", "sequence_logps_bwd", "amapo_loss_fwd", "amapo_loss_bwd"]


@pytest.mark.parametrize("name", OPS)
def test_cpu_kernel_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"amapo_kernels::{name}", "CPU")


@pytest.mark.skipif(os.environ.get("AMAPO_CUDA") != "1", reason="only where the build was required to compile CUDA")
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernel_registered(name):
    """CI builds with AMAPO_CUDA=1: the CUDA kernels must have compiled and registered."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"amapo_kernels::{name}", "CUDA")


def cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one Triton ships (CUDA torch wheels depend on Triton)."""
    if found := shutil.which("cuobjdump"):
        return found
    try:
        from triton import knobs
    except ImportError:
        return None
    found = knobs.nvidia.cuobjdump.path
    return found if found and os.path.isfile(found) else None


# The tests that read the compiled CUDA code: where CI requires the CUDA build (AMAPO_CUDA=1).
needs_cuda_build = pytest.mark.skipif(
    os.environ.get("AMAPO_CUDA") != "1" or cuobjdump() is None,
    reason="only where the build was required to compile CUDA, with cuobjdump at hand")


def resource_usage(binary: str) -> dict[str, dict[str, int]]:
    """{kernel: {"REG": ..., "STACK": ..., "LOCAL": ..., ...}} of a module's device code (cuobjdump -res-usage)."""
    listing = subprocess.run([cuobjdump(), "-res-usage", binary], capture_output=True, text=True, check=True).stdout
    usage, kernel = {}, None
    for line in listing.splitlines():
        if match := re.match(r"\s*Function (\S+):", line):
            kernel = match.group(1)
        elif kernel and "REG:" in line:
            usage[kernel] = {key: int(value) for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            kernel = None
    return usage


@needs_cuda_build
def test_cuda_kernels_keep_their_state_in_registers():
    """No CUDA kernel of ours spills (no stack, no local memory): the backward runs 4 blocks of 256 threads per
    SM (__launch_bounds__), so 64 registers, and with 4 loads in flight per thread bf16 spilled 86 bytes. The
    16- and 32-bit forwards fit 4 blocks per SM too (at most 64 registers), as vocab_split counts on; they are
    left unbounded because a bound changes their code (fp32 then took 64 registers instead of 32)."""
    usage = {name: u for name, u in resource_usage(ak._C.__file__).items() if "amapo" in name}
    for kernel in ("forward_rows_kernel", "backward_rows_kernel", "merge_splits_kernel", "amapo_forward_kernel",
                   "amapo_backward_kernel"):
        assert any(kernel in name for name in usage), (kernel, sorted(usage))
    spilling = {name: u for name, u in usage.items() if u["STACK"] or u["LOCAL"]}
    assert not spilling, spilling
    backward = [u["REG"] for name, u in usage.items() if "backward_rows_kernel" in name]
    assert max(backward) <= 64, backward
    forward = {name: u["REG"] for name, u in usage.items() if "forward_rows_kernel" in name and "IddE" not in name}
    assert len(forward) == 3 and max(forward.values()) <= 64, forward


@functools.cache
def instructions_by_kernel(binary: str) -> dict[str, str]:
    """{kernel: its SASS} of a module's device code (cuobjdump -sass)."""
    listing = subprocess.run([cuobjdump(), "-sass", binary], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", listing)
    return dict(zip(parts[1::2], parts[2::2]))


@needs_cuda_build
@pytest.mark.parametrize("dtype", ["c10::BFloat16", "c10::Half", "float"])
def test_cuda_row_kernels_move_16_bytes_an_access_and_use_the_fast_exp(dtype):
    """The from-logits kernels as compiled (sm_90 SASS): the forward streams logits with 16-byte
    read-only loads (LDG.E.128.CONSTANT), the backward reads and writes 16 bytes an access (LDG.E.128,
    STG.E.128), and both take exp from the MUFU unit (MUFU.EX2), as csrc/sequence_logps_kernels.cuh intends."""
    mangled = {"c10::BFloat16": "IN3c108BFloat16EfE", "c10::Half": "IN3c104HalfEfE", "float": "IffE"}[dtype]
    kernels = instructions_by_kernel(ak._C.__file__)
    forward = [sass for name, sass in kernels.items() if "forward_rows_kernel" + mangled in name]
    backward = [sass for name, sass in kernels.items() if "backward_rows_kernel" + mangled in name]
    assert len(forward) == 1 and len(backward) == 1, sorted(kernels)
    assert "LDG.E.128.CONSTANT" in forward[0] and "MUFU.EX2" in forward[0]
    assert "LDG.E.128 " in backward[0] and "STG.E.128 " in backward[0] and "MUFU.EX2" in backward[0]


def sequence_inputs(device, dtype=torch.float32, shift=False, requires_grad=True):
    generator = torch.Generator().manual_seed(11)
    logits = peaked_logits(3, 5, 17, dtype=dtype, generator=generator, device=device)
    labels = random_labels(3, 5, 17, ignore_prob=0.3, generator=generator, device=device, all_ignored_rows=[2])
    return logits.requires_grad_(requires_grad), labels


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_opcheck_sequence_logps(device, shift, average):
    logits, labels = sequence_inputs(device, shift=shift)
    torch.library.opcheck(ops.sequence_logps_fwd.default, (logits, labels, -100, average, shift))
    torch.library.opcheck(ops.sequence_logps_fwd.default, (logits, labels, -100, average, shift, False))
    seq, stats = ops.sequence_logps_fwd(logits.detach(), labels, -100, average, shift)
    grad = torch.randn_like(seq)
    torch.library.opcheck(ops.sequence_logps_bwd.default, (grad, logits.detach(), labels, stats, -100, average, shift))


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_opcheck_amapo_loss(device, variant):
    generator = torch.Generator().manual_seed(12)
    chosen = (torch.randn(6, generator=generator) - 1).to(device).requires_grad_()
    rejected = (torch.randn(6, generator=generator) - 1.2).to(device).requires_grad_()
    moments = batch_moments(chosen, rejected)
    torch.library.opcheck(ops.amapo_loss_fwd.default, (chosen, rejected, moments, 2.0, 0.1, variant, "none"))
    _, margins, _ = ops.amapo_loss_fwd(chosen.detach(), rejected.detach(), moments, 2.0, 0.1, variant, "none")
    grad = torch.tensor(1.5, device=device)
    torch.library.opcheck(ops.amapo_loss_bwd.default, (grad, chosen.detach(), rejected.detach(), margins, 2.0, 0.1))


@pytest.mark.parametrize("shift", [False, True])
def test_gradcheck_sequence_logps_fp64(shift):
    logits, labels = sequence_inputs("cpu", dtype=torch.float64, shift=shift)
    for average in (False, True):
        assert torch.autograd.gradcheck(
            lambda x: ak.sequence_logps(x, labels, average=average, shift=shift), (logits,), fast_mode=False
        )


def test_gradcheck_amapo_loss_fp64():
    """The margin is a stop-gradient, so finite differences agree with autograd only where it is locally
    constant: one pair (margin 0), and, with the batch moments held fixed, ablation no_adaptive (m = beta * mu
    on the gated pairs), which still exercises nonzero margins."""
    generator = torch.Generator().manual_seed(13)
    chosen = (torch.randn(1, generator=generator, dtype=torch.float64) - 1).requires_grad_()
    rejected = (torch.randn(1, generator=generator, dtype=torch.float64) - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, r: ak.amapo_loss(c, r, label_smoothing=0.1), (chosen, rejected))

    chosen = (torch.randn(8, generator=generator, dtype=torch.float64) - 1).requires_grad_()
    rejected = (torch.randn(8, generator=generator, dtype=torch.float64) - 1.3).requires_grad_()
    moments = batch_moments(chosen, rejected)
    for variant in ("code", "paper"):
        _, margins, _ = ops.amapo_loss_fwd(chosen, rejected, moments, 2.0, 0.1, variant, "no_adaptive")
        assert torch.count_nonzero(margins) > 0
        assert torch.autograd.gradcheck(
            lambda c, r: ops.amapo_loss_fwd(c, r, moments, 2.0, 0.1, variant, "no_adaptive")[0], (chosen, rejected)
        )


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(14)
    logits = peaked_logits(4, 6, 33, dtype=torch.float32, generator=generator)
    labels = random_labels(4, 6, 33, ignore_prob=0.2, generator=generator)

    def loss_fn(x, y):
        return ak.amapo_loss_from_logits(x, y, beta=2.0, shift=True, label_smoothing=0.05)

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_leaf, compiled_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager_loss, compiled_loss = loss_fn(eager_leaf, labels), compiled(compiled_leaf, labels)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["dpo", "simpo", "amapo"])
def test_compile_fullgraph_with_a_hyperparameter_that_changes(method):
    """A beta that changes from call to call (a schedule, a sweep) is a symbolic float to the compiler after its
    first change: the hyperparameter check takes it (math.isfinite could not: fullgraph failed), the values
    follow it, and an infinite beta is still refused."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(16)
    chosen, rejected = torch.randn(4, generator=generator) - 1, torch.randn(4, generator=generator) - 1.3
    refs = {} if method != "dpo" else {"ref_chosen_logps": chosen * 0.9, "ref_rejected_logps": rejected * 0.9}

    def loss_fn(beta):
        return ak.preference_loss(chosen, rejected, method=method, beta=beta, **refs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for beta in (1.0, 2.0, 3.5):
        torch.testing.assert_close(compiled(beta), loss_fn(beta), rtol=1e-6, atol=1e-7)
    # the check's ValueError, which the compiler reports in its own exception (whose text varies by torch version)
    with pytest.raises(Exception, match="ValueError"):
        compiled(float("inf"))


def test_compile_fullgraph_alpha_dpo_running_statistics():
    """alpha_dpo with decay > 0 under torch.compile(fullgraph=True): the state's update is replayed after each
    compiled call (the compiled run's state and losses are the eager run's), and frozen() reads without updating."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(17)

    def loss_fn(tensors, running):
        return ak.preference_loss(tensors[0], tensors[1], method="alpha_dpo", ref_chosen_logps=tensors[2],
                                  ref_rejected_logps=tensors[3], decay=0.9, running=running)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_state, compiled_state = ak.RunningStatistics(), ak.RunningStatistics()
    for _ in range(3):
        tensors = [torch.randn(6, generator=generator) - 1 for _ in range(4)]
        torch.testing.assert_close(compiled(tensors, compiled_state), loss_fn(tensors, eager_state), rtol=1e-6,
                                   atol=1e-7)
        torch.testing.assert_close(compiled_state.mean_std, eager_state.mean_std, rtol=1e-12, atol=0)
    before = compiled_state.mean_std.clone()
    with compiled_state.frozen():
        compiled(tensors, compiled_state)
    assert torch.equal(compiled_state.mean_std, before) and before[1] > 0


COMPILED = {
    "sequence_logps_from_hidden": lambda h, w, y: ak.sequence_logps_from_hidden(h, w, y, shift=True).sum(),
    "amapo_loss_from_hidden": lambda h, w, y: ak.amapo_loss_from_hidden(h, w, y, shift=True),
    "preference_loss_from_hidden": lambda h, w, y: ak.preference_loss_from_hidden(
        h, w, y, method="odpo", shift=True, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2),
        chosen_scores=torch.full((2,), 2.0), rejected_scores=torch.ones(2)),
}


@pytest.mark.parametrize("name", COMPILED)
def test_compile_fullgraph_from_hidden_and_odpo(name):
    """No data-dependent Python branch: the label-range and ODPO score checks become in-graph assertions."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(15)
    hidden = torch.randn(4, 5, 8, generator=generator)
    weight = torch.randn(13, 8, generator=generator)
    labels = random_labels(4, 5, 13, ignore_prob=0.2, generator=generator)
    fn = COMPILED[name]
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = f(h, w, labels)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    bad = labels.clone()
    bad[0, 2] = 13
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, V=13\)"):
        torch.compile(fn, fullgraph=True)(hidden, weight, bad)


def test_compiled_odpo_checks_scores():
    torch._dynamo.reset()
    zeros = torch.zeros(3)

    def odpo(chosen_scores):
        return ak.preference_loss(zeros, zeros, method="odpo", ref_chosen_logps=zeros, ref_rejected_logps=zeros,
                                  chosen_scores=chosen_scores, rejected_scores=torch.ones(3))

    compiled = torch.compile(odpo, fullgraph=True)
    torch.testing.assert_close(compiled(torch.full((3,), 2.0)), odpo(torch.full((3,), 2.0)))
    with pytest.raises(RuntimeError, match="chosen_scores must exceed rejected_scores"):
        compiled(torch.zeros(3))


class _DispatchedOps(TorchDispatchMode):
    """Records the ops that compute something (views, empty tensors and shape ops launch no kernel)."""

    NO_KERNEL = {"empty", "empty_like", "slice", "view", "_unsafe_view", "alias", "detach", "unsqueeze", "squeeze",
                 "as_strided", "select", "unbind", "split", "split_with_sizes", "expand", "t", "promote_types"}

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.split(".")[-1] not in self.NO_KERNEL:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def test_from_logits_step_dispatches_few_small_ops():
    """Every op besides the fused kernels is a kernel launch of a few microseconds on CUDA, where the loss
    step is otherwise ~1-2 ms of HBM traffic: fwd+bwd of AMaPO from logits on one process dispatches the
    two fused op pairs, the fp64 batch moments (10 ops), and the autograd glue (3), 19 in all. The batch
    moments' cross-rank combine and per-half slicing once made it 39."""
    generator = torch.Generator().manual_seed(5)
    logits = peaked_logits(4, 6, 11, dtype=torch.float32, generator=generator).requires_grad_()
    labels = random_labels(4, 6, 11, ignore_prob=0.3, generator=generator)
    with _DispatchedOps() as dispatched:
        ak.amapo_loss_from_logits(logits, labels, shift=True).backward()
    fused = [name for name in dispatched.names if name.startswith("amapo_kernels.")]
    assert fused == ["amapo_kernels.sequence_logps_fwd", "amapo_kernels.amapo_loss_fwd",
                     "amapo_kernels.amapo_loss_bwd", "amapo_kernels.sequence_logps_bwd"]
    assert len(dispatched.names) <= 19, dispatched.names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["code", "paper"])
def test_amapo_pairs_exactly_at_the_batch_mean_get_no_margin(device, dtype, variant):
    """The margin gates on d < mean (code) or z * mean > 0 (paper), strictly: a pair whose gap d equals the
    batch mean exactly, and with mean 0 every pair of the paper variant, gets margin 0, not beta * e^0. The
    gaps are small integers, so mean and gaps are exact in every dtype."""
    for gaps in ([1.0, 2.0, 3.0, 2.0], [-1.0, 0.0, 1.0, 0.0]):  # mean 2, then mean 0
        rejected = torch.tensor([-3.0, -4.5, -2.0, -6.0], dtype=torch.float64)
        chosen = rejected + torch.tensor(gaps, dtype=torch.float64)
        results = []
        for fn, compute_dtype, on in ((ak.amapo_loss, dtype, device), (ref.amapo_loss, torch.float64, "cpu"),
                                      (ref.amapo_loss, dtype, "cpu")):
            c = chosen.to(compute_dtype).to(on).requires_grad_()
            r = rejected.to(compute_dtype).to(on).requires_grad_()
            loss = fn(c, r, beta=2.0, variant=variant, label_smoothing=0.1)
            results.append((loss, *torch.autograd.grad(loss, (c, r))))
        _, stats = ak.amapo_loss(chosen.to(dtype).to(device), rejected.to(dtype).to(device), beta=2.0,
                                 variant=variant, return_stats=True)
        expected_margin = ref.amapo_margin(chosen, rejected, beta=2.0, variant=variant)
        at_mean = torch.tensor(gaps, dtype=torch.float64) == torch.tensor(gaps, dtype=torch.float64).mean()
        assert (expected_margin[at_mean] == 0).all()
        assert torch.equal(stats["adaptive_margin"].cpu().double() == 0, expected_margin == 0), stats["adaptive_margin"]
        (kernel, *kernel_grads), (fp64, *fp64_grads), (same, *same_grads) = results
        assert_within_rule(kernel, fp64, same, k=2, dtype=dtype, what="loss")
        for grad, grad64, grad_same in zip(kernel_grads, fp64_grads, same_grads):
            assert_within_rule(grad, grad64, grad_same, k=3, dtype=dtype, what="grad")
