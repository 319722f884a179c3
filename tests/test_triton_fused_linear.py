"""The Triton kernels of the fused lm_head (backend="triton") against the fp64 reference on materialized logits,
under the project's rule (k = 2 values, 3 gradients of hidden, weight and bias; see test_fused_linear.py).

On the CPU they run in Triton's interpreter, which is chosen when the kernels are decorated, i.e. when
amapo_kernels.triton_fused_linear is first imported with TRITON_INTERPRET=1 in the environment. Setting it
in this process would also switch any other Triton code of the session (inductor's kernels on a GPU) to
the interpreter, so test_interpreter_suite reruns this file in a fresh process with TRITON_INTERPRET=1,
where the `interpreted` tests run. The interpreter's tl.dot of bf16 blocks is wrong (Triton 3.8), so they
use fp32; the `cuda` tests run the compiled kernels in bf16 and fp32 on a GPU (this process).
"""

import functools
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy
import pytest
import torch
from helpers import assert_within_rule, conditioning_floor
from hypothesis import example, given
from hypothesis import strategies as st
from test_fused_linear import (
    assert_autocast_is_linears,
    assert_rule,
    fused_run,
    leaves,
    make_batch,
    masked_vocabulary,
    materialized_logits,
    method_extras,
    quantized,
    reference_run,
)

import amapo_kernels as ak
from amapo_kernels import reference as ref
from amapo_kernels.fused_linear import preference_loss_from_hidden, sequence_logps_from_hidden

triton = pytest.importorskip("triton")
tl = triton.language
from amapo_kernels import triton_fused_linear as kernels  # noqa: E402 (compiled, or interpreted under TRITON_INTERPRET)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
FP32 = torch.float32

interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_suite's TRITON_INTERPRET=1 process")


@pytest.fixture
def first_configuration(monkeypatch):
    """Pins the first autotuning configuration: each new (V, H, dtype) key would otherwise compile and time
    every configuration; test_cuda_every_configuration and test_cuda_autotuned cover the others."""
    monkeypatch.setenv("AMAPO_TRITON_CONFIG", "0")


def cuda(test, *, autotuned=False):
    """A test of the compiled kernels on a GPU (pytest -m cuda), on the first configuration unless autotuned."""
    skip = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device (compiled kernels)")
    test = pytest.mark.cuda(skip(test))
    return test if autotuned else pytest.mark.usefixtures("first_configuration")(test)


def logps_run(tensors, labels, dtype, *, upstream, fused, average, shift, softcap, **kwargs):
    """[B] log-probs and the gradients of sum_b u_b * logps_b: fused (the API) or the reference chain
    on materialized logits in `dtype`."""
    hidden, weight, bias = leaves(tensors, dtype)
    if fused:
        logps = sequence_logps_from_hidden(hidden, weight, labels, bias=bias, average=average, shift=shift,
                                           logit_softcap=softcap, **kwargs)
    else:
        logps = ref.sequence_logps(materialized_logits(hidden, weight, bias, softcap), labels, average=average,
                                   shift=shift)
        logps = logps.double() if dtype == torch.float64 else logps.float()
    total = (logps * upstream.to(logps.device, logps.dtype)).sum()
    return logps, torch.autograd.grad(total, [t for t in (hidden, weight, bias) if t is not None])


def accumulating_in_kernel(monkeypatch):
    """Routes the Triton backward to its in-kernel accumulation (the gradient filter's kernel) for the rest
    of the test; by default it takes the g-chunk + cuBLAS path unless the filter is on."""
    monkeypatch.setattr(kernels, "gradients", functools.partial(kernels.gradients, accumulate="in_kernel"))


BACKENDS = ["triton", "cublas"]  # this module's two strategies: logits in the Triton tile epilogues, or on cuBLAS


def assert_logps_rule(tensors, labels, dtype, backend="triton", **options):
    generator = torch.Generator().manual_seed(labels.shape[0])
    upstream = torch.randn(labels.shape[0], generator=generator, dtype=torch.float64)
    tensors = quantized(tensors, dtype)
    fused = logps_run(tensors, labels, dtype, upstream=upstream, fused=True, backend=backend, **options)
    runs = [logps_run(tensors, labels, d, upstream=upstream, fused=False, **options) for d in (torch.float64, dtype)]
    assert fused[0].dtype == torch.float32

    # tl.dot rounds a logit otherwise than torch's matmul, and plain torch can happen to round the few logits of
    # a short row exactly (exploration found 1.0e-7 against torch's 3.6e-9): the values' floor holds the fp64
    # chain's own change under a 1-ulp change of the inputs, as test_fused_linear's AMaPO test does. Not the
    # gradients': sums over every logit, where torch is never that lucky, and that floor hid a bias of 5x torch's
    # error (the cuBLAS backward's softmax of other logits than the forward's)
    def fp64_logps(*inputs):
        return [logps_run((*inputs, None)[:3], labels, torch.float64, upstream=upstream, fused=False, **options)[0]]

    value_floor = conditioning_floor(fp64_logps, [t for t in tensors if t is not None], dtype)
    assert_rule(fused, *runs, dtype, "logps", value_floor + [0.0] * len(fused[1]))


# ---------------------------------------------------------------------------------------------
# The interpreter run (CPU, fp32)
# ---------------------------------------------------------------------------------------------


# A loop with a runtime bound, as every kernel here has: Triton 3.6's interpreter cannot run it with
# numpy >= 2.4 (int() of a 1-element array: triton-lang/triton#9171, fixed after 3.6; measured with
# Triton 3.6.0 and numpy 2.4.6 / 2.5.5, while numpy 2.3.5 works). Such a machine (the GPU image this project
# targets has Triton 3.6 and numpy 2.5) skips the interpreter run with that reason; its compiled kernels
# are tested by the `cuda` tests.
INTERPRETER_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count_blocks(out, n, BLOCK: tl.constexpr):
    total = 0
    for _ in range(0, n, BLOCK):
        total += 1
    tl.store(out, total)

out = torch.zeros(1, dtype=torch.int32)
count_blocks[(1,)](out, 32, BLOCK=16)
assert out.item() == 2, out
"""


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher")
def test_interpreter_suite(tmp_path):
    """Runs this file's `interpreted` tests in a process with TRITON_INTERPRET=1 (CPU, fp32)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = tmp_path / "interpreter_probe.py"
    probe.write_text(INTERPRETER_PROBE)
    checked = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300)
    if checked.returncode and "only 0-dimensional arrays can be converted to Python scalars" in checked.stderr:
        import numpy

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run loops with numpy {numpy.__version__} "
                    "(triton-lang/triton#9171)")
    assert checked.returncode == 0, checked.stderr[-3000:]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda", __file__]
    begin = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - begin
    assert result.returncode == 0, f"interpreter run failed ({seconds:.0f} s):\n{result.stdout[-6000:]}{result.stderr[-3000:]}"
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]


@interpreted
@given(
    batch=st.integers(1, 5),
    steps=st.integers(1, 7),
    width=st.sampled_from([8, 20, 33]),  # below, within and across the 16-wide K blocks
    vocab=st.sampled_from([5, 37, 67]),  # never a multiple of the 16-wide vocabulary block
    shift=st.booleans(),
    average=st.booleans(),
    with_bias=st.booleans(),
    softcap=st.sampled_from([None, 4.0]),
    seed=st.integers(0, 2**20),
    backend=st.sampled_from(BACKENDS),
)
# found by exploration: the cuBLAS backward's softmax of logits from another product than the forward's (whole
# rows then) biased grad_hidden to 5.5x torch's error
@example(batch=5, steps=5, width=20, vocab=37, shift=False, average=False, with_bias=False, softcap=None, seed=5,
         backend="cublas")
# and a single token whose fp32 log-prob torch happens to round almost exactly (assert_logps_rule's values' floor)
@example(batch=1, steps=1, width=20, vocab=5, shift=False, average=False, with_bias=False, softcap=None, seed=20728,
         backend="triton")
def test_logps_match_reference(batch, steps, width, vocab, shift, average, with_bias, softcap, seed, backend):
    generator = torch.Generator().manual_seed(seed)
    hidden, weight, bias, labels = make_batch(batch, steps, width, vocab, generator=generator, with_bias=with_bias,
                                              all_ignored_rows=[1] if batch > 2 else ())
    assert_logps_rule((hidden, weight, bias), labels, FP32, backend, average=average, shift=shift, softcap=softcap)


@interpreted
@pytest.mark.parametrize("shift, with_bias, softcap", [(True, True, 4.0), (False, False, None), (True, False, None)])
def test_in_kernel_accumulation_matches_reference(monkeypatch, shift, with_bias, softcap):
    """The accumulating backward (the filter's kernel, filter off): 3 token blocks by 5 vocabulary blocks."""
    accumulating_in_kernel(monkeypatch)
    generator = torch.Generator().manual_seed(27)
    hidden, weight, bias, labels = make_batch(5, 9, 33, 67, generator=generator, with_bias=with_bias,
                                              all_ignored_rows=[2])
    assert_logps_rule((hidden, weight, bias), labels, FP32, average=True, shift=shift, softcap=softcap)


def gpu_tiles():
    """Every (BN, BV, BK) a kernel of this module runs with on a GPU: the autotuned configurations of both
    operand kinds, the accumulating kernel's blocks and the elementwise g kernel's (which has no K loop)."""
    tiles = {(c.kwargs["BN"], c.kwargs["BV"], c.kwargs["BK"]) for configs in kernels.TUNING.values() for c in configs}
    tiles |= {(b["BN"], b["BV"], b["BK"]) for b in kernels.ACCUMULATING_BLOCKS.values()}
    tiles.add((kernels.ELEMENTWISE_BLOCKS["BN"], kernels.ELEMENTWISE_BLOCKS["BV"], 16))
    return sorted(tiles)


@interpreted
@pytest.mark.parametrize("accumulate", ["matmul", "in_kernel", "cublas"])
@pytest.mark.parametrize("tile", gpu_tiles(), ids=lambda tile: "x".join(map(str, tile)))
def test_gpu_tiles_match_reference(monkeypatch, tile, accumulate):
    """The kernels with the tiles they run with on a GPU, not the interpreter's smallest ones (num_warps and
    num_stages do not exist here): two token blocks (the second partial), two K blocks (the second partial),
    vocabulary splits and backward chunks of two blocks each, the last split and chunk partial; shift, bias,
    softcap, an all-ignored row; each backward path."""
    if accumulate == "in_kernel":
        accumulating_in_kernel(monkeypatch)
    bn, bv, bk = tile
    monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", {"BN": bn, "BV": bv, "BK": bk})
    assert kernels._stats_splits(1, 1, torch.device("cpu")) == kernels._grad_chunk(1, 1, FP32) == 2 * bv
    batch = 3
    steps = (bn + bn // 2) // batch + 2  # with shift, batch * (steps - 1) >= 1.5 * BN tokens (some ignored)
    generator = torch.Generator().manual_seed(bn + bv + bk)
    hidden, weight, bias, labels = make_batch(batch, steps, bk + 17, 4 * bv + 37, generator=generator,
                                              all_ignored_rows=[1])
    backend = "cublas" if accumulate == "cublas" else "triton"
    assert_logps_rule((hidden, weight, bias), labels, FP32, backend, average=True, shift=True, softcap=4.0)


@interpreted
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vocabulary_range_masked_by_the_bias(backend):
    """A bias of -inf on the first 40 ids (V = 80): the first vocabulary split (two blocks of 16) holds no finite
    logit and the second starts with 8 more, so a split's running max stays -inf, then meets -inf again;
    values and gradients as the reference's (the fold once shifted by -inf - (-inf) = NaN)."""
    generator = torch.Generator().manual_seed(25)
    hidden, weight, bias, labels = make_batch(3, 7, 20, 80, generator=generator, all_ignored_rows=[1])
    bias, labels = masked_vocabulary(bias, labels, 40)
    assert_logps_rule((hidden, weight, bias), labels, FP32, backend, average=True, shift=True, softcap=None)


@interpreted
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ak.METHODS)
def test_every_method_matches_reference(method, backend):
    """Each method of preference_loss_from_hidden: shift, bias, softcap, an all-ignored row, 3 token blocks
    by 3 vocabulary blocks (V = 41)."""
    generator = torch.Generator().manual_seed(21)
    pairs, softcap = 3, 5.0
    hidden, weight, bias, labels = make_batch(2 * pairs, 9, 20, 41, generator=generator, all_ignored_rows=[4])
    extras, average = method_extras(method, pairs, generator)
    tensors = quantized((hidden, weight, bias), FP32)
    fused = fused_run(preference_loss_from_hidden, tensors, FP32, labels, method=method, shift=True,
                      logit_softcap=softcap, backend=backend, **extras)

    def loss_of_logps(chosen, rejected):
        cast = {k: v.to(chosen.dtype) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
        return ref.preference_loss(chosen, rejected, method=method, **cast)

    runs = [reference_run(loss_of_logps, tensors, d, labels, average=average, shift=True, softcap=softcap)
            for d in (torch.float64, FP32)]
    assert_rule(fused, *runs, FP32, method)


@triton.jit
def tanh_of(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    tl.store(out_ptr + offs, kernels._tanh(tl.load(x_ptr + offs, mask=live, other=0.0)), mask=live)


@interpreted
def test_softcap_tanh_within_its_stated_ulps():
    """The epilogue's fp32 tanh (softcap) against fp64, within 2 ulp (its docstring: 1.84 at worst in the
    interpreter), over both of its branches (the polynomial below |x| = 0.625, the exp formula above), the
    branch point, tiny and saturated arguments; NaN stays NaN."""
    sweep = torch.linspace(-4, 4, 100_001, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-8, 0.625, -0.625, 0.6249999, 9.0, -9.0, 30.0, -1e4],
                           dtype=torch.float64)
    x = torch.cat([sweep, special]).float()
    out = torch.empty_like(x)
    tanh_of[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    exact = torch.tanh(x.double())
    ulp = torch.from_numpy(numpy.spacing(exact.abs().float().numpy())).double()
    errors = (out.double() - exact).abs() / ulp
    assert errors.max() <= 2.0, (errors.max().item(), x[errors.argmax()].item())
    nan = torch.tensor([float("nan")])
    tanh_of[(1,)](nan, out, 1, BLOCK=1024)
    assert out[0].isnan()


@interpreted
def test_amapo_with_return_stats_equals_torch_backend():
    generator = torch.Generator().manual_seed(22)
    hidden, weight, bias, labels = make_batch(4, 6, 20, 37, generator=generator)
    args = (hidden.float(), weight.float(), labels)
    loss, stats = ak.amapo_loss_from_hidden(*args, bias=bias.float(), shift=True, backend="triton", return_stats=True)
    expected, expected_stats = ak.amapo_loss_from_hidden(*args, bias=bias.float(), shift=True, backend="torch",
                                                         return_stats=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(stats) == set(expected_stats)


@interpreted
@pytest.mark.parametrize("accumulate", ["matmul", "in_kernel", "cublas"])
def test_ignored_positions_and_rows(monkeypatch, accumulate):
    """All-ignored rows give 0 and no gradient; a NaN hidden state at an ignored position (or at the unused
    last position under shift) reaches neither the log-probs nor any gradient, on every backward path (the
    matmul paths' grad_W product reads hidden rows: only the scored ones may enter)."""
    if accumulate == "in_kernel":
        accumulating_in_kernel(monkeypatch)
    backend = "cublas" if accumulate == "cublas" else "triton"
    generator = torch.Generator().manual_seed(23)
    hidden, weight, bias, labels = make_batch(4, 6, 20, 37, generator=generator, all_ignored_rows=[0, 3])
    labels[2, 3] = -100
    poisoned = hidden.float().clone()
    poisoned[0] = float("nan")
    poisoned[2, 2] = float("nan")  # scores labels[2, 3] (ignored) with shift
    poisoned[:, -1] = float("nan")  # scores nothing with shift
    leaves_ = [poisoned.requires_grad_(), weight.float().requires_grad_(), bias.float().requires_grad_()]
    logps = sequence_logps_from_hidden(leaves_[0], leaves_[1], labels, bias=leaves_[2], shift=True, backend=backend)
    grads = torch.autograd.grad(logps.sum(), leaves_)
    assert torch.isfinite(logps).all() and all(torch.isfinite(g).all() for g in grads)
    assert logps[0].item() == 0.0 and logps[3].item() == 0.0
    assert torch.count_nonzero(grads[0][[0, 3]]) == 0 and torch.count_nonzero(grads[0][:, -1]) == 0
    clean = hidden.float().clone()
    clean[torch.isnan(poisoned.detach())] = 0.0
    expected = sequence_logps_from_hidden(clean, weight.float(), labels, bias=bias.float(), shift=True, backend="torch")
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-6)


@interpreted
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_scored_position_at_all(backend):
    hidden = torch.randn(2, 1, 16, requires_grad=True)
    weight = torch.randn(9, 16, requires_grad=True)
    loss = ak.amapo_loss_from_hidden(hidden, weight, torch.zeros(2, 1, dtype=torch.long), shift=True, backend=backend)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert torch.isfinite(loss) and all(torch.count_nonzero(g) == 0 for g in grads)


@interpreted
def test_strided_inputs_and_frozen_head():
    """Hidden and labels read in place through any strides; only the gradients asked for are computed."""
    generator = torch.Generator().manual_seed(24)
    hidden, weight, bias, labels = make_batch(4, 7, 20, 37, generator=generator)
    strided = hidden.float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    strided_labels = labels.t().contiguous().t()
    dense = hidden.float().requires_grad_()
    assert not strided.is_contiguous() and not strided_labels.is_contiguous()
    a = sequence_logps_from_hidden(strided, weight.float(), strided_labels, shift=True, backend="triton")
    b = sequence_logps_from_hidden(dense, weight.float(), labels, shift=True, backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), strided)[0], torch.autograd.grad(b.sum(), dense)[0])


@interpreted
def test_statistics_do_not_depend_on_the_order_of_programs(monkeypatch):
    """The interpreter runs a grid's programs in one order, a GPU in any: the statistics pass, run once and
    then with split 0's programs run again after the others, gives the same statistics, with labels on the
    boundaries of the 16-wide blocks and the 32-wide splits (a program may store only its own labels' logits)."""
    generator = torch.Generator().manual_seed(35)
    hidden, weight, bias, labels = make_batch(3, 6, 20, 67, generator=generator, ignore_prob=0.0)
    labels = torch.tensor([0, 15, 16, 31, 32, 47, 48, 63, 64, 66])[torch.arange(18) % 10].view(3, 6)
    args = (hidden.float(), weight.float(), bias.float(), labels)
    options = dict(shift=False, softcap=None, ignore_index=-100)
    once = kernels.token_stats(*args, **options)
    real_launch = kernels._launch

    def split_zero_again(name, dot_f32, grid, *launch_args, **flags):
        real_launch(name, dot_f32, grid, *launch_args, **flags)
        if name == "_stats_kernel":
            real_launch(name, dot_f32, lambda meta: (grid(meta)[0], 1), *launch_args, **flags)

    monkeypatch.setattr(kernels, "_launch", split_zero_again)
    torch.testing.assert_close(kernels.token_stats(*args, **options), once, rtol=0, atol=0)
    label_logits = [materialized_logits(*(t.to(d) for t in args[:3]), None).gather(-1, labels[..., None]).flatten()
                    for d in (torch.float64, FP32)]
    assert_within_rule(once[:, 2], *label_logits, k=2, dtype=FP32, what="label logits")


@interpreted
@pytest.mark.parametrize("accumulate", ["matmul", "in_kernel", "cublas"])
def test_feature_strides_of_hidden_and_weight(monkeypatch, accumulate):
    """Hidden whose features are not adjacent (every other column of a wider activation) and a head stored
    transposed ([H, V] storage, a tied embedding's .t()): the kernels read both through their strides, on every
    backward path, and the in-kernel accumulation writes grad_weight in its own dense layout; under the rule."""
    if accumulate == "in_kernel":
        accumulating_in_kernel(monkeypatch)
    backend = "cublas" if accumulate == "cublas" else "triton"
    generator = torch.Generator().manual_seed(33)
    hidden, weight, bias, labels = make_batch(3, 5, 20, 37, generator=generator, all_ignored_rows=[1])
    tensors = quantized((hidden, weight, bias), FP32)
    upstream = torch.randn(3, generator=generator, dtype=torch.float64)
    wide = torch.zeros(3, 5, 40, dtype=FP32)
    wide[..., ::2] = tensors[0].float()
    h = wide[..., ::2].detach().requires_grad_()
    w = tensors[1].float().t().contiguous().t().detach().requires_grad_()
    b = tensors[2].float().requires_grad_()
    assert h.stride(2) == 2 and w.stride() == (1, 37)
    options = dict(average=True, shift=True, softcap=4.0)
    logps = sequence_logps_from_hidden(h, w, labels, bias=b, average=True, shift=True, logit_softcap=4.0,
                                       backend=backend)
    fused = logps, torch.autograd.grad((logps * upstream.float()).sum(), [h, w, b])
    runs = [logps_run(tensors, labels, d, upstream=upstream, fused=False, **options) for d in (torch.float64, FP32)]
    assert_rule(fused, *runs, FP32, "strided logps")


@interpreted
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_runs_its_kernels_both_ways(monkeypatch, backend):
    """backend="triton" / "cublas" reach this module in the forward and in the backward, each with
    matmuls=backend and the filter off (the two strategies and the torch tiles agree to the rule, so the
    values cannot tell which ran)."""
    calls = []
    for name in ("token_stats", "gradients"):
        def recorded(*args, _real=getattr(kernels, name), _name=name, **kwargs):
            calls.append((_name, kwargs.get("matmuls", "triton"), kwargs.get("gradient_filter", False)))
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, recorded)
    hidden, weight, _, labels = make_batch(2, 4, 16, 20, generator=torch.Generator().manual_seed(34))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    torch.autograd.grad(sequence_logps_from_hidden(h, w, labels, backend=backend).sum(), (h, w))
    assert calls == [("token_stats", backend, False), ("gradients", backend, False)]


@interpreted
@pytest.mark.parametrize("backend, gradient_filter", [("triton", False), ("triton", True), ("cublas", False)])
@pytest.mark.parametrize("layout", ["column of a matrix", "every other element", "expanded"])
def test_a_bias_view_is_read_through_its_strides(backend, gradient_filter, layout):
    """A bias that is a strided or expanded [V] view gives the values and gradients of its dense copy (the
    kernels index the bias densely: before, a column of a matrix gave log-probs off by 0.3, and an expanded
    bias read past its one element of storage)."""
    generator = torch.Generator().manual_seed(31)
    hidden, weight, _, labels = make_batch(2, 5, 16, 20, generator=generator)
    hidden, weight = hidden.float(), weight.float()
    if layout == "column of a matrix":
        storage = torch.randn(20, 2, generator=generator)
        view = lambda leaf: leaf[:, 0]  # noqa: E731
    elif layout == "every other element":
        storage = torch.randn(40, generator=generator)
        view = lambda leaf: leaf[::2]  # noqa: E731
    else:
        storage = torch.randn(1, generator=generator)
        view = lambda leaf: leaf.expand(20)  # noqa: E731

    def run(make_bias):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), storage.clone().requires_grad_()]
        logps = sequence_logps_from_hidden(leaves[0], leaves[1], labels, bias=make_bias(leaves[2]), shift=True,
                                           backend=backend, gradient_filter=gradient_filter)
        return logps, torch.autograd.grad(logps.sum(), leaves)

    assert not view(storage).is_contiguous()
    strided, dense = run(view), run(lambda leaf: view(leaf).contiguous())
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)


@interpreted
def test_deterministic_algorithms_alert_on_the_atomic_gradients():
    """torch.use_deterministic_algorithms(True) makes torch's CUDA ops with atomics raise (or warn with
    warn_only=True); so does the Triton backward where its fp32 atomic adds order the sums by scheduling: the bias
    gradient, and every gradient of the accumulating kernel (gradient_filter=True). Without them (no bias
    gradient) and on backend="torch" it runs, with the gradients of the default mode."""
    generator = torch.Generator().manual_seed(27)
    hidden, weight, bias, labels = make_batch(4, 6, 20, 37, generator=generator)

    def gradients(bias_grad=True, **kwargs):
        h, w, b = hidden.float().requires_grad_(), weight.float().requires_grad_(), bias.float()
        b.requires_grad_(bias_grad)
        loss = ak.amapo_loss_from_hidden(h, w, labels, bias=b, shift=True, **kwargs)
        return torch.autograd.grad(loss, [h, w] + [b] * bias_grad)

    expected = {(backend, bias_grad): gradients(bias_grad, backend=backend)
                for backend in ("triton", "torch") for bias_grad in (True, False)}
    alerted = [dict(backend="triton"), dict(backend="cublas"), dict(backend="triton", gradient_filter=True),
               dict(backend="triton", gradient_filter=True, bias_grad=False)]
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for kwargs in alerted:
            with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
                gradients(**kwargs)
        for backend, bias_grad in (("triton", False), ("torch", True), ("torch", False)):
            for got, want in zip(gradients(bias_grad, backend=backend), expected[backend, bias_grad]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            got = gradients(backend="triton")
        for got, want in zip(got, expected["triton", True]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@interpreted
def test_torch_compile_of_the_caller_matches_eager():
    """The Triton entry points are a graph break for a compiled caller: same loss and gradients."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(26)
    hidden, weight, bias, labels = make_batch(4, 6, 20, 37, generator=generator)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()

    def loss_fn(h, w):
        return 2.0 * ak.amapo_loss_from_hidden(h, w, labels, shift=True, backend="triton") + 1.0

    compiled_loss, eager_loss = torch.compile(loss_fn, backend="eager")(h, w), loss_fn(h, w)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=0)
    for compiled, eager in zip(torch.autograd.grad(compiled_loss, (h, w)), torch.autograd.grad(eager_loss, (h, w))):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@interpreted
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_the_operands_as_linear_does(backend):
    """Under torch.autocast the kernels take the lm_head's operands in the autocast dtype, as nn.Linear would
    (they ignored autocast: exact fp32 products where the model's own lm_head runs in half precision). fp16
    here: the interpreter's tl.dot of bf16 blocks is wrong (the module docstring)."""
    generator = torch.Generator().manual_seed(45)
    hidden, weight, bias, labels = make_batch(4, 7, 20, 37, generator=generator)
    assert_autocast_is_linears((hidden, weight, bias), labels, "cpu", torch.float16, backend)


# ---------------------------------------------------------------------------------------------
# Gradient filter: off by default, and within its documented bound when on
# ---------------------------------------------------------------------------------------------


def filter_bound(tensors, labels, upstream, *, shift, eps):
    """The bound of amapo_kernels.triton_fused_linear: every entry of d loss / d z with p < eps that is
    not a label, |coef_n| p_nv, pushed through |W| and |hidden| (|softcap'| <= 1), in fp64."""
    hidden, weight, bias = (t.double() for t in tensors)
    logits = materialized_logits(hidden, weight, bias, None)
    scored_labels = labels[:, 1:] if shift else labels
    rows = logits[:, :-1] if shift else logits
    p = rows.softmax(-1)
    scored = scored_labels != -100
    counts = scored.sum(1, keepdim=True).clamp(min=1)
    coef = (upstream[:, None] / counts) * scored  # average=True
    label_hit = torch.zeros_like(p, dtype=torch.bool)
    label_hit.scatter_(-1, scored_labels.clamp(min=0)[..., None], scored[..., None])
    dropped = (coef.abs()[..., None] * p) * ((p < eps) & ~label_hit)
    bound_hidden = torch.zeros_like(hidden)
    bound_hidden[:, : rows.shape[1]] = dropped @ weight.abs()
    bound_weight = dropped.flatten(0, 1).t() @ hidden[:, : rows.shape[1]].abs().flatten(0, 1)
    return bound_hidden, bound_weight, dropped.sum((0, 1))


@interpreted
def test_gradient_filter_bound(monkeypatch):
    """Peaked logits, as a trained LM's: the first vocabulary block holds the likely tokens and most labels,
    every other entry has p < fp32 eps. The filter changes the gradients of its kernel (it does skip tiles)
    by no more than the documented bound plus the rule's tolerance, and never the values; off by default."""
    generator = torch.Generator().manual_seed(25)
    hidden, weight, bias, labels = make_batch(4, 12, 20, 67, generator=generator, ignore_prob=0.1)
    bias[:16] += 25.0
    likely = torch.rand(labels.shape, generator=generator) < 0.9
    labels = torch.where(likely & (labels != -100), labels % 16, labels)
    tensors = quantized((hidden, weight, bias), FP32)
    upstream = torch.randn(4, generator=generator, dtype=torch.float64)
    options = dict(average=True, shift=True, softcap=None, upstream=upstream)
    filters_asked = []
    real_gradients = kernels.gradients
    monkeypatch.setattr(kernels, "gradients", lambda *args, **kwargs: filters_asked.append(
        kwargs["gradient_filter"]) or real_gradients(*args, **kwargs))
    logps_run(tensors, labels, FP32, fused=True, backend="triton", **options)
    assert filters_asked == [False], "the filter is not off by default"
    filtered = logps_run(tensors, labels, FP32, fused=True, backend="triton", gradient_filter=True, **options)
    accumulating_in_kernel(monkeypatch)
    plain = logps_run(tensors, labels, FP32, fused=True, backend="triton", **options)  # same kernel, no filter
    fp64 = logps_run(tensors, labels, torch.float64, fused=False, **options)
    same = logps_run(tensors, labels, FP32, fused=False, **options)
    torch.testing.assert_close(filtered[0], plain[0], rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(filtered[1], plain[1])), "the filter skipped no tile"
    bounds = filter_bound(tensors, labels, upstream, shift=True, eps=torch.finfo(FP32).eps)
    for name, grad, grad64, grad_same, bound in zip(("hidden", "weight", "bias"), filtered[1], fp64[1], same[1],
                                                     bounds):
        assert bound.abs().max() > 0
        # the rule on the unfiltered part, plus at most the dropped mass per element
        rule_slack = 3 * (grad_same.double() - grad64).abs().max() + 4 * torch.finfo(FP32).eps * grad64.abs().max()
        excess = (grad.double() - grad64).abs() - bound
        assert excess.max() <= rule_slack, f"grad {name}: {excess.max():.3e} beyond the bound > {rule_slack:.3e}"


@interpreted
def test_gradient_filter_keeps_every_tile_above_eps(monkeypatch):
    """The filter's threshold is the gradients' resolution (fp32 eps here), not a coarser one: every backward
    tile holds a softmax entry above eps (those outside the labels' block all below bfloat16's eps), so no
    tile may be skipped and the filtered gradients are exactly the unfiltered ones of the same in-kernel
    accumulation (and not those of the matmul path, which rounds differently)."""
    generator = torch.Generator().manual_seed(36)
    hidden, weight, bias, labels = make_batch(4, 12, 20, 67, generator=generator, ignore_prob=0.1)
    bias[:16] += 9.0  # the labels' block is likely, the others at p ~ 1e-4
    labels = torch.where(labels != -100, labels % 16, labels)
    tensors = quantized((hidden, weight, bias), FP32)
    # the kernel's tiles: blocks of BN scored tokens (in order) by blocks of BV vocabulary entries
    p = materialized_logits(*tensors, None)[:, :-1][labels[:, 1:] != -100].softmax(-1)
    bn, bv = kernels.INTERPRETER_BLOCKS["BN"], kernels.INTERPRETER_BLOCKS["BV"]
    p = torch.nn.functional.pad(p, (0, -p.shape[1] % bv, 0, -p.shape[0] % bn))
    tile_max = p.view(p.shape[0] // bn, bn, p.shape[1] // bv, bv).amax(dim=(1, 3))
    assert tile_max.min() >= 16 * torch.finfo(FP32).eps
    assert (tile_max[:, 1:] < torch.finfo(torch.bfloat16).eps).all()  # a coarser threshold would skip them
    upstream = torch.randn(4, generator=generator, dtype=torch.float64)
    options = dict(average=True, shift=True, softcap=None, upstream=upstream)
    filtered = logps_run(tensors, labels, FP32, fused=True, backend="triton", gradient_filter=True, **options)
    accumulating_in_kernel(monkeypatch)
    plain = logps_run(tensors, labels, FP32, fused=True, backend="triton", **options)
    for a, b in zip(filtered[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Backend choice and bad inputs (no kernel runs)
# ---------------------------------------------------------------------------------------------


def small():
    return torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(backend="cuda"), ValueError, "backend must be one of ['auto', 'triton', 'cublas', 'torch']"),
        (dict(backend="torch", gradient_filter=True), ValueError, "gradient_filter=True needs the Triton backend"),
        (dict(backend="cublas", gradient_filter=True), ValueError, "gradient_filter=True needs the Triton backend"),
        (dict(gradient_filter=True), ValueError, "gradient_filter=True needs the Triton backend"),  # auto on CPU
        (dict(gradient_filter=1), TypeError, "gradient_filter must be True or False, got 1"),
    ],
)
def test_bad_backend_arguments(kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        sequence_logps_from_hidden(*small(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(accumulate="cublas"), "accumulate must be 'auto', 'matmul' or 'in_kernel', got 'cublas'"),
        (dict(accumulate="matmul", gradient_filter=True), "gradient_filter=True runs on the in-kernel accumulation"),
        (dict(matmuls="cuda"), "matmuls must be one of ['triton', 'cublas'], got 'cuda'"),
        (dict(matmuls="cublas", accumulate="in_kernel"), "matmuls='cublas' recomputes the logits with cuBLAS"),
    ],
)
def test_bad_accumulate_arguments(kwargs, fragment):
    hidden, weight, labels = small()
    stats, coefs = torch.zeros(6, 2), torch.zeros(6)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        kernels.gradients(hidden, weight, None, labels, stats, coefs, shift=False, softcap=None, ignore_index=-100,
                          need_hidden=True, need_weight=True, need_bias=False, **kwargs)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter has its own blocks")
def test_pinned_configuration_variable(monkeypatch):
    monkeypatch.delenv("AMAPO_TRITON_CONFIG", raising=False)
    assert kernels._pinned_config("half") is None
    monkeypatch.setenv("AMAPO_TRITON_CONFIG", "1")
    assert kernels._pinned_config("half") is kernels.TUNING["half"][1]
    for bad in ("3", "-1", "first"):
        monkeypatch.setenv("AMAPO_TRITON_CONFIG", bad)
        with pytest.raises(ValueError, match=re.escape(f"AMAPO_TRITON_CONFIG must be 'auto' or an index below 3 "
                                                       f"(the fp32 configurations of TUNING), got {bad!r}")):
            kernels._pinned_config("fp32")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter has its own blocks")
@pytest.mark.parametrize("warn_only", [False, True])
def test_deterministic_mode_fixes_the_configuration(monkeypatch, warn_only):
    """Under torch.use_deterministic_algorithms(True) a launch does not autotune (timing can pick other tiles
    in another process, and another summation order): it runs the configuration of least shared memory of
    its operands (half: 128 x 128 x 64, 3 stages; fp32: 64 x 64 x 32, 3 stages), unless AMAPO_TRITON_CONFIG
    pins one."""
    monkeypatch.delenv("AMAPO_TRITON_CONFIG", raising=False)
    assert kernels._launch_config("half") is None
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    monkeypatch.setattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: warn_only)
    assert kernels._launch_config("half") is kernels.TUNING["half"][4]
    assert kernels._launch_config("fp32") is kernels.TUNING["fp32"][0]
    monkeypatch.setenv("AMAPO_TRITON_CONFIG", "1")
    assert kernels._launch_config("half") is kernels.TUNING["half"][1]


@pytest.mark.skipif(INTERPRETED, reason="host-side logic: once, in the launcher")
def test_tf32_only_where_torch_allows_it():
    """fp32 and mixed operands run exact fp32 dots ("ieee") unless the tensors are on CUDA and
    torch.backends.cuda.matmul.allow_tf32 is set; two equal 16-bit dtypes take the tensor cores. (_precision
    reads only dtype and is_cuda: stand-ins for CUDA tensors, so that this runs on a CPU-only machine.)"""
    def tensor(dtype, is_cuda=True):
        return types.SimpleNamespace(dtype=dtype, is_cuda=is_cuda)

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allowed in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allowed
            fp32_precision = "tf32" if allowed else "ieee"
            assert kernels._precision(tensor(FP32), tensor(FP32)) == (True, fp32_precision)
            assert kernels._precision(tensor(torch.bfloat16), tensor(FP32)) == (True, fp32_precision)
            assert kernels._precision(tensor(FP32, False), tensor(FP32, False)) == (True, "ieee")
            for half in (torch.bfloat16, torch.float16):
                assert kernels._precision(tensor(half), tensor(half))[0] is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not autotune")
def test_autotuned_configs_name_what_the_autotuner_chose():
    """For results files: each tuned (kernel, operands, V, H) with its tile and the AMAPO_TRITON_CONFIG index
    that pins it; nothing where nothing was tuned (a CPU process)."""
    before = kernels.autotuned_configs()
    if not CUDA:
        assert before == {}
    tuner = kernels._tuned("_stats_kernel", "half")
    key = (128257, 4096, "torch.bfloat16")  # a vocabulary no other test tunes
    tuner.cache[key] = kernels.TUNING["half"][4]  # as the autotuner records its choice
    try:
        assert kernels.autotuned_configs() == {
            **before,
            "_stats_kernel half V=128257 H=4096": "BN=128 BV=128 BK=64, 4 warps, 3 stages (AMAPO_TRITON_CONFIG=4)"}
    finally:
        del tuner.cache[key]


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_rejects_float64(backend):
    hidden, weight, labels = small()
    with pytest.raises(TypeError, match=re.escape(f"backend={backend!r} supports float32/bfloat16/float16; hidden")):
        sequence_logps_from_hidden(hidden.double(), weight, labels, backend=backend)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter accepts CPU tensors")
@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_on_cpu_needs_the_interpreter(backend):
    with pytest.raises(ValueError, match=re.escape(f"backend={backend!r} needs CUDA tensors, got hidden on cpu")):
        ak.amapo_loss_from_hidden(*small(), backend=backend)


def test_auto_is_torch_on_cpu(monkeypatch):
    """auto never touches the Triton kernels for CPU tensors (so CPU users need no TRITON_INTERPRET)."""
    from amapo_kernels import fused_linear

    monkeypatch.setattr(fused_linear, "_triton_kernels", lambda: pytest.fail("auto chose Triton on the CPU"))
    hidden, weight, labels = small()
    torch.testing.assert_close(sequence_logps_from_hidden(hidden, weight, labels),
                               sequence_logps_from_hidden(hidden, weight, labels, backend="torch"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The compiled path without a GPU: every kernel builds for Hopper (sm_90a) as the JIT builds it at run time
# ---------------------------------------------------------------------------------------------


@functools.cache
def hopper_build():
    """tools/triton_hopper_build.py, imported (it needs the compiled, not the interpreted, kernels)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import triton_hopper_build

    return triton_hopper_build


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not compile")
@pytest.mark.parametrize("epilogue", ["plain", "bias+softcap"])
@pytest.mark.parametrize("operands", ["bf16", "fp32", "tf32"])
def test_kernels_build_for_hopper_as_at_run_time(operands, epilogue):
    """Every kernel in every configuration it launches with, compiled (never launched) for sm_90a from the
    arguments of real calls with the JIT's run-time specialization: what the interpreter cannot check.
    Tensor cores (wgmma) for 16-bit and tf32 operands and never for exact fp32; every matmul kernel's K-loop
    software-pipelined (cp.async); shared memory within a Hopper block's; no large register spills."""
    tool = hopper_build()
    builds = tool.hopper_builds(operands, epilogue)
    tuned = len(kernels.TUNING["half" if operands == "bf16" else "fp32"])
    elementwise = ("_stats_from_logits_kernel", "_grad_from_logits_kernel")  # the kernels without tl.dot
    assert sorted(b.kernel for b in builds) == sorted([*tool.TUNED * tuned, *elementwise,
                                                       "_accumulating_backward_kernel"])
    for build in builds:
        assert build.shared <= tool.HOPPER_SHARED_MEMORY, build
        if build.kernel not in elementwise:
            assert build.pipelined, build
            assert build.wgmma == (operands != "fp32"), build
        # Measured with Triton 3.8's ptxas: at most 1760 bytes a thread (the g kernel, bf16 with softcap, 4 warps
        # of 128 x 128); a softcap epilogue in fp64 spilled 10 KB.
        assert build.spill_bytes <= 2048, build
    # the autotuner can always pick a configuration in which an SM overlaps one block's epilogue with
    # another's matmul: two blocks an SM (measured: every other bf16 configuration holds one)
    for kernel in tool.TUNED:
        assert max(b.blocks_per_sm for b in builds if b.kernel == kernel) >= 2, (kernel, builds)


@pytest.mark.skipif(INTERPRETED, reason="the GPU's host-side sizes: once, in the launcher")
@given(tokens=st.integers(1, 2**17), vocab=st.integers(1, 300_000), sms=st.sampled_from([1, 78, 114, 132]),
       itemsize=st.sampled_from([2, 4]))
def test_gpu_splits_and_chunks(monkeypatch, tokens, vocab, sms, itemsize):
    """The vocabulary splits and chunks the host computes for a GPU (the interpreter uses its own): splits
    and chunks are whole numbers of every autotuned BV, the last split starts inside the vocabulary (else its
    running max would stay -inf and the merge read NaN), the statistics pass has programs for at least half
    of 4 blocks an SM where the vocabulary allows it (splits of equal whole granules: 313 granules for 312
    wanted splits give 157 splits of two, as fast as 313 programs in two waves), and each buffer stays within
    its stated bound."""
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": sms}))
    granule = kernels.VOCAB_GRANULE
    assert all(granule % c.kwargs["BV"] == 0 for configs in kernels.TUNING.values() for c in configs)
    granules = triton.cdiv(vocab, granule)

    width = kernels._stats_splits(tokens, vocab, torch.device("cuda"))
    splits = triton.cdiv(vocab, width)
    assert width % granule == 0 and (splits - 1) * width < vocab
    token_blocks = triton.cdiv(tokens, 128)
    assert 2 * token_blocks * splits >= min(4 * sms, token_blocks * granules)

    chunk = kernels._grad_chunk(tokens, vocab, torch.float16 if itemsize == 2 else FP32)
    assert chunk % granule == 0 and granule <= chunk <= granules * granule
    assert chunk == granule or tokens * chunk * itemsize <= kernels.GRAD_TILE_BYTES
    assert kernels._cublas_chunk(tokens, vocab) == kernels._grad_chunk(tokens, vocab, FP32)  # fp32 logits


@pytest.mark.skipif(INTERPRETED, reason="a check of the build table's arithmetic: once, in the launcher")
def test_blocks_per_sm_follow_the_hopper_limits():
    """The occupancy the build table reports: registers (allocated to warps in units of 256, 16K a partition),
    shared memory (228 KiB an SM, 1 KiB reserved a block) and 64 warps, whichever binds first."""
    tool = hopper_build()

    def blocks(registers, warps, shared_kib):
        config = {"num_warps": warps, "num_stages": 3}
        return tool.Build("k", "bf16", "plain", config, True, True, shared_kib * 1024, registers, 0).blocks_per_sm

    assert blocks(255, 4, 96) == 2  # registers and shared memory both allow two
    assert blocks(255, 8, 96) == 1  # 255 registers of 8 warps: half the register file
    assert blocks(255, 4, 128) == 1  # two blocks would need 258 KiB
    assert blocks(121, 8, 0) == 2  # 121 registers round up to 128 a thread: 16 warps
    assert blocks(64, 8, 0) == 4  # the from-logits backward's bound
    assert blocks(32, 4, 0) == 16  # 64 warps
    assert blocks(16, 4, 0) == 16  # the warps bind, not the registers' 32
    assert blocks(130, 4, 0) == 3  # 130 registers round up to 136 a thread, not down to 128 (4 blocks)
    assert blocks(200, 2, 0) == 4  # registers are counted a partition at a time: 2 warps of 6400 in 16384
    assert blocks(32, 4, 113) == 2 and blocks(32, 4, 114) == 1  # 1 KiB reserved a block, of 228 KiB an SM


PTXAS_LOG = """ptxas info    : Compiling entry function 'kernel' for 'sm_90a'
ptxas info    : Function properties for kernel
    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 24 bytes cumulative stack size
"""


def fake_hopper_build(monkeypatch, ptx, log, kwargs, operands="tf32"):
    """tool.build_for_hopper with Triton's compiler replaced by one that prints `log` (as ptxas -v) and
    returns `ptx`: the reading of a build without building. Returns (build, the kwargs it compiled with)."""
    tool = hopper_build()
    compiled_with = {}

    class Kernel:
        signature = params = None

        def _pack_args(self, backend, kwargs, bound, specialization, options):
            compiled_with.update(kwargs)
            return types.SimpleNamespace(num_warps=8, num_stages=3), None, None, None

    def compile(source, target, options):
        print(log)
        return types.SimpleNamespace(asm={"ptx": ptx}, metadata=types.SimpleNamespace(shared=4096))

    monkeypatch.setattr(tool, "kernels", types.SimpleNamespace(kernel=Kernel()))
    monkeypatch.setattr(tool, "make_backend", lambda target: None)
    monkeypatch.setattr(tool, "create_function_from_signature", lambda *args: lambda *a, **k: (None, None, None))
    monkeypatch.setattr(tool, "ASTSource", lambda *args: None)
    monkeypatch.setattr(tool.triton, "compile", compile)
    return tool.build_for_hopper(tool.Launch("kernel", (), kwargs), operands, "plain"), compiled_with


@pytest.mark.skipif(INTERPRETED, reason="a check of the build table's parsing: once, in the launcher")
def test_hopper_build_reads_ptx_and_ptxas_report(monkeypatch):
    ptx = "wgmma.fence.sync.aligned;\nwgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16\ncp.async.ca.shared.global"
    kwargs = {"BN": 128, "BV": 64, "BK": 32, "PRECISION": "ieee", "SOFTCAP": False}
    build, compiled_with = fake_hopper_build(monkeypatch, ptx, PTXAS_LOG, kwargs)
    assert build.wgmma and build.pipelined  # cp.async.ca pipelines as well as cp.async.cg
    assert (build.registers, build.spill_bytes, build.shared) == (168, 36, 4096)  # stores and loads
    assert build.config == {"BN": 128, "BV": 64, "BK": 32, "num_warps": 8, "num_stages": 3}
    assert compiled_with["PRECISION"] == "tf32"  # recorded as fp32 on the CPU, built as a tf32 GPU runs it

    build, _ = fake_hopper_build(monkeypatch, "wgmma.fence.sync.aligned;\nld.global", PTXAS_LOG, {"BN": 64})
    assert not build.wgmma and not build.pipelined  # a fence is no MMA


@pytest.mark.skipif(INTERPRETED, reason="a check of the build table's parsing: once, in the launcher")
def test_hopper_build_without_a_spill_report_is_an_error(monkeypatch):
    log = PTXAS_LOG.replace("20 bytes spill stores, ", "")
    with pytest.raises(RuntimeError, match="no ptxas -v report"):
        fake_hopper_build(monkeypatch, "", log, {})


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels in bf16 and fp32 at larger sizes
# ---------------------------------------------------------------------------------------------


def cuda_batch(batch, steps, width, vocab, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    hidden, weight, bias, labels = make_batch(batch, steps, width, vocab, generator=generator,
                                              all_ignored_rows=[1])
    hidden, weight, bias = (t.cuda() for t in quantized((hidden, weight, bias), dtype))
    return (hidden, weight, bias), labels.cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 129, 256, 4097), (2, 300, 1024, 32003)])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("backend", BACKENDS)
@cuda
def test_cuda_logps_match_reference(shape, dtype, softcap, backend):
    torch.backends.cuda.matmul.allow_tf32 = False
    tensors, labels = cuda_batch(*shape, seed=shape[1], dtype=dtype)
    assert_logps_rule(tensors, labels, dtype, backend, average=True, shift=True, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@cuda
def test_cuda_a_vocabulary_range_masked_by_the_bias(dtype, backend):
    """The first 5000 of 32003 ids masked by a bias of -inf: whole vocabulary splits and chunks of the GPU's
    sizes with no finite logit."""
    torch.backends.cuda.matmul.allow_tf32 = False
    (hidden, weight, bias), labels = cuda_batch(2, 300, 1024, 32003, seed=26, dtype=dtype)
    bias, labels = masked_vocabulary(bias, labels, 5000)
    assert_logps_rule((hidden, weight, bias), labels, dtype, backend, average=True, shift=True, softcap=None)


def operands_of(dtype):
    return "fp32" if dtype == torch.float32 else "half"


@pytest.mark.parametrize("dtype, index", [(d, i) for d in (torch.bfloat16, torch.float32)
                                          for i in range(len(kernels.TUNING[operands_of(d)]))])
@cuda
def test_cuda_every_configuration_matches_reference(monkeypatch, dtype, index):
    """Each autotuning configuration alone: its masks at V and H not multiples of its blocks, its splits
    and g chunks."""
    monkeypatch.setenv("AMAPO_TRITON_CONFIG", str(index))
    tensors, labels = cuda_batch(3, 150, 320, 5001, seed=index, dtype=dtype)
    assert_logps_rule(tensors, labels, dtype, average=True, shift=True, softcap=30.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@functools.partial(cuda, autotuned=True)
def test_cuda_autotuned_matches_reference(dtype):
    """The autotuner's trials run the kernels several times on the real arguments: the bias gradient's
    atomics must be reset between them (reset_to_zero), and the tuned launch must equal the reference."""
    tensors, labels = cuda_batch(3, 150, 320, 5003, seed=9, dtype=dtype)
    assert tensors[2] is not None
    assert_logps_rule(tensors, labels, dtype, average=True, shift=True, softcap=None)


@pytest.mark.parametrize("backend", BACKENDS)
@cuda
def test_cuda_autocast_casts_the_operands_as_linear_does(backend):
    tensors, labels = cuda_batch(3, 150, 320, 5001, seed=12, dtype=torch.float32)
    assert_autocast_is_linears(tensors, labels, "cuda", torch.bfloat16, backend)


@pytest.mark.parametrize("method", ["amapo", "dpo", "simpo"])
@cuda
def test_cuda_methods_bf16(method):
    dtype = torch.bfloat16
    tensors, labels = cuda_batch(6, 200, 512, 8191, seed=3, dtype=dtype)
    extras, average = method_extras(method, 3, torch.Generator().manual_seed(4))
    extras = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
    fused = fused_run(preference_loss_from_hidden, tensors, dtype, labels, method=method, shift=True, **extras)

    def loss_of_logps(chosen, rejected):
        cast = {k: v.to(chosen.dtype) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
        return ref.preference_loss(chosen, rejected, method=method, **cast)

    runs = [reference_run(loss_of_logps, tensors, d, labels, average=average, shift=True)
            for d in (torch.float64, dtype)]
    assert_rule(fused, *runs, dtype, method)


@cuda
def test_cuda_auto_is_triton_and_never_materializes_logits(monkeypatch):
    from amapo_kernels import fused_linear

    calls = []
    real = fused_linear._triton_kernels
    monkeypatch.setattr(fused_linear, "_triton_kernels", lambda: calls.append(1) or real())
    tensors, labels = cuda_batch(4, 1024, 256, 32000, seed=5, dtype=torch.bfloat16)
    hidden, weight, _ = leaves(tensors, torch.bfloat16)  # cuda_batch keeps fp64 values, which auto leaves to torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ak.amapo_loss_from_hidden(hidden, weight, labels, shift=True).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert calls, "auto did not choose the Triton kernels for CUDA tensors"
    logits_bytes = 4 * 1023 * 32000 * 2
    # the gradients themselves, the scored rows' fp32 accumulator and bf16 copy, one g chunk and O(B*T)
    # statistics; no [B, T, V]
    allowed = 2 * (hidden.numel() + weight.numel()) + 6 * hidden.numel() + kernels.GRAD_TILE_BYTES + 4 * 2**20
    assert extra <= allowed and extra < logits_bytes / 2, (extra, allowed)


@cuda
def test_cuda_cublas_backend_holds_bounded_chunks_of_logits():
    """backend="cublas" writes fp32 logits, but never more than one chunk of them at a time: GRAD_TILE_BYTES
    (and in the backward g's half of it)."""
    tensors, labels = cuda_batch(4, 1024, 256, 32000, seed=7, dtype=torch.bfloat16)
    hidden, weight, _ = leaves(tensors, torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ak.amapo_loss_from_hidden(hidden, weight, labels, shift=True, backend="cublas").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    fp32_logits_bytes = 4 * 1023 * 32000 * 4
    allowed = 2 * (hidden.numel() + weight.numel()) + 6 * hidden.numel() + 2 * kernels.GRAD_TILE_BYTES + 4 * 2**20
    assert extra <= allowed and extra < fp32_logits_bytes / 2, (extra, allowed)


@cuda
def test_cuda_gradient_filter_bound():
    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(6)
    hidden, weight, bias, labels = make_batch(4, 128, 256, 4099, generator=generator, ignore_prob=0.1)
    bias[:128] += 25.0  # peaked: the likely tokens and most labels in the first vocabulary block
    likely = torch.rand(labels.shape, generator=generator) < 0.9
    labels = torch.where(likely & (labels != -100), labels % 128, labels).cuda()
    tensors = tuple(t.cuda() for t in quantized((hidden, weight, bias), dtype))
    upstream = torch.randn(4, generator=generator, dtype=torch.float64).cuda()
    options = dict(average=True, shift=True, softcap=None, upstream=upstream)
    plain = logps_run(tensors, labels, dtype, fused=True, backend="triton", **options)
    filtered = logps_run(tensors, labels, dtype, fused=True, backend="triton", gradient_filter=True, **options)
    fp64 = logps_run(tensors, labels, torch.float64, fused=False, **options)
    same = logps_run(tensors, labels, dtype, fused=False, **options)
    torch.testing.assert_close(filtered[0], plain[0], rtol=0, atol=0)
    bounds = filter_bound(tensors, labels, upstream, shift=True, eps=torch.finfo(dtype).eps)
    for name, grad, grad64, grad_same, bound in zip(("hidden", "weight", "bias"), filtered[1], fp64[1], same[1],
                                                     bounds):
        rule_slack = 3 * (grad_same.double() - grad64).abs().max() + 4 * torch.finfo(dtype).eps * grad64.abs().max()
        excess = (grad.double() - grad64).abs() - bound
        assert excess.max() <= rule_slack, f"grad {name}: {excess.max():.3e} beyond the bound > {rule_slack:.3e}"


@interpreted
def test_gradient_filter_threshold_is_the_gradients_resolution_with_mixed_dtypes(monkeypatch):
    """An fp32 hidden (and bias) with a bf16 head: grad_hidden and grad_bias are fp32, so the filter may only skip
    softmax entries below fp32's eps, not bf16's 2**-7 (32 times Cut Cross-Entropy's own bf16 threshold), which on
    flat logits (V = 256: every p ~ 1/256) drops nearly all of the softmax mass. Here no entry is below fp32's
    eps, so the filtered gradients are exactly the unfiltered ones of the same in-kernel accumulation."""
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(4, 8, 32, generator=generator)
    weight = (0.05 * torch.randn(256, 32, generator=generator)).bfloat16()
    bias = 0.1 * torch.randn(256, generator=generator)
    labels = torch.randint(0, 256, (4, 8), generator=generator)
    upstream = torch.randn(4, generator=generator)

    def run(**kwargs):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logps = sequence_logps_from_hidden(leaves[0], leaves[1], labels, bias=leaves[2], shift=True,
                                           backend="triton", **kwargs)
        return torch.autograd.grad((logps * upstream).sum(), leaves)

    filtered = run(gradient_filter=True)
    accumulating_in_kernel(monkeypatch)
    plain = run()
    for name, a, b in zip(("hidden", "weight", "bias"), filtered, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"grad {name}: {m}")
