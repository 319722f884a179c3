"""Losses from hidden states (amapo_kernels.fused_linear) against the fp64 reference on materialized logits.

The rule of the project: max|fused - fp64| <= k * max|torch - fp64| + floor, where torch materializes
logits = hidden @ W^T + b in the tested dtype and runs amapo_kernels.reference on them (k = 2 values,
3 gradients of hidden, weight and bias)."""

import re

import numpy
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_rule, conditioning_floor
from hypothesis import given
from hypothesis import strategies as st

import amapo_kernels as ak
from amapo_kernels.testing import LargestTensor
from amapo_kernels import reference as ref
from amapo_kernels.fused_linear import (
    amapo_loss_from_hidden,
    preference_loss_from_hidden,
    sequence_logps_from_hidden,
)
from amapo_kernels.preference import BASELINES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# Inputs and the two references
# ---------------------------------------------------------------------------------------------


def make_batch(batch, steps, width, vocab, *, generator, with_bias=True, ignore_prob=0.25, all_ignored_rows=()):
    """fp64 hidden [B, T, H], head [V, H], bias [V] with logits of a few nats' spread, and labels."""
    hidden = torch.randn(batch, steps, width, generator=generator, dtype=torch.float64)
    weight = 2.5 * torch.randn(vocab, width, generator=generator, dtype=torch.float64) / width**0.5
    bias = 0.5 * torch.randn(vocab, generator=generator, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[torch.rand(batch, steps, generator=generator) < ignore_prob] = -100
    for row in all_ignored_rows:
        labels[row] = -100
    return hidden, weight, bias, labels


def masked_vocabulary(bias, labels, masked):
    """The bias -inf on the first `masked` ids (a vocabulary range masked out: reserved or other languages'
    tokens), which no label then hits: leading vocabulary tiles with no finite logit."""
    bias = bias.clone()
    bias[:masked] = float("-inf")
    return bias, torch.where(labels == -100, labels, labels % (bias.shape[0] - masked) + masked)


def materialized_logits(hidden, weight, bias, softcap):
    """What the eager reference does: all [B, T, V] logits in the inputs' dtype."""
    logits = F.linear(hidden, weight, bias)
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def quantized(tensors, dtype):
    """The inputs rounded to the tested dtype, kept in fp64: all three computations start from these values."""
    return tuple(None if t is None else t.to(dtype).double() for t in tensors)


def leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def fused_run(loss_fn, tensors, dtype, labels, **kwargs):
    """Loss and gradients (hidden, weight[, bias]) of the fused path with inputs in `dtype`."""
    hidden, weight, bias = leaves(tensors, dtype)
    loss = loss_fn(hidden, weight, labels, bias=bias, **kwargs)
    return loss, torch.autograd.grad(loss, [t for t in (hidden, weight, bias) if t is not None])


def reference_run(loss_of_logps, tensors, dtype, labels, *, average, shift=False, softcap=None):
    """The reference chain in `dtype` for logits and token log-probs, then the loss in fp32 (the API's
    log-prob dtype; fp64 for the fp64 reference)."""
    hidden, weight, bias = leaves(tensors, dtype)
    logits = materialized_logits(hidden, weight, bias, softcap)
    logps = ref.sequence_logps(logits, labels, average=average, shift=shift)
    logps = logps.double() if dtype == torch.float64 else logps.float()
    half = logps.shape[0] // 2
    loss = loss_of_logps(logps[:half], logps[half:])
    return loss, torch.autograd.grad(loss, [t for t in (hidden, weight, bias) if t is not None])


def assert_rule(fused, fp64, same, dtype, what, conditioning=None):
    """The rule on the value and every gradient; `conditioning` (conditioning_floor's list: value, then one per
    gradient) adds the quantity's own sensitivity to a 1-ulp change of the inputs to the floor."""
    conditioning = conditioning or [0.0] * (1 + len(fused[1]))
    assert_within_rule(fused[0], fp64[0], same[0], k=2, dtype=torch.float32, what=f"{what} loss",
                       conditioning=conditioning[0])
    names = ("hidden", "weight", "bias")
    for name, grad, grad64, grad_same, floor in zip(names, fused[1], fp64[1], same[1], conditioning[1:]):
        assert grad.dtype == dtype, (name, grad.dtype)
        assert_within_rule(grad, grad64, grad_same, k=3, dtype=dtype, what=f"{what} grad {name}", conditioning=floor)


# ---------------------------------------------------------------------------------------------
# The kernel: per-sequence log-probs over shapes, tilings, dtypes, shift, bias, softcap, ignored rows
# ---------------------------------------------------------------------------------------------


@given(
    batch=st.integers(1, 5),
    steps=st.integers(1, 6),
    width=st.sampled_from([3, 8]),
    vocab=st.sampled_from([5, 37, 67]),
    token_chunk=st.integers(1, 5),
    vocab_chunk=st.sampled_from([4, 16, 64]),
    dtype=st.sampled_from(DTYPES),
    shift=st.booleans(),
    average=st.booleans(),
    with_bias=st.booleans(),
    softcap=st.sampled_from([None, 4.0]),
    seed=st.integers(0, 2**20),
)
def test_logps_match_reference(batch, steps, width, vocab, token_chunk, vocab_chunk, dtype, shift, average,
                               with_bias, softcap, seed):
    """Values of the [B] log-probs and gradients of sum_b u_b * logps_b for a fixed random u (a loss's
    upstream gradient) in hidden, weight and bias."""
    generator = torch.Generator().manual_seed(seed)
    hidden, weight, bias, labels = make_batch(batch, steps, width, vocab, generator=generator, with_bias=with_bias,
                                              all_ignored_rows=[1] if batch > 2 else ())
    hidden, weight, bias = quantized((hidden, weight, bias), dtype)
    upstream = torch.randn(batch, generator=generator, dtype=torch.float64)
    options = dict(average=average, shift=shift)

    def fused(h, w, labels, bias):
        logps = sequence_logps_from_hidden(h, w, labels, bias=bias, logit_softcap=softcap, token_chunk=token_chunk,
                                           vocab_chunk=vocab_chunk, **options)
        return logps, (logps * upstream.to(logps.dtype)).sum()

    def reference(dtype_):
        h, w, b = leaves((hidden, weight, bias), dtype_)
        logps = ref.sequence_logps(materialized_logits(h, w, b, softcap), labels, **options)
        logps = logps.double() if dtype_ == torch.float64 else logps.float()
        return logps, torch.autograd.grad((logps * upstream.to(logps.dtype)).sum(), [t for t in (h, w, b) if t is not None])

    h, w, b = leaves((hidden, weight, bias), dtype)
    logps, total = fused(h, w, labels, b)
    grads = torch.autograd.grad(total, [t for t in (h, w, b) if t is not None])
    assert logps.dtype == torch.float32
    assert_rule((logps, grads), reference(torch.float64), reference(dtype), dtype, "logps")


# ---------------------------------------------------------------------------------------------
# AMaPO end to end
# ---------------------------------------------------------------------------------------------


@given(
    pairs=st.integers(2, 4),
    steps=st.integers(3, 6),
    vocab=st.sampled_from([37, 67]),
    token_chunk=st.integers(1, 7),
    vocab_chunk=st.sampled_from([4, 16, 64]),
    dtype=st.sampled_from(DTYPES),
    shift=st.booleans(),
    softcap=st.sampled_from([None, 4.0]),
    variant=st.sampled_from(ak.VARIANTS),
    label_smoothing=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 2**20),
)
def test_amapo_matches_reference(pairs, steps, vocab, token_chunk, vocab_chunk, dtype, shift, softcap, variant,
                                 label_smoothing, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden, weight, bias, labels = make_batch(2 * pairs, steps, 8, vocab, generator=generator, ignore_prob=0.1)
    hidden, weight, bias = quantized((hidden, weight, bias), dtype)
    hp = dict(beta=2.0, variant=variant, label_smoothing=label_smoothing)
    fused = fused_run(amapo_loss_from_hidden, (hidden, weight, bias), dtype, labels, shift=shift,
                      logit_softcap=softcap, token_chunk=token_chunk, vocab_chunk=vocab_chunk, **hp)
    def chain(d, inputs):
        return reference_run(lambda c, r: ref.amapo_loss(c, r, **hp), inputs, d, labels, average=True, shift=shift,
                             softcap=softcap)

    runs = [chain(d, (hidden, weight, bias)) for d in (torch.float64, dtype)]
    # AMaPO's exp margin magnifies a 1-ulp log-prob change: the fused tiles compute in fp32, so the floor
    # holds the fp64 chain's own change under a 1-ulp fp32 change of the inputs.
    def fp64_loss_and_grads(*inputs):
        loss, grads = chain(torch.float64, inputs)
        return [loss, *grads]

    conditioning = conditioning_floor(fp64_loss_and_grads, [hidden, weight, bias], torch.float32)
    assert_rule(fused, *runs, dtype, "amapo", conditioning)


# ---------------------------------------------------------------------------------------------
# Every method of METHODS through preference_loss_from_hidden
# ---------------------------------------------------------------------------------------------


def method_extras(method, pairs, generator):
    """Reference-model log-probs (all methods accept them) and ODPO's scores."""
    average = method == "amapo" or BASELINES[method].LOGPS == "mean"
    scale = 1.5 if average else 12.0
    extras = {"ref_chosen_logps": -scale + 0.3 * torch.randn(pairs, generator=generator),
              "ref_rejected_logps": -scale - 0.2 + 0.3 * torch.randn(pairs, generator=generator)}
    if method == "amapo":
        extras = {}
    if method == "odpo":
        rejected_scores = torch.rand(pairs, generator=generator)
        extras.update(chosen_scores=rejected_scores + 0.5, rejected_scores=rejected_scores)
    return extras, average


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ak.METHODS)
def test_every_method_matches_reference(method, dtype):
    generator = torch.Generator().manual_seed(11)
    pairs = 3
    hidden, weight, bias, labels = make_batch(2 * pairs, 6, 8, 41, generator=generator, all_ignored_rows=[4])
    extras, average = method_extras(method, pairs, generator)
    hidden, weight, bias = quantized((hidden, weight, bias), dtype)
    fused = fused_run(preference_loss_from_hidden, (hidden, weight, bias), dtype, labels, method=method,
                      shift=True, token_chunk=4, vocab_chunk=16, **extras)

    def loss_of_logps(chosen, rejected):
        cast = {k: v.to(chosen.dtype) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
        return ref.preference_loss(chosen, rejected, method=method, **cast)

    runs = [reference_run(loss_of_logps, (hidden, weight, bias), d, labels, average=average, shift=True)
            for d in (torch.float64, dtype)]
    assert_rule(fused, *runs, dtype, method)


@pytest.mark.parametrize("method", ["dpo", "simpo", "amapo"])
def test_method_equals_logps_then_preference_loss(method):
    """The fused call is exactly sequence_logps_from_hidden followed by the existing preference_loss."""
    generator = torch.Generator().manual_seed(12)
    hidden, weight, bias, labels = make_batch(4, 5, 6, 23, generator=generator)
    extras, average = method_extras(method, 2, generator)
    fused = preference_loss_from_hidden(hidden.float(), weight.float(), labels, method=method, bias=bias.float(),
                                        **extras)
    logps = sequence_logps_from_hidden(hidden.float(), weight.float(), labels, bias=bias.float(), average=average)
    assert torch.equal(fused, ak.preference_loss(logps[:2], logps[2:], method=method, **extras))


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


def test_fp64_is_the_reference():
    generator = torch.Generator().manual_seed(13)
    hidden, weight, bias, labels = make_batch(4, 5, 6, 29, generator=generator, all_ignored_rows=[2])
    for shift in (False, True):
        for softcap in (None, 3.0):
            for average in (False, True):
                fused = sequence_logps_from_hidden(hidden, weight, labels, bias=bias, shift=shift, average=average,
                                                   logit_softcap=softcap, token_chunk=3, vocab_chunk=7)
                expected = ref.sequence_logps(materialized_logits(hidden, weight, bias, softcap), labels,
                                              shift=shift, average=average)
                assert fused.dtype == torch.float64
                torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)


def test_chunking_does_not_change_the_result():
    """Any tiling, including tiles larger than the batch or the vocabulary, gives the same log-probs."""
    generator = torch.Generator().manual_seed(14)
    hidden, weight, bias, labels = make_batch(4, 7, 8, 50, generator=generator)
    args = (hidden.float(), weight.float(), labels)
    results = [sequence_logps_from_hidden(*args, bias=bias.float(), token_chunk=tc, vocab_chunk=vc)
               for tc, vc in ((1, 1), (3, 7), (5, 49), (28, 50), (1000, 4096))]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab_chunk", [3, 16, 4096])
def test_a_vocabulary_range_masked_by_the_bias(vocab_chunk):
    """Vocabulary chunks with no finite logit (a bias of -inf on their ids) before the first finite one keep the
    running max at -inf: the merge shifts by 0 there (-inf - (-inf) would be NaN), so the values and gradients
    are the reference's at any tiling."""
    generator = torch.Generator().manual_seed(16)
    hidden, weight, bias, labels = make_batch(4, 6, 8, 50, generator=generator)
    bias, labels = masked_vocabulary(bias, labels, 40)
    tensors = quantized((hidden, weight, bias), torch.float32)

    def logps_of(dtype, **fused_options):
        h, w, b = leaves(tensors, dtype)
        if fused_options:
            logps = sequence_logps_from_hidden(h, w, labels, bias=b, shift=True, **fused_options)
        else:
            logps = ref.sequence_logps(materialized_logits(h, w, b, None), labels, shift=True)
        return logps, torch.autograd.grad(logps.sum(), (h, w, b))

    fused = logps_of(torch.float32, token_chunk=5, vocab_chunk=vocab_chunk, backend="torch")
    assert_rule(fused, logps_of(torch.float64), logps_of(torch.float32), torch.float32, "masked vocabulary")


def test_all_ignored_rows_give_zero_and_no_gradient():
    generator = torch.Generator().manual_seed(15)
    hidden, weight, bias, labels = make_batch(4, 5, 6, 19, generator=generator, all_ignored_rows=[0, 3])
    labels[1, 1:] = -100  # with shift, row 1 scores nothing either
    h = hidden.float().requires_grad_()
    for average in (True, False):
        logps = sequence_logps_from_hidden(h, weight.float(), labels, average=average, shift=True)
        assert torch.isfinite(logps).all()
        assert logps[0].item() == 0.0 and logps[1].item() == 0.0 and logps[3].item() == 0.0
        (grad,) = torch.autograd.grad(logps.sum(), h)
        assert torch.count_nonzero(grad[[0, 1, 3]]) == 0
        assert torch.count_nonzero(grad[2, :-1]) > 0 and torch.count_nonzero(grad[:, -1]) == 0  # shift: last unused


def test_padding_never_reaches_the_result():
    """NaN / inf hidden states where nothing is scored (an ignored position, an all-ignored row, the unused last
    position under shift) reach neither the log-probs nor any gradient of the torch tiles: they give exactly
    what zeros there give (an ignored row is read as 0, as the from-logits op never reads it)."""
    generator = torch.Generator().manual_seed(20)
    hidden, weight, bias, labels = make_batch(4, 6, 8, 37, generator=generator, all_ignored_rows=[3])
    labels[1, 3] = -100
    poisoned = hidden.float().clone()
    poisoned[3] = float("nan")
    poisoned[1, 2] = float("inf")  # scores labels[1, 3] (ignored) with shift
    poisoned[:, -1] = float("nan")  # scores nothing with shift
    clean = torch.where(torch.isfinite(poisoned), poisoned, torch.zeros(()))

    def run(h):
        leaves_ = [h.clone().requires_grad_(), weight.float().requires_grad_(), bias.float().requires_grad_()]
        logps = sequence_logps_from_hidden(leaves_[0], leaves_[1], labels, bias=leaves_[2], shift=True,
                                           token_chunk=5, vocab_chunk=16, backend="torch")
        return [logps, *torch.autograd.grad(logps.sum(), leaves_)]

    for got, expected in zip(run(poisoned), run(clean)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_no_scored_position_at_all():
    """T = 1 with shift: nothing is scored; log-probs 0, loss finite, gradients zero."""
    hidden = torch.randn(2, 1, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    loss = amapo_loss_from_hidden(hidden, weight, torch.zeros(2, 1, dtype=torch.long), shift=True)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert torch.isfinite(loss) and all(torch.count_nonzero(g) == 0 for g in grads)


def test_strided_hidden_and_mixed_dtypes():
    """A non-contiguous hidden view, bf16 activations with an fp32 head (autocast's layout): gradients come
    back in each input's dtype and match the fp32 computation on the same values."""
    generator = torch.Generator().manual_seed(16)
    hidden, weight, bias, labels = make_batch(4, 6, 8, 33, generator=generator)
    strided = hidden.float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not strided.is_contiguous()
    dense = hidden.float().requires_grad_()
    a = sequence_logps_from_hidden(strided, weight.float(), labels, shift=True, token_chunk=5)
    b = sequence_logps_from_hidden(dense, weight.float(), labels, shift=True, token_chunk=5)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a.sum(), strided)[0], torch.autograd.grad(b.sum(), dense)[0])

    h16, w32 = hidden.bfloat16().requires_grad_(), weight.float().requires_grad_()
    mixed = sequence_logps_from_hidden(h16, w32, labels)
    upcast = sequence_logps_from_hidden(h16.float(), w32, labels)
    torch.testing.assert_close(mixed, upcast, rtol=0, atol=0)
    grad_h, grad_w = torch.autograd.grad(mixed.sum(), (h16, w32))
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.float32


def autocast_runs(tensors, labels, device_type, dtype, backend):
    """[B] log-probs and the gradients reaching float32 leaves (hidden, weight, bias) of
    sequence_logps_from_hidden: called inside torch.autocast(device_type, dtype), and called outside it on the
    leaves cast to dtype, as nn.Linear's autocast would cast them."""
    upstream = torch.linspace(-1.0, 1.0, labels.shape[0], dtype=torch.float64)
    runs = []
    for autocast in (True, False):
        leaves = [t.float().to(labels.device).requires_grad_() for t in tensors]
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):
            operands = leaves if autocast else [t.to(dtype) for t in leaves]
            logps = sequence_logps_from_hidden(operands[0], operands[1], labels, bias=operands[2], shift=True,
                                               token_chunk=5, vocab_chunk=16, backend=backend)
        grads = torch.autograd.grad((logps * upstream.to(logps)).sum(), leaves)
        assert all(g.dtype == torch.float32 for g in grads)
        runs.append((logps, grads))
    return runs


def assert_autocast_is_linears(tensors, labels, device_type, dtype, backend):
    """Under torch.autocast the lm_head's float32 operands are cast to the autocast dtype as nn.Linear's are:
    every backend computes, forward and backward, exactly what it computes on operands cast by hand (the
    torch tiles' torch.mm was cast in the forward only, the Triton kernels ignored autocast)."""
    (inside, inside_grads), (cast, cast_grads) = autocast_runs(tensors, labels, device_type, dtype, backend)
    torch.testing.assert_close(inside, cast, rtol=0, atol=0)
    for a, b in zip(inside_grads, cast_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_the_operands_as_linear_does(dtype):
    generator = torch.Generator().manual_seed(44)
    hidden, weight, bias, labels = make_batch(4, 7, 12, 37, generator=generator)
    assert_autocast_is_linears((hidden, weight, bias), labels, "cpu", dtype, "torch")
    # float64 operands are left as they are, as autocast leaves them
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=dtype):
        inside = sequence_logps_from_hidden(leaves[0], leaves[1], labels, bias=leaves[2], token_chunk=5)
    outside = sequence_logps_from_hidden(hidden, weight, labels, bias=bias, token_chunk=5)
    assert inside.dtype == torch.float64
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_frozen_head_and_return_stats():
    generator = torch.Generator().manual_seed(17)
    hidden, weight, bias, labels = make_batch(4, 5, 6, 21, generator=generator)
    h = hidden.float().requires_grad_()
    loss, stats = amapo_loss_from_hidden(h, weight.float(), labels, bias=bias.float(), return_stats=True)
    expected, expected_stats = ak.amapo_loss_from_logits(
        materialized_logits(hidden.float(), weight.float(), bias.float(), None), labels, return_stats=True)
    torch.testing.assert_close(loss, expected)
    assert set(stats) == set(expected_stats)
    loss.backward()
    assert h.grad is not None and h.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# gradcheck in fp64 (AMaPO's margin is a stop-gradient: one pair makes it 0, so the loss is smooth)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["logps", "simpo", "dpo", "amapo_one_pair"])
def test_gradcheck(case):
    generator = torch.Generator().manual_seed(18)
    hidden, weight, bias, labels = make_batch(2, 4, 3, 7, generator=generator)
    labels[0, 2] = -100
    inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    chunks = dict(token_chunk=2, vocab_chunk=3)
    refs = dict(ref_chosen_logps=torch.tensor([-4.0], dtype=torch.float64),
                ref_rejected_logps=torch.tensor([-5.0], dtype=torch.float64))

    def fn(h, w, b):
        if case == "logps":
            return sequence_logps_from_hidden(h, w, labels, bias=b, shift=True, logit_softcap=2.0, **chunks)
        if case == "amapo_one_pair":
            return amapo_loss_from_hidden(h, w, labels, bias=b, logit_softcap=2.0, **chunks)
        return preference_loss_from_hidden(h, w, labels, method=case, bias=b, shift=True, **chunks, **refs)

    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# Memory: no [B*T, V] tensor, ever
# ---------------------------------------------------------------------------------------------


def test_never_materializes_logits():
    batch, steps, width, vocab, token_chunk, vocab_chunk = 4, 32, 8, 1000, 16, 64
    generator = torch.Generator().manual_seed(19)
    hidden, weight, bias, labels = make_batch(batch, steps, width, vocab, generator=generator)
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    with LargestTensor() as fused:
        amapo_loss_from_hidden(h, w, labels, bias=b, shift=True, token_chunk=token_chunk,
                               vocab_chunk=vocab_chunk).backward()
    with LargestTensor() as eager:
        ak.amapo_loss_from_logits(F.linear(h, w, b), labels, shift=True).backward()
    # the bound: one logits tile, or the size of an input / its gradient (weight [V, H], hidden [B, T, H])
    bound = max(token_chunk * vocab_chunk, vocab * width, batch * steps * width)
    assert fused.largest_numel <= bound < batch * steps * vocab
    assert eager.largest_numel >= batch * steps * vocab  # the tracker does see the materialized logits


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

H, V = 4, 7


def good():
    return dict(hidden=torch.randn(2, 3, H), lm_head_weight=torch.randn(V, H), labels=torch.randint(0, V, (2, 3)))


BAD = [
    ("hidden 2-D", dict(hidden=torch.randn(2, H)), ValueError, "hidden must have 3 dims"),
    ("hidden int", dict(hidden=torch.zeros(2, 3, H, dtype=torch.long)), TypeError, "hidden must have dtype"),
    ("hidden list", dict(hidden=[[0.0]]), TypeError, "hidden must be a torch.Tensor"),
    ("odd batch", dict(hidden=torch.randn(3, 3, H), labels=torch.zeros(3, 3, dtype=torch.long)), ValueError,
     "hidden must hold an even batch"),
    ("weight 1-D", dict(lm_head_weight=torch.randn(V)), ValueError, "lm_head_weight must have 2 dims"),
    ("H mismatch", dict(lm_head_weight=torch.randn(V, H + 1)), ValueError, "lm_head_weight must be [V, H] with H = "),
    ("empty vocabulary", dict(lm_head_weight=torch.randn(0, H)), ValueError, "empty vocabulary"),
    ("bias shape", dict(bias=torch.randn(V + 1)), ValueError, "bias must be [V] = [7]"),
    ("bias 2-D", dict(bias=torch.randn(1, V)), ValueError, "bias must have 1 dims"),
    ("sparse weight", dict(lm_head_weight=torch.randn(V, H).to_sparse()), TypeError,
     "lm_head_weight must be a dense (strided) tensor, got layout torch.sparse_coo"),
    ("sparse bias", dict(bias=torch.randn(V).to_sparse()), TypeError, "bias must be a dense (strided) tensor"),
    ("labels int32", dict(labels=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "labels must have dtype"),
    ("labels T mismatch", dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must be [B, T]"),
    ("label >= V", dict(labels=torch.full((2, 3), V)), ValueError, "labels must lie in [0, V=7)"),
    ("negative label", dict(labels=torch.full((2, 3), -1)), ValueError, "labels must lie in [0, V=7)"),
    ("weight on meta", dict(lm_head_weight=torch.randn(V, H, device="meta")), ValueError, "one device"),
    ("softcap 0", dict(logit_softcap=0.0), ValueError, "logit_softcap must be None or a positive number"),
    ("token_chunk 0", dict(token_chunk=0), ValueError, "token_chunk must be a positive int"),
    ("vocab_chunk float", dict(vocab_chunk=2.5), ValueError, "vocab_chunk must be a positive int"),
    ("ignore_index float", dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
@pytest.mark.parametrize("api", ["amapo", "preference"])
def test_bad_inputs(case, api):
    _, override, error, fragment = case
    kwargs = {**good(), **override}
    args = (kwargs.pop("hidden"), kwargs.pop("lm_head_weight"), kwargs.pop("labels"))
    fn = amapo_loss_from_hidden if api == "amapo" else preference_loss_from_hidden
    if api == "preference":
        kwargs["method"] = "simpo"
    with pytest.raises(error, match=re.escape(fragment)):
        fn(*args, **kwargs)


def test_bad_method_and_hparams():
    kwargs = good()
    args = (kwargs.pop("hidden"), kwargs.pop("lm_head_weight"), kwargs.pop("labels"))
    with pytest.raises(ValueError, match="method must be one of"):
        preference_loss_from_hidden(*args, method="nope")
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss_from_hidden(*args, method="dpo")
    with pytest.raises(TypeError, match="has no hyperparameter"):
        preference_loss_from_hidden(*args, method="simpo", tau=1.0)


def test_shift_checks_only_scored_labels():
    kwargs = good()
    kwargs["labels"][:, 0] = 999  # never scored with shift=True
    amapo_loss_from_hidden(kwargs["hidden"], kwargs["lm_head_weight"], kwargs["labels"], shift=True)


def test_torch_compile_of_the_caller_matches_eager():
    """Under torch.compile of the surrounding code (graph breaks allowed), the same loss and gradients."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(31)
    hidden = torch.randn(4, 9, 16, generator=generator, requires_grad=True)
    weight = torch.randn(37, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 37, (4, 9), generator=generator)

    def loss_fn(h, w):
        return ak.amapo_loss_from_hidden(h, w, labels, shift=True, token_chunk=8, vocab_chunk=16)

    compiled_loss, eager_loss = torch.compile(loss_fn)(hidden, weight), loss_fn(hidden, weight)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled, eager in zip(torch.autograd.grad(compiled_loss, (hidden, weight)),
                               torch.autograd.grad(eager_loss, (hidden, weight))):
        torch.testing.assert_close(compiled, eager)


def test_torch_compile_with_dynamic_batch_and_length_compiles_once():
    """A training loop's batches change B and T: compiled with both marked dynamic (fullgraph), the torch
    backend is one graph for every token count within one token chunk, not one per B * T (whose 9th value
    would hit dynamo's recompile limit, a hard error under fullgraph=True)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(32)
    weight = torch.randn(37, 16, generator=generator, requires_grad=True)
    counter = CompileCounterWithBackend("aot_eager")

    def loss_fn(h, w, labels):
        return ak.amapo_loss_from_hidden(h, w, labels, shift=True, backend="torch")

    compiled_fn = torch.compile(loss_fn, backend=counter, fullgraph=True)
    for batch, steps in ((4, 9), (6, 7), (10, 12), (8, 5)):
        hidden = torch.randn(batch, steps, 16, generator=generator, requires_grad=True)
        labels = torch.randint(0, 37, (batch, steps), generator=generator)
        for tensor in (hidden, labels):
            torch._dynamo.mark_dynamic(tensor, 0)
            torch._dynamo.mark_dynamic(tensor, 1)
        compiled_loss, eager_loss = compiled_fn(hidden, weight, labels), loss_fn(hidden, weight, labels)
        torch.testing.assert_close(compiled_loss, eager_loss)
        for compiled, eager in zip(torch.autograd.grad(compiled_loss, (hidden, weight)),
                                   torch.autograd.grad(eager_loss, (hidden, weight))):
            torch.testing.assert_close(compiled, eager)
    assert counter.frame_count == 1


@pytest.mark.parametrize("api", ["amapo", "preference"])
@pytest.mark.parametrize(
    "override, name",
    [
        (dict(lm_head_weight=torch.nn.Linear(H, V)), "lm_head_weight"),  # model.lm_head instead of its .weight
        (dict(lm_head_weight=[[0.0] * H] * V), "lm_head_weight"),
        (dict(bias=[0.0] * V), "bias"),
    ],
    ids=["weight nn.Linear", "weight list", "bias list"],
)
def test_pair_apis_name_a_non_tensor_head(api, override, name):
    """The pair wrappers refuse a head or bias that is not a tensor with a TypeError naming it, as
    sequence_logps_from_hidden does (not an AttributeError from inside the dtype resolution)."""
    kwargs = {**good(), **override}
    args = (kwargs.pop("hidden"), kwargs.pop("lm_head_weight"), kwargs.pop("labels"))
    fn = amapo_loss_from_hidden if api == "amapo" else preference_loss_from_hidden
    if api == "preference":
        kwargs["method"] = "simpo"
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
        fn(*args, **kwargs)


@pytest.mark.parametrize("convert", [numpy.int64, torch.tensor], ids=["numpy int64", "0-d tensor"])
def test_chunk_sizes_take_any_integer(convert):
    """token_chunk / vocab_chunk accept the integers ignore_index accepts (numpy, 0-d tensors) and give the
    same result as the Python ints."""
    generator = torch.Generator().manual_seed(41)
    hidden, weight, bias, labels = make_batch(2, 5, 8, 19, generator=generator)
    expected = sequence_logps_from_hidden(hidden, weight, labels, bias=bias, token_chunk=3, vocab_chunk=7)
    got = sequence_logps_from_hidden(hidden, weight, labels, bias=bias, token_chunk=convert(3),
                                     vocab_chunk=convert(7))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="token_chunk must be a positive int"):
        sequence_logps_from_hidden(hidden, weight, labels, token_chunk=convert(0))
