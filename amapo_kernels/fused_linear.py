"""Preference losses straight from the last hidden states and the lm_head, never materializing logits.

For a concatenated batch (rows [0, B/2) chosen, [B/2, B) rejected), hidden [B, T, H], lm_head weight
W [V, H], optional bias b [V] and labels [B, T]:

    z[b, t]   = hidden[b, t] @ W^T + b                       (logits of one position, length V)
    s[b, t]   = c * tanh(z[b, t] / c)  if logit_softcap = c  else z[b, t]        (Gemma-2 softcap)
    lp[b, t]  = s[b, t, y] - logsumexp(s[b, t]),  y = labels[b, t]  (labels[b, t + 1] with shift=True)
    logps[b]  = sum_t lp[b, t] over labels != ignore_index   (divided by their count if length-normalized;
                                                             a row with no scored label gives 0)

and the loss is amapo_loss / preference_loss on (logps[:B/2], logps[B/2:]), exactly as the from-logits API.

The [B] log-probs come from _SequenceLogpsFromHidden, which walks (token chunk x vocabulary chunk)
tiles: each tile's logits are computed in fp32 (fp64 for fp64 inputs) and merged into per-token running
statistics (max, sum of exp: an online softmax), so memory beyond the inputs and their gradients is
O(B*T) plus one tile. The backward recomputes each tile's logits and applies
    d logps[b] / d s[b, t, v] = coef[b, t] * (onehot(y)_v - softmax(s[b, t])_v),
    coef[b, t] = upstream grad of row b (/ its scored-label count if length-normalized; 0 if ignored),
times the softcap derivative 1 - (s / c)^2, accumulating grad_hidden = g @ W and grad_W = g^T @ hidden,
grad_b = sum g in fp32, one tile at a time. Gradients come back in the inputs' own dtypes.
Inside torch.autocast, float32 hidden / weight / bias are first cast to the autocast dtype, as nn.Linear's
operands would be (_autocast_operands), whatever the backend.

The lm_head weight is an ordinary tensor argument, so under DeepSpeed ZeRO-3 the gathered parameter's
gradient reaches its accumulation hook as it would from nn.Linear (see tests/test_zero3.py).
"""

import functools
import operator

import torch

from amapo_kernels._checks import (
    LOGITS_DTYPES,
    check_bool,
    check_even_batch,
    check_ignore_index,
    check_data,
    check_local,
    check_logit_softcap,
    check_same_device,
    check_shift,
    check_tensor,
)
from amapo_kernels._ops import acc_dtype, refuse_unsupported_transforms
from amapo_kernels.preference import check_call, check_float_range, preference_loss, uses_mean_logps

TOKEN_CHUNK = 1024  # rows of a tile; fp32 tile = TOKEN_CHUNK * VOCAB_CHUNK * 4 bytes = 16 MiB
VOCAB_CHUNK = 4096

_HALF = (torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "cublas", "torch")
_TRITON_MODULE_BACKENDS = ("triton", "cublas")  # amapo_kernels.triton_fused_linear, with matmuls=backend


def _triton_kernels():
    """amapo_kernels.triton_fused_linear, imported on first use: importing it decides whether its kernels
    are compiled or interpreted (TRITON_INTERPRET), and CPU-only callers never need triton."""
    from amapo_kernels import triton_fused_linear

    return triton_fused_linear


def _resolve_backend(backend, gradient_filter, hidden, weight, bias) -> str:
    """auto: the Triton kernels for CUDA tensors (float64 stays on torch), the torch tiles on the CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    check_bool("gradient_filter", gradient_filter)
    if backend == "auto":
        fp64 = any(t is not None and t.dtype == torch.float64 for t in (hidden, weight, bias))
        backend = "triton" if hidden.is_cuda and not fp64 else "torch"
    if gradient_filter and backend != "triton":
        raise ValueError("gradient_filter=True needs the Triton backend (backend='triton', or 'auto' on CUDA)")
    if backend in _TRITON_MODULE_BACKENDS:
        _triton_kernels().check_supported(hidden, weight, bias, backend)
    return backend


def _autocast_operands(hidden, weight, bias):
    """The lm_head's operands as nn.Linear would take them in the caller's torch.autocast region: float32
    ones cast to the autocast dtype (float64 kept), the casts on the autograd graph, so that gradients reach
    float32 master weights as float32 and every backend computes what the model's own lm_head would (bf16
    operands, fp32 accumulation; Triton on tensor cores instead of exact fp32). Inside, autocast is off
    (_no_autocast): each backend's products then follow these dtypes alone, forward and backward alike."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype == torch.float32 else t for t in (hidden, weight, bias))


def _no_autocast(function):
    """function with torch.autocast off on its first tensor's device: the torch tiles' torch.mm would otherwise
    be cast by an enclosing region (the forward) and not by the backward's, which runs outside it."""
    @functools.wraps(function)
    def run(ctx, *args):
        device_type = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        with torch.autocast(device_type, enabled=False):
            return function(ctx, *args)
    return run


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------


def _tile_matmul(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b with products and sums in `acc`. On CUDA, two half-precision operands go through the
    tensor cores with an fp32 output (bf16 x bf16 products are exact in fp32, the sum is fp32);
    elsewhere both operands are upcast."""
    if a.is_cuda and acc == torch.float32 and a.dtype in _HALF and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.to(acc), b.to(acc))


class _Tiles:
    """The scored positions of a batch as a flat list n = b * Ts + t (Ts = T - 1 with shift), cut into
    token chunks; hidden rows are gathered per chunk (a chunk-sized copy, never a copy of hidden)."""

    def __init__(self, hidden, weight, bias, labels, shift, softcap, token_chunk, vocab_chunk, ignore_index=None):
        self.hidden, self.weight, self.bias, self.softcap = hidden, weight, bias, softcap
        self.ignore_index = ignore_index
        self.batch, steps, _ = hidden.shape
        self.steps = steps - 1 if shift else steps
        self.vocab = weight.shape[0]
        self.acc = acc_dtype(hidden, weight, bias)
        self.token_chunk, self.vocab_chunk = token_chunk, vocab_chunk
        flat = torch.arange(self.batch * self.steps, device=hidden.device)
        self.rows, self.cols = flat // max(self.steps, 1), flat % max(self.steps, 1)
        self.labels = (labels[:, 1:] if shift else labels).reshape(-1)  # [N], O(B*T)

    @property
    def count(self) -> int:
        return self.batch * self.steps

    def token_ranges(self):
        # Only the number of chunks is concrete, the last chunk ends at the count itself: under torch.compile the
        # count B * Ts is symbolic, and range(0, count, chunk) / min(n0 + chunk, count) would pin it to its value
        # (a recompile for every new B * T, and an error for a dimension marked dynamic)
        chunks, size = -(-self.count // self.token_chunk), self.token_chunk
        if chunks == 0:
            return []
        return [(i * size, (i + 1) * size) for i in range(chunks - 1)] + [((chunks - 1) * size, self.count)]

    def vocab_ranges(self):
        return [(v0, min(v0 + self.vocab_chunk, self.vocab)) for v0 in range(0, self.vocab, self.vocab_chunk)]

    def hidden_rows(self, n0, n1) -> torch.Tensor:
        rows = self.hidden[self.rows[n0:n1], self.cols[n0:n1]]  # [n, H] in hidden's dtype
        if self.ignore_index is None:
            return rows
        # an ignored position reads hidden as 0, so a NaN / inf there (padding) reaches no statistic or gradient,
        # as with the from-logits op, which never reads an ignored row
        scored = (self.labels[n0:n1] != self.ignore_index)[:, None]
        return torch.where(scored, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

    def logits(self, rows, v0, v1) -> torch.Tensor:
        """Softcapped logits of a tile [n, v1 - v0] in the accumulation dtype."""
        z = _tile_matmul(rows, self.weight[v0:v1].t(), self.acc)
        if self.bias is not None:
            z = z + self.bias[v0:v1].to(self.acc)
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


# ---------------------------------------------------------------------------------------------
# Forward: online softmax over vocabulary chunks
# ---------------------------------------------------------------------------------------------


def _token_stats(tiles: _Tiles, n0: int, n1: int):
    """(max, log sum exp(s - max), label logit) of the positions n0..n1, merging vocabulary chunks as
    m' = max(m, max s), l' = l * exp(m - m') + sum exp(s - m'); never more than one tile of logits.
    The tile work is in the accumulation dtype; the O(n) merges are in fp64, so that their rounding does
    not grow with the number of vocabulary chunks (17 fp32 merges already cost several ulps)."""
    rows = tiles.hidden_rows(n0, n1)
    labels = tiles.labels[n0:n1]
    running_max = torch.full((n1 - n0,), float("-inf"), dtype=torch.float64, device=rows.device)
    running_sum = torch.zeros_like(running_max)
    label_logit = torch.zeros_like(running_max)
    for v0, v1 in tiles.vocab_ranges():
        s = tiles.logits(rows, v0, v1)
        inside = (labels >= v0) & (labels < v1)
        picked = s.gather(1, (labels - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        label_logit = torch.where(inside, picked.double(), label_logit)
        new_max = torch.maximum(running_max, s.amax(dim=1).double())  # a max of tile values: exact in acc
        # a row with no finite logit yet (a bias of -inf masking these ids) shifts by 0: -inf - (-inf) is NaN
        pivot = new_max.masked_fill(new_max == float("-inf"), 0.0)
        tile_sum = s.sub_(pivot.to(s.dtype)[:, None]).exp_().sum(dim=1)  # in place: s is not needed again
        running_sum = running_sum * torch.exp(running_max - pivot) + tile_sum.double()
        running_max = new_max
    return running_max, torch.log(running_sum), label_logit


def _row_reduce(tiles: _Tiles, token_logps, scored, average):
    """[N] token log-probs -> [B] sums (or means over scored labels; 0 for a row with none)."""
    shape = (tiles.batch, tiles.steps)
    sums = (token_logps * scored).view(shape).sum(dim=1)
    if not average:
        return sums
    counts = scored.view(shape).sum(dim=1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


# ---------------------------------------------------------------------------------------------
# Backward: recompute a tile, softmax from the saved logsumexp, accumulate the three gradients
# ---------------------------------------------------------------------------------------------


def _token_coefs(tiles: _Tiles, grad_seq, scored, average):
    """coef[n] = d loss / d lp[n]: the row's upstream grad (over its scored count if averaged), 0 if ignored."""
    shape = (tiles.batch, tiles.steps)
    per_row = grad_seq.to(tiles.acc)
    if average:
        counts = scored.view(shape).sum(dim=1)
        per_row = torch.where(counts > 0, per_row / counts.clamp(min=1), torch.zeros_like(per_row))
    return (per_row[:, None] * scored.view(shape)).reshape(-1)


def _tile_grad_logits(tiles: _Tiles, rows, n0, n1, v0, v1, stats, coefs):
    """d loss / d z of one tile: coef * (onehot - softmax), times the softcap derivative."""
    s = tiles.logits(rows, v0, v1)
    softcap_grad = None if tiles.softcap is None else 1 - (s / tiles.softcap) ** 2  # d(c tanh(z/c))/dz
    # (s - max) is exact near the max (Sterbenz), so p keeps its relative accuracy however large the logits
    g = s.sub_(stats[n0:n1, 0:1]).sub_(stats[n0:n1, 1:2]).exp_().neg_()  # -softmax, in place of s
    labels = tiles.labels[n0:n1]
    inside = (labels >= v0) & (labels < v1)
    index = (labels - v0).clamp(0, v1 - v0 - 1)[:, None]
    g.scatter_add_(1, index, inside.to(g.dtype)[:, None])
    g.mul_(coefs[n0:n1, None])
    if softcap_grad is not None:
        g.mul_(softcap_grad)
    return g


def _backward(tiles: _Tiles, stats, coefs, need_hidden, need_weight, need_bias):
    """Vocabulary chunks outside, token chunks inside: each weight-gradient chunk is finished (fp32) before
    it is cast, so only grad_hidden needs a full-size fp32 accumulator ([B*Ts, H], hidden-sized)."""
    hidden, weight, bias, acc = tiles.hidden, tiles.weight, tiles.bias, tiles.acc
    grad_rows = torch.zeros(tiles.count, hidden.shape[2], dtype=acc, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None  # every vocabulary chunk is written below
    grad_bias = torch.empty_like(bias) if need_bias else None
    half_path = hidden.is_cuda and acc == torch.float32 and hidden.dtype in _HALF and weight.dtype == hidden.dtype
    for v0, v1 in tiles.vocab_ranges():
        weight_chunk = weight[v0:v1]
        weight_acc = torch.zeros(v1 - v0, weight.shape[1], dtype=acc, device=weight.device) if need_weight else None
        bias_acc = torch.zeros(v1 - v0, dtype=acc, device=weight.device) if need_bias else None
        for n0, n1 in tiles.token_ranges():
            rows = tiles.hidden_rows(n0, n1)
            g = _tile_grad_logits(tiles, rows, n0, n1, v0, v1, stats, coefs)
            # the CUDA half path rounds g to the input dtype, as eager autograd in bf16/fp16 does
            g_mm = g.to(hidden.dtype) if half_path else g
            if need_hidden:
                grad_rows[n0:n1] += _tile_matmul(g_mm, weight_chunk, acc)
            if need_weight:
                weight_acc += _tile_matmul(g_mm.t(), rows, acc)
            if need_bias:
                bias_acc += g.sum(dim=0)
        if need_weight:
            grad_weight[v0:v1] = weight_acc
        if need_bias:
            grad_bias[v0:v1] = bias_acc
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[:, : tiles.steps] = grad_rows.view(tiles.batch, tiles.steps, hidden.shape[2])  # shift: last position 0
    return grad_hidden, grad_weight, grad_bias


class _SequenceLogpsFromHidden(torch.autograd.Function):
    """[B] per-sequence log-probs of labels under softcap(hidden @ W^T + b); see the module docstring."""

    @staticmethod
    @_no_autocast
    def forward(ctx, hidden, weight, bias, labels, ignore_index, average, shift, softcap, token_chunk, vocab_chunk,
                backend, gradient_filter):
        tiles = _Tiles(hidden, weight, bias, labels, shift, softcap, token_chunk, vocab_chunk, ignore_index)
        # per-token statistics and the row sums in fp64: O(B*T) work, no rounding growth with T or V / vocab_chunk
        if backend in _TRITON_MODULE_BACKENDS:
            stats = _triton_kernels().token_stats(hidden, weight, bias, labels, shift=shift, softcap=softcap,
                                                  ignore_index=ignore_index, matmuls=backend)
        else:
            stats = torch.zeros(tiles.count, 3, dtype=torch.float64, device=hidden.device)  # max, log sum, label logit
            for n0, n1 in tiles.token_ranges():
                stats[n0:n1] = torch.stack(_token_stats(tiles, n0, n1), dim=1)
        token_logps = stats[:, 2] - stats[:, 0] - stats[:, 1]
        scored = (tiles.labels != ignore_index).double()
        seq_logps = _row_reduce(tiles, token_logps, scored, average).to(tiles.acc)
        # the max is a logit (exact in acc); log sum is rounded once
        ctx.save_for_backward(hidden, weight, bias, labels, stats[:, :2].to(tiles.acc))
        ctx.options = (ignore_index, average, shift, softcap, token_chunk, vocab_chunk, backend, gradient_filter)
        return seq_logps

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, bias, labels, softmax_stats = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = _GradientsFromHidden.apply(grad_seq, hidden, weight, bias, labels, softmax_stats,
                                           (need_hidden, need_weight, need_bias and bias is not None), ctx.options)
        return (*grads, None, None, None, None, None, None, None, None, None)


class _GradientsFromHidden(torch.autograd.Function):
    """_SequenceLogpsFromHidden's backward as a function of its own: with create_graph=True its gradients
    are on the graph of hidden and the weight, and differentiating them again raises, naming the function
    (as the ops' double backward does), instead of their being silently constant."""

    @staticmethod
    @_no_autocast
    def forward(ctx, grad_seq, hidden, weight, bias, labels, softmax_stats, needs, options):
        ignore_index, average, shift, softcap, token_chunk, vocab_chunk, backend, gradient_filter = options
        need_hidden, need_weight, need_bias = needs
        tiles = _Tiles(hidden, weight, bias, labels, shift, softcap, token_chunk, vocab_chunk, ignore_index)
        scored = (tiles.labels != ignore_index).to(tiles.acc)
        coefs = _token_coefs(tiles, grad_seq, scored, average)
        if backend in _TRITON_MODULE_BACKENDS:
            return _triton_kernels().gradients(
                hidden, weight, bias, labels, softmax_stats, coefs, shift=shift, softcap=softcap,
                ignore_index=ignore_index, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                gradient_filter=gradient_filter, matmuls=backend,
            )
        return _backward(tiles, softmax_stats, coefs, need_hidden, need_weight, need_bias)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "amapo_kernels.sequence_logps_from_hidden: double backward (differentiating a gradient taken with "
            "create_graph=True) is not supported; its backward is fused with no derivative of its own"
        )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name, value) -> int:
    """A positive integer as a Python int: numpy and 0-d integer tensors accepted, as for ignore_index."""
    try:
        number = None if isinstance(value, (bool, float)) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def _check_inputs(hidden, weight, labels, bias, ignore_index, logit_softcap, token_chunk, vocab_chunk,
                  shift) -> tuple[int, int, int]:
    """Every argument check of sequence_logps_from_hidden; returns ignore_index and the chunk sizes as Python ints."""
    check_tensor("hidden", hidden, dims=3, dtypes=LOGITS_DTYPES)
    check_tensor("lm_head_weight", weight, dims=2, dtypes=LOGITS_DTYPES)
    check_tensor("labels", labels, dims=2, dtypes=(torch.int64,))
    if bias is not None:
        check_tensor("bias", bias, dims=1, dtypes=LOGITS_DTYPES)
    for name, tensor in (("hidden", hidden), ("lm_head_weight", weight), ("labels", labels), ("bias", bias)):
        check_local(name, tensor)
    check_same_device(hidden=hidden, lm_head_weight=weight, labels=labels, bias=bias)
    vocab, width = weight.shape
    if vocab == 0:
        raise ValueError("lm_head_weight has an empty vocabulary (V = 0)")
    if width != hidden.shape[2]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = hidden.shape[2] = {hidden.shape[2]}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias must be [V] = [{vocab}] to match lm_head_weight, got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {tuple(hidden.shape[:2])} to match hidden, got {tuple(labels.shape)}")
    ignore_index = check_ignore_index(ignore_index)  # the from-logits path's checks, shared
    check_shift(shift, hidden.shape[1])
    check_logit_softcap(logit_softcap)
    token_chunk = _check_positive_int("token_chunk", token_chunk)
    vocab_chunk = _check_positive_int("vocab_chunk", vocab_chunk)
    # label-range check (eager: one host sync; compiled: an in-graph assertion): only the scored labels, as the
    # from-logits op
    scored = labels[:, 1:] if shift else labels
    bad = ((scored < 0) | (scored >= vocab)) & (scored != ignore_index)
    check_data(~bad.any(), f"labels must lie in [0, V={vocab}) or equal ignore_index={ignore_index}")
    return ignore_index, token_chunk, vocab_chunk


def _check_pair_batch(hidden, weight, bias) -> None:
    check_tensor("hidden", hidden, dims=3, dtypes=LOGITS_DTYPES)
    check_even_batch("hidden", hidden)
    # before acc_dtype reads their dtypes (a module such as model.lm_head passed for its weight: a TypeError naming it)
    check_tensor("lm_head_weight", weight)
    if bias is not None:
        check_tensor("bias", bias)


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = True,
    shift: bool = False,
    logit_softcap: float | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    backend: str = "auto",
    gradient_filter: bool = False,
) -> torch.Tensor:
    """sequence_logps(softcap(hidden @ lm_head_weight^T + bias), labels) without the [B, T, V] logits.

    hidden: [B, T, H] float32/bfloat16/float16/float64, any strides; lm_head_weight: [V, H]; bias: [V] or None.
    labels: [B, T] int64 in [0, V) or ignore_index. shift: hidden[:, t] scores labels[:, t + 1].
    logit_softcap=c: logits c * tanh(z / c). average: divide by the row's scored-label count (0 if none).
    token_chunk x vocab_chunk: the torch backend's largest block of logits (in fp32, or fp64 for fp64 inputs).
    backend: "triton" (amapo_kernels.triton_fused_linear; CUDA, or the CPU under TRITON_INTERPRET=1), "cublas"
    (the same module with every lm_head product on cuBLAS: fp32 logits in bounded chunks, reduced by Triton
    kernels), "torch" (tiles in PyTorch), "auto" (triton for CUDA tensors
    except float64, torch otherwise).
    gradient_filter: Triton only; skip backward tiles whose softmax is below the gradients' dtype resolution
    (error bound in amapo_kernels.triton_fused_linear). Off by default.
    Returns [B] float32 (float64 if any input is float64); differentiable in hidden, weight and bias.
    """
    ignore_index, token_chunk, vocab_chunk = _check_inputs(hidden, lm_head_weight, labels, bias, ignore_index,
                                                           logit_softcap, token_chunk, vocab_chunk, shift)
    check_bool("average", average)
    refuse_unsupported_transforms("amapo_kernels.sequence_logps_from_hidden", hidden, lm_head_weight, bias, labels,
                                  vmap_refused="amapo_kernels.sequence_logps_from_hidden")
    softcap = None if logit_softcap is None else float(logit_softcap)
    hidden, lm_head_weight, bias = _autocast_operands(hidden, lm_head_weight, bias)
    backend = _resolve_backend(backend, gradient_filter, hidden, lm_head_weight, bias)
    return _SequenceLogpsFromHidden.apply(
        hidden, lm_head_weight, bias, labels, ignore_index, average, shift, softcap,
        token_chunk, vocab_chunk, backend, gradient_filter,
    )


def amapo_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 2.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    shift: bool = False,
    variant: str = "code",
    ablation: str | None = None,
    group=None,
    return_stats: bool = False,
    logit_softcap: float | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    backend: str = "auto",
    gradient_filter: bool = False,
):
    """amapo_loss_from_logits(softcap(hidden @ lm_head_weight^T + bias), labels, ...) without the logits.

    Rows [0, B/2) of the batch are the chosen responses, [B/2, B) the rejected ones; log-probs are
    length-normalized. Every other keyword is amapo_loss_from_logits's (see amapo_kernels.amapo).
    """
    return preference_loss_from_hidden(
        hidden, lm_head_weight, labels, method="amapo", bias=bias, ignore_index=ignore_index, shift=shift,
        logit_softcap=logit_softcap, token_chunk=token_chunk, vocab_chunk=vocab_chunk, backend=backend,
        gradient_filter=gradient_filter, beta=beta,
        label_smoothing=label_smoothing, variant=variant, ablation=ablation, group=group, return_stats=return_stats,
    )


def preference_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    method: str,
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    logit_softcap: float | None = None,
    token_chunk: int = TOKEN_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK,
    backend: str = "auto",
    gradient_filter: bool = False,
    **hparams,
) -> torch.Tensor:
    """preference_loss(logps[:B/2], logps[B/2:], method=method, ...) with logps computed from hidden
    states (chosen rows first), summed or length-normalized as the method defines
    (amapo_kernels.preference.BASELINES[method].LOGPS; amapo: length-normalized). hparams go to the method."""
    _check_pair_batch(hidden, lm_head_weight, bias)
    resolved = check_call(method, hidden.shape[0] // 2, hidden.device, ref_chosen_logps, ref_rejected_logps, hparams)
    # the dtype preference_loss will compute in: the log-probs' (float64 where an operand is) and the references'
    check_float_range(method, resolved, acc_dtype(hidden, lm_head_weight, bias, ref_chosen_logps, ref_rejected_logps))
    average = uses_mean_logps(method)
    logps = sequence_logps_from_hidden(
        hidden, lm_head_weight, labels, bias=bias, ignore_index=ignore_index, average=average, shift=shift,
        logit_softcap=logit_softcap, token_chunk=token_chunk, vocab_chunk=vocab_chunk, backend=backend,
        gradient_filter=gradient_filter,
    )
    chosen, rejected = logps.chunk(2)  # one cat in the backward, not two slice_backwards and an add
    return preference_loss(
        chosen, rejected, method=method, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps, **hparams,
    )


__all__ = ["amapo_loss_from_hidden", "preference_loss_from_hidden", "sequence_logps_from_hidden"]
