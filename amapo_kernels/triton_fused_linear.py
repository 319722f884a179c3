"""Triton kernels of the fused lm_head (amapo_kernels.fused_linear, backend="triton"): the per-token
softmax statistics of softcap(hidden @ W^T + b) and the three gradients, with no logits in memory beyond
one bounded gradient tile.

Tokens are the flat positions n = b * Ts + t (Ts = T - 1 with shift); every kernel runs over the compact
list of the S tokens that score a label (ignored ones: a prompt, padding), reading their hidden rows and
labels in place from any strided hidden / labels (64-bit offsets throughout), so unscored positions cost
no matmul, no g row and no row of the cuBLAS products.

forward   _stats_kernel, grid (scored token blocks, vocabulary splits). A program computes [BN, BV] tiles of
          logits by a K-loop of tl.dot, applies bias and softcap in registers, folds them into per-token
          running (max, sum of exp) and picks the label's logit; it walks the BV-blocks of its split, then
          stores one (max, sum) per token. A small fp64 pass (token_stats) merges the splits.
backward  by vocabulary chunks of at most GRAD_TILE_BYTES: _grad_logits_kernel recomputes the chunk's
          tiles in the matmul and writes g = coef * (onehot - softmax) * softcap' (rounded to the input
          dtype, as eager autograd rounds grad_logits) for the S scored tokens; then two cuBLAS products
          finish the chunk: grad_rows += g @ W_chunk (one [S, H] fp32 accumulator, scattered into
          grad_hidden at the end) and grad_W[chunk] = g^T @ rows (rows: the scored tokens' hidden rows,
          one [S, H] copy; grad_W's rows are owned by the chunk: no accumulation, cast once).
          grad_b is summed from the unrounded g in the kernel (fp32 atomics of [BV] vectors).
          Why not accumulate both products inside the kernel, as Cut Cross-Entropy does: at B*T = 8192,
          H = 4096, V = 128256 every (token block x vocabulary block) program would add a [BN + BV, H]
          fp32 slab, about 400 GB of atomic traffic in all, against 2.1 GB for writing g once and two
          reads of it by cuBLAS. That kernel is kept for the gradient filter, which skips most of it.

matmuls="cublas" (the public backend="cublas"): the same statistics and gradients with every lm_head product
on cuBLAS, for GPUs where its matmuls outrun these Triton ones by more than the extra traffic costs. Both
passes walk the same vocabulary chunks (fp32 logits of at most GRAD_TILE_BYTES) and take each chunk's logits
from the same cuBLAS product (_cublas_chunk_logits), so that the backward's softmax is that of the forward's
own logits, bit for bit; bias and softcap are applied by the tile epilogue's code in both. The forward reduces
each chunk with _stats_from_logits_kernel (splits merged as the Triton path's); in the backward
_grad_from_logits_kernel turns it into g, then the same two products. The cost is memory traffic the Triton
path does not have: each pass writes and reads all the fp32 logits once, chunk by chunk, 3.2 GB each way at
the paper's size (S = 6144, V = 128256).

Tile sizes: on a GPU each kernel is autotuned (once per (V, H, dtypes) key; the number of tokens is not
in the key, so a new batch shape does not tune again) over a few Hopper configurations (TUNING), or runs
the one that AMAPO_TRITON_CONFIG=<index> pins (under torch.use_deterministic_algorithms(True) without it, the
one of least shared memory: DETERMINISTIC_CONFIGS); the interpreter gets the smallest tl.dot tiles
(INTERPRETER_BLOCKS), so small test shapes already span several blocks, splits and chunks, and a test swaps
in each GPU tile there (test_gpu_tiles_match_reference).

Matmul precision: bf16/fp16 operands go through tensor cores with fp32 accumulation; fp32 operands use tf32
only when torch.backends.cuda.matmul.allow_tf32 is set, else exact fp32 ("ieee"); mixed dtypes are upcast
to fp32. The cuBLAS products follow torch's own settings, as eager autograd would.

Positions whose label is ignore_index are never read, so a non-finite hidden state there (padding) reaches
neither the statistics nor any gradient, and their rows of grad_hidden are exact zeros.

Gradient filter (opt-in, off by default): a backward tile whose softmax entries are all below `eps` (the
resolution of the gradients' dtype, finfo(dtype).eps, the finest of the dtypes of the gradients computed) and that
holds no label of its tokens is skipped, as Cut Cross-Entropy does. Every dropped entry of d loss / d z
is -coef_n * p_nv * softcap' with p_nv < eps and |softcap'| <= 1, so the error is bounded by
    |d grad_hidden[n, k]| <= |coef_n| * sum_{v dropped} p_nv |W[v, k]|
    |d grad_weight[v, k]| <= sum_{n dropped} |coef_n| p_nv |hidden[n, k]|
    |d grad_bias[v]|      <= sum_{n dropped} |coef_n| p_nv
(each at most eps times the number of dropped entries; tests/test_triton_fused_linear.py checks it).
Values (the forward) are never filtered. The filter runs on _accumulating_backward_kernel (in-kernel fp32
accumulation into buffers of the gradients' size), where a skipped tile saves its two products.

The interpreter: with TRITON_INTERPRET=1 in the environment before this module is imported, the same
kernels run on CPU tensors (numpy); tl.dot of bf16 blocks is wrong there (Triton 3.8), so test in fp32.

torch.compile: the entry points are torch.compiler.disable'd, so a compiled caller takes a graph break
around them and runs them eagerly (host-side grids and chunk loops, autotuning, the backward atomics).
"""

import functools
import os
import warnings

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)  # decided when the kernels below are decorated
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF = (torch.bfloat16, torch.float16)
# The backward's g chunk [S, chunk] (S scored tokens). With the [S, H] fp32 accumulator and the [S, H] copy
# of the scored rows (96 + 48 MiB at S = 6144 of B*T = 8192, H = 4096, bf16) the working memory is 208 MiB
# there, under 0.25 GiB; its ~5000 columns keep cuBLAS efficient and the g kernel's grid 7 waves deep.
GRAD_TILE_BYTES = 64 * 2**20
VOCAB_GRANULE = 256  # splits and chunks are multiples of every autotuned BV


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_logits(h_ptr, stride_hb, stride_ht, stride_hk, w_ptr, stride_wv, stride_wk, bias_ptr,
                 batch_row, step, row_live, offs_v, vocab_live, width, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
                 PRECISION: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """softcap(hidden @ W^T + b) of a [BN, BV] tile in fp32; rows not live read hidden as 0, vocabulary
    columns not live are -inf."""
    h_rows = h_ptr + batch_row.to(tl.int64) * stride_hb + step.to(tl.int64) * stride_ht
    w_cols = w_ptr + offs_v.to(tl.int64) * stride_wv
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for k0 in range(0, width, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_live = offs_k < width
        h = tl.load(h_rows[:, None] + offs_k[None, :].to(tl.int64) * stride_hk,
                    mask=row_live[:, None] & k_live[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + offs_k[:, None].to(tl.int64) * stride_wk,
                    mask=vocab_live[None, :] & k_live[:, None], other=0.0)  # [BK, BV]: W^T
        if DOT_F32:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(h, w, acc)
    return _bias_and_softcap(acc, bias_ptr, offs_v, vocab_live, softcap, HAS_BIAS, SOFTCAP)


@triton.jit
def _bias_and_softcap(acc, bias_ptr, offs_v, vocab_live, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """softcap(z + b) of an fp32 tile z of hidden @ W^T; vocabulary columns not live are -inf."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=vocab_live, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return tl.where(vocab_live[None, :], acc, float("-inf"))


@triton.jit
def _tanh(x):
    """tanh of an fp32 tile in fp32, with the ops the interpreter runs too (tl has no tanh there). Below
    |x| = 0.625, where 1 - exp(-2|x|) would cancel, the odd Taylor polynomial through x^19 (the next term is
    under 0.1 ulp there); above, (1 - e) / (1 + e) with e = exp(-2|x|) <= 0.29. Measured in the
    interpreter (numpy's fp32 exp) over [-8, 8]: within 1.84 ulp (0.77 on the polynomial), where torch.tanh
    is within 0.51; with the GPU's approximate exp (2 ulp) an fp32 emulation gives 2.8 (not measured on a
    GPU). In fp32, not fp64: a [128, 256] tile in fp64 took every register and spilled 10 KB a thread on
    sm_90 (tools/triton_hopper_build.py)."""
    a = tl.abs(x)
    near_zero = tl.minimum(a, 0.625)  # the polynomial's argument, kept finite where the other branch is taken
    u = near_zero * near_zero
    p = -443861162.0 / 1856156927625.0
    p = p * u + 6404582.0 / 10854718875.0
    p = p * u - 929569.0 / 638512875.0
    p = p * u + 21844.0 / 6081075.0
    p = p * u - 1382.0 / 155925.0
    p = p * u + 62.0 / 2835.0
    p = p * u - 17.0 / 315.0
    p = p * u + 2.0 / 15.0
    p = p * u - 1.0 / 3.0
    e = tl.exp(-2.0 * a)
    magnitude = tl.where(a < 0.625, near_zero + near_zero * u * p, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _softmax_of_tile(s, live, stats_ptr, token):
    """softmax of a tile of logits s from the forward's per-token (max, log sum exp(s - max))."""
    row_max = tl.load(stats_ptr + token.to(tl.int64) * 2, mask=live, other=0.0)
    row_log_sum = tl.load(stats_ptr + token.to(tl.int64) * 2 + 1, mask=live, other=0.0)
    # (s - max) is exact near the max (Sterbenz), so p keeps its relative accuracy at any logit scale
    return tl.exp((s - row_max[:, None]) - row_log_sum[:, None])


@triton.jit
def _grad_of_tile(s, p, hit, coef, live, vocab_live, softcap, SOFTCAP: tl.constexpr):
    """coef * (onehot - softmax) * softcap' of a tile of logits s, 0 outside live rows and columns."""
    g = coef[:, None] * (hit.to(tl.float32) - p)
    if SOFTCAP:
        capped = tl.where(vocab_live[None, :], s, 0.0) / softcap  # not -inf: 0 * inf would be NaN
        g = g * (1.0 - capped * capped)
    return tl.where(live[:, None] & vocab_live[None, :], g, 0.0)


@triton.jit
def _scored_rows(token_ptr, offs, rows, steps, labels_ptr, stride_lb, stride_lt, shift, ignore_index):
    """(batch row, step, label, in range) of the scored tokens offs < rows: token_ptr holds their flat indices
    n = b * Ts + t."""
    in_range = offs < rows
    token = tl.load(token_ptr + offs, mask=in_range, other=0)
    batch_row = token // steps
    step = token % steps
    labels = tl.load(labels_ptr + batch_row * stride_lb + (step + shift) * stride_lt, mask=in_range,
                     other=ignore_index)
    return batch_row, step, labels, in_range


@triton.jit
def _stats_kernel(h_ptr, stride_hb, stride_ht, stride_hk, w_ptr, stride_wv, stride_wk, bias_ptr,
                  labels_ptr, stride_lb, stride_lt, token_ptr, max_ptr, sum_ptr, label_logit_ptr,
                  rows, steps, vocab, width, shift, ignore_index, softcap, split_width,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
                  PRECISION: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """Per scored token i < rows (a compact list): the (max, sum of exp) of its logits in this program's
    vocabulary split, and its label's logit."""
    split = tl.program_id(1)
    offs_n, batch_row, step, labels, in_range, live = _stats_rows(token_ptr, labels_ptr, stride_lb, stride_lt, rows,
                                                                  steps, shift, ignore_index, BN)
    # a block with no live token (none, in a compact list of scored tokens, but cheap to keep) stores (0, 1)
    running_max = tl.zeros((BN,), dtype=tl.float32)
    running_sum = tl.full((BN,), 1.0, dtype=tl.float32)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        running_max = tl.full((BN,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BN,), dtype=tl.float32)
        v_begin = split * split_width
        v_end = tl.minimum(v_begin + split_width, vocab)
        for v0 in range(v_begin, v_end, BV):
            offs_v = v0 + tl.arange(0, BV)
            vocab_live = offs_v < v_end
            s = _tile_logits(h_ptr, stride_hb, stride_ht, stride_hk, w_ptr, stride_wv, stride_wk, bias_ptr,
                             batch_row, step, live, offs_v, vocab_live, width, softcap,
                             HAS_BIAS, SOFTCAP, DOT_F32, PRECISION, BN, BV, BK)
            # (a block never straddles two splits: splits are whole blocks, and labels lie below the vocabulary)
            running_max, running_sum = _fold_tile(s, running_max, running_sum, labels, live, offs_n, offs_v, v0,
                                                  v0 + BV, label_logit_ptr)
    _store_split_stats(max_ptr, sum_ptr, split, rows, offs_n, in_range, running_max, running_sum)


@triton.jit
def _stats_rows(token_ptr, labels_ptr, stride_lb, stride_lt, rows, steps, shift, ignore_index, BN: tl.constexpr):
    """The scored tokens of this program of a statistics kernel: (offsets, batch row, step, label, in range,
    live: in range and scored)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    batch_row, step, labels, in_range = _scored_rows(token_ptr, offs_n, rows, steps, labels_ptr, stride_lb,
                                                     stride_lt, shift, ignore_index)
    return offs_n, batch_row, step, labels, in_range, in_range & (labels != ignore_index)


@triton.jit
def _store_split_stats(max_ptr, sum_ptr, split, rows, offs_n, in_range, running_max, running_sum):
    """Stores the tokens' (max, sum of exp) over one vocabulary split as row `split` of [splits, rows]."""
    out = split.to(tl.int64) * rows + offs_n
    tl.store(max_ptr + out, running_max, mask=in_range)
    tl.store(sum_ptr + out, running_sum, mask=in_range)


@triton.jit
def _fold_tile(s, running_max, running_sum, labels, live, offs_n, offs_v, v_begin, v_end, label_logit_ptr):
    """The running (max, sum of exp) of each token's logits with a [BN, BV] tile s (vocabulary columns
    offs_v = v_begin + arange(BV), those from v_end on -inf) folded in, and the label's logit stored by the tile
    that holds it. A split starts inside the vocabulary (host side), but a bias of -inf can mask its first tiles
    (e.g. reserved ids): until a finite logit comes, the max stays -inf and the tile is shifted by 0, not by
    -inf (-inf - (-inf) is NaN); such a split stores (-inf, 0), which the merge weighs by exp(-inf) = 0."""
    new_max = tl.maximum(running_max, tl.max(s, axis=1))
    pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - pivot) + tl.sum(tl.exp(s - pivot[:, None]), axis=1)
    hit = offs_v[None, :] == labels[:, None]
    label_logit = tl.sum(tl.where(hit, s, 0.0), axis=1)
    # a test per row, not a reduction of hit: one more [BN, BV] reduction spilled 9 KB a thread on sm_90
    tl.store(label_logit_ptr + offs_n, label_logit, mask=live & (labels >= v_begin) & (labels < v_end))
    return new_max, running_sum


@triton.jit
def _stats_from_logits_kernel(z_ptr, stride_z, bias_ptr, labels_ptr, stride_lb, stride_lt, token_ptr, max_ptr,
                              sum_ptr, label_logit_ptr, rows, steps, shift, ignore_index, softcap, v_start, chunk,
                              split_width, first_split, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                              BN: tl.constexpr, BV: tl.constexpr):
    """_stats_kernel for matmuls="cublas": the chunk's logits z = hidden @ W^T (fp32, [rows, chunk], from the
    same cuBLAS product as the backward's) are read instead of computed, bias and softcap applied by the same
    epilogue as the backward's; this program's split of the chunk's columns goes to split first_split + its
    index."""
    split = tl.program_id(1)
    offs_n, _, _, labels, in_range, live = _stats_rows(token_ptr, labels_ptr, stride_lb, stride_lt, rows, steps,
                                                       shift, ignore_index, BN)
    running_max = tl.full((BN,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BN,), dtype=tl.float32)
    j_begin = split * split_width
    j_end = tl.minimum(j_begin + split_width, chunk)
    for j0 in range(j_begin, j_end, BV):
        offs_j = j0 + tl.arange(0, BV)
        vocab_live = offs_j < j_end
        z = tl.load(z_ptr + offs_n.to(tl.int64)[:, None] * stride_z + offs_j[None, :],
                    mask=in_range[:, None] & vocab_live[None, :], other=0.0)
        s = _bias_and_softcap(z, bias_ptr, v_start + offs_j, vocab_live, softcap, HAS_BIAS, SOFTCAP)
        running_max, running_sum = _fold_tile(s, running_max, running_sum, labels, live, offs_n, v_start + offs_j,
                                              v_start + j0, v_start + tl.minimum(j0 + BV, j_end), label_logit_ptr)
    _store_split_stats(max_ptr, sum_ptr, first_split + split, rows, offs_n, in_range, running_max, running_sum)


@triton.jit
def _g_chunk_tile(token_ptr, labels_ptr, stride_lb, stride_lt, coef_ptr, rows, steps, shift, ignore_index,
                  v_start, chunk, BN: tl.constexpr, BV: tl.constexpr):
    """The (scored token block, chunk column block) of this program of a g-chunk kernel: offsets, the tokens'
    coordinates, labels and coefficients, and which rows are live (scored with a nonzero coefficient)."""
    offs_r = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_j = tl.program_id(1) * BV + tl.arange(0, BV)
    batch_row, step, labels, in_range = _scored_rows(token_ptr, offs_r, rows, steps, labels_ptr, stride_lb,
                                                     stride_lt, shift, ignore_index)
    coef = tl.load(coef_ptr + offs_r, mask=in_range, other=0.0)
    live = in_range & (labels != ignore_index) & (coef != 0.0)
    return offs_r, offs_j, v_start + offs_j, offs_j < chunk, batch_row, step, labels, in_range, coef, live


@triton.jit
def _grad_logits_kernel(h_ptr, stride_hb, stride_ht, stride_hk, w_ptr, stride_wv, stride_wk, bias_ptr,
                        labels_ptr, stride_lb, stride_lt, token_ptr, stats_ptr, coef_ptr, g_ptr, stride_g,
                        grad_b_ptr, rows, steps, vocab, width, shift, ignore_index, softcap, v_start, chunk,
                        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
                        PRECISION: tl.constexpr, NEED_B: tl.constexpr,
                        BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """g[i, j] = d loss / d z[token i, v_start + j] for the scored tokens i < rows (a compact list; statistics
    and coefficients indexed by i), columns j < chunk; grad_b[j] += sum_i g[i, j]."""
    offs_r, offs_j, offs_v, vocab_live, batch_row, step, labels, in_range, coef, live = _g_chunk_tile(
        token_ptr, labels_ptr, stride_lb, stride_lt, coef_ptr, rows, steps, shift, ignore_index, v_start, chunk,
        BN, BV)
    g = tl.zeros((BN, BV), dtype=tl.float32)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        s = _tile_logits(h_ptr, stride_hb, stride_ht, stride_hk, w_ptr, stride_wv, stride_wk, bias_ptr,
                         batch_row, step, live, offs_v, vocab_live, width, softcap,
                         HAS_BIAS, SOFTCAP, DOT_F32, PRECISION, BN, BV, BK)
        g = _grad_tile(s, labels, coef, live, offs_r, offs_j, offs_v, vocab_live, stats_ptr, grad_b_ptr, softcap,
                       SOFTCAP, NEED_B)
    tl.store(g_ptr + offs_r.to(tl.int64)[:, None] * stride_g + offs_j[None, :], g.to(g_ptr.dtype.element_ty),
             mask=in_range[:, None] & vocab_live[None, :])


@triton.jit
def _grad_tile(s, labels, coef, live, offs_r, offs_j, offs_v, vocab_live, stats_ptr, grad_b_ptr, softcap,
               SOFTCAP: tl.constexpr, NEED_B: tl.constexpr):
    """g of a tile of softcapped logits s of the scored tokens offs_r; grad_b[j] += its column sums."""
    p = _softmax_of_tile(s, live, stats_ptr, offs_r)
    hit = (offs_v[None, :] == labels[:, None]) & live[:, None]
    g = _grad_of_tile(s, p, hit, coef, live, vocab_live, softcap, SOFTCAP)
    if NEED_B:
        tl.atomic_add(grad_b_ptr + offs_j, tl.sum(g, axis=0), mask=vocab_live)
    return g


@triton.jit
def _grad_from_logits_kernel(z_ptr, stride_z, bias_ptr, labels_ptr, stride_lb, stride_lt, token_ptr, stats_ptr,
                             coef_ptr, g_ptr, stride_g, grad_b_ptr, rows, steps, shift, ignore_index, softcap,
                             v_start, chunk, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, NEED_B: tl.constexpr,
                             BN: tl.constexpr, BV: tl.constexpr):
    """_grad_logits_kernel's g for matmuls="cublas": the chunk's logits z = hidden @ W^T (fp32, [rows, chunk],
    from cuBLAS) are read instead of computed; bias and softcap are applied here, as the tile epilogue does."""
    offs_r, offs_j, offs_v, vocab_live, batch_row, step, labels, in_range, coef, live = _g_chunk_tile(
        token_ptr, labels_ptr, stride_lb, stride_lt, coef_ptr, rows, steps, shift, ignore_index, v_start, chunk,
        BN, BV)
    tile = in_range[:, None] & vocab_live[None, :]
    z = tl.load(z_ptr + offs_r.to(tl.int64)[:, None] * stride_z + offs_j[None, :], mask=tile, other=0.0)
    s = _bias_and_softcap(z, bias_ptr, offs_v, vocab_live, softcap, HAS_BIAS, SOFTCAP)
    g = _grad_tile(s, labels, coef, live, offs_r, offs_j, offs_v, vocab_live, stats_ptr, grad_b_ptr, softcap,
                   SOFTCAP, NEED_B)
    tl.store(g_ptr + offs_r.to(tl.int64)[:, None] * stride_g + offs_j[None, :], g.to(g_ptr.dtype.element_ty),
             mask=tile)


@triton.jit
def _accumulating_backward_kernel(h_ptr, stride_hb, stride_ht, stride_hk, w_ptr, stride_wv, stride_wk, bias_ptr,
                                  labels_ptr, stride_lb, stride_lt, token_ptr, stats_ptr, coef_ptr,
                                  grad_h_ptr, grad_w_ptr, grad_b_ptr,
                                  rows, steps, vocab, width, shift, ignore_index, softcap, filter_eps,
                                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
                                  PRECISION: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
                                  NEED_B: tl.constexpr, FILTER: tl.constexpr,
                                  BN: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """grid (blocks of scored tokens, vocabulary blocks): recomputes a tile and atomically adds g @ W_blk into
    grad_hidden's rows of the scored tokens ([rows, H]), g^T @ hidden_blk into grad_weight and sum_n g into
    grad_bias (fp32 buffers); with FILTER a tile of negligible softmax and no label is skipped."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_v = pid_v * BV + tl.arange(0, BV)
    vocab_live = offs_v < vocab
    batch_row, step, labels, in_range = _scored_rows(token_ptr, offs_n, rows, steps, labels_ptr, stride_lb,
                                                     stride_lt, shift, ignore_index)
    coef = tl.load(coef_ptr + offs_n, mask=in_range, other=0.0)
    live = in_range & (labels != ignore_index) & (coef != 0.0)
    s = _tile_logits(h_ptr, stride_hb, stride_ht, stride_hk, w_ptr, stride_wv, stride_wk, bias_ptr,
                     batch_row, step, live, offs_v, vocab_live, width, softcap,
                     HAS_BIAS, SOFTCAP, DOT_F32, PRECISION, BN, BV, BK)
    p = _softmax_of_tile(s, live, stats_ptr, offs_n)
    hit = (offs_v[None, :] == labels[:, None]) & live[:, None]
    keep = tl.max(live.to(tl.int32), axis=0) > 0
    if FILTER:
        largest = tl.max(tl.where(live[:, None], p, 0.0))
        keep = keep & ((largest >= filter_eps) | (tl.max(hit.to(tl.int32)) > 0))
    if keep:
        g = _grad_of_tile(s, p, hit, coef, live, vocab_live, softcap, SOFTCAP)
        if NEED_B:
            tl.atomic_add(grad_b_ptr + offs_v, tl.sum(g, axis=0), mask=vocab_live)
        if DOT_F32:
            g_dot = g
        else:
            g_dot = g.to(h_ptr.dtype.element_ty)  # as eager autograd rounds grad_logits in bf16/fp16
        h_rows = h_ptr + batch_row.to(tl.int64) * stride_hb + step.to(tl.int64) * stride_ht
        w_rows = w_ptr + offs_v.to(tl.int64) * stride_wv
        for k0 in range(0, width, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_live = offs_k < width
            if NEED_H:
                w = tl.load(w_rows[:, None] + offs_k[None, :].to(tl.int64) * stride_wk,
                            mask=vocab_live[:, None] & k_live[None, :], other=0.0)  # [BV, BK]
                if DOT_F32:
                    part = tl.dot(g_dot, w.to(tl.float32), input_precision=PRECISION)
                else:
                    part = tl.dot(g_dot, w)
                tl.atomic_add(grad_h_ptr + offs_n.to(tl.int64)[:, None] * width + offs_k[None, :], part,
                              mask=live[:, None] & k_live[None, :])
            if NEED_W:
                h = tl.load(h_rows[:, None] + offs_k[None, :].to(tl.int64) * stride_hk,
                            mask=live[:, None] & k_live[None, :], other=0.0)  # [BN, BK]
                if DOT_F32:
                    part = tl.dot(tl.trans(g_dot), h.to(tl.float32), input_precision=PRECISION)
                else:
                    part = tl.dot(tl.trans(g_dot), h)
                tl.atomic_add(grad_w_ptr + offs_v.to(tl.int64)[:, None] * width + offs_k[None, :], part,
                              mask=vocab_live[:, None] & k_live[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

INTERPRETER_BLOCKS = {"BN": 16, "BV": 16, "BK": 16}  # tl.dot's smallest tiles
# _grad_from_logits_kernel and _stats_from_logits_kernel (no tl.dot, bandwidth-bound): [16, 512] fp32 tiles, 32
# elements a thread
ELEMENTWISE_BLOCKS = {"BN": 16, "BV": 512, "num_warps": 8}
# the filter's kernel on a GPU, by operands (fp32 with BK = 64 and 3 stages would need 240 KiB of shared memory)
ACCUMULATING_BLOCKS = {"half": {"BN": 64, "BV": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
                       "fp32": {"BN": 64, "BV": 128, "BK": 32, "num_warps": 8, "num_stages": 3}}


def _config(bn, bv, bk, warps, stages):
    return triton.Config({"BN": bn, "BV": bv, "BK": bk}, num_warps=warps, num_stages=stages)


# Hopper first choices (wgmma tiles for 16-bit operands, smaller ones for fp32's FMA or tf32), from which
# the autotuner picks by measurement; every BV divides VOCAB_GRANULE. tests/test_triton_fused_linear.py
# compiles each for sm_90 and checks its shared memory. Each dtype has a configuration that an SM holds two
# blocks of (half: 128 x 128 x 64, 4 warps, 3 stages, 96 KiB; the other half configurations hold one), so
# that one block's wgmma runs while the other is in its softmax epilogue or refilling its K-loop pipeline.
TUNING = {
    "half": [_config(128, 256, 64, 8, 3), _config(128, 128, 64, 8, 4), _config(128, 128, 64, 4, 4),
             _config(64, 256, 64, 4, 4), _config(128, 128, 64, 4, 3)],
    "fp32": [_config(64, 64, 32, 4, 3), _config(128, 128, 32, 8, 3), _config(64, 128, 32, 4, 4)],
}


TUNED_KERNELS = ("_stats_kernel", "_grad_logits_kernel")  # the autotuned ones; the others have one configuration


@functools.cache
def _tuned(kernel_name: str, operands: str):
    """The autotuned launcher of a kernel for 'half' or 'fp32' operands, keyed on (V, H) and the dtypes;
    the g kernel's bias gradient is reset between trials (its atomics would otherwise add up)."""
    reset = ["grad_b_ptr"] if kernel_name == "_grad_logits_kernel" else None
    return triton.autotune(configs=TUNING[operands], key=["vocab", "width"], reset_to_zero=reset)(
        globals()[kernel_name])


def autotuned_configs() -> dict[str, str]:
    """The configuration the autotuner chose for each kernel and key so far, with its TUNING index (what
    AMAPO_TRITON_CONFIG pins), for results files; empty where nothing was tuned (the interpreter, the CPU)."""
    if INTERPRETED:
        return {}
    chosen = {}
    for kernel in TUNED_KERNELS:
        for operands, configs in TUNING.items():
            for key, config in _tuned(kernel, operands).cache.items():
                tile = " ".join(f"{name}={config.kwargs[name]}" for name in ("BN", "BV", "BK"))
                chosen[f"{kernel} {operands} V={key[0]} H={key[1]}"] = (
                    f"{tile}, {config.num_warps} warps, {config.num_stages} stages "
                    f"(AMAPO_TRITON_CONFIG={configs.index(config)})")
    return chosen


CONFIG_VARIABLE = "AMAPO_TRITON_CONFIG"


def _pinned_config(operands: str) -> triton.Config | None:
    """The configuration that AMAPO_TRITON_CONFIG pins, or None to autotune (its default, "auto"). An index
    into TUNING[operands] skips the tuning trials: reproducible timings, and tests that check each
    configuration (or a short job that cannot repay the tuning)."""
    value = os.environ.get(CONFIG_VARIABLE, "auto")
    if value == "auto":
        return None
    configs = TUNING[operands]
    if not value.isdigit() or int(value) >= len(configs):
        raise ValueError(f"{CONFIG_VARIABLE} must be 'auto' or an index below {len(configs)} (the {operands} "
                         f"configurations of TUNING), got {value!r}")
    return configs[int(value)]


def _smallest_config(configs: list) -> triton.Config:
    """The configuration whose K-loop pipeline takes the least shared memory: the one every GPU that can
    run any of them can run."""
    return min(configs, key=lambda c: (c.kwargs["BN"] + c.kwargs["BV"]) * c.kwargs["BK"] * c.num_stages)


# Under torch.use_deterministic_algorithms(True) without AMAPO_TRITON_CONFIG: the autotuner picks by timing, so
# two processes (or two runs) could pick different tiles and sum each dot product in another order.
DETERMINISTIC_CONFIGS = {operands: _smallest_config(configs) for operands, configs in TUNING.items()}


def _launch_config(operands: str) -> triton.Config | None:
    """The configuration a GPU launch runs: AMAPO_TRITON_CONFIG's, else DETERMINISTIC_CONFIGS' under
    torch.use_deterministic_algorithms(True), else None (autotune)."""
    config = _pinned_config(operands)
    if config is None and torch.are_deterministic_algorithms_enabled():
        return DETERMINISTIC_CONFIGS[operands]
    return config


def _launch(kernel_name: str, dot_f32: bool, grid, *args, **flags) -> None:
    """Launches a kernel with grid(meta): autotuned on a GPU (or the configuration _launch_config fixes),
    the interpreter's blocks on the CPU."""
    kernel = globals()[kernel_name]
    if INTERPRETED:
        kernel[grid(INTERPRETER_BLOCKS)](*args, **flags, **INTERPRETER_BLOCKS)
        return
    operands = "fp32" if dot_f32 else "half"
    config = _launch_config(operands)
    if config is None:
        _tuned(kernel_name, operands)[grid](*args, **flags)
    else:
        kernel[grid(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages)


def _stats_splits(tokens: int, vocab: int, device: torch.device) -> int:
    """Vocabulary entries per split of the statistics pass (a multiple of every BV): enough programs to
    fill the GPU; in the interpreter two blocks per split, so both the in-program and the cross-split merge
    run. Every split starts inside the vocabulary."""
    if INTERPRETED or device.type != "cuda":
        return 2 * INTERPRETER_BLOCKS["BV"]
    wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = min(triton.cdiv(vocab, VOCAB_GRANULE), max(1, triton.cdiv(wanted, triton.cdiv(tokens, 128))))
    return triton.cdiv(triton.cdiv(vocab, splits), VOCAB_GRANULE) * VOCAB_GRANULE


def _grad_chunk(positions: int, vocab: int, dtype: torch.dtype) -> int:
    """Vocabulary columns of one backward chunk: as many as fit in GRAD_TILE_BYTES at `dtype` (g's, or the
    fp32 logits' with matmuls="cublas"; a multiple of every BV); in the interpreter two blocks, so small
    test vocabularies span several chunks."""
    if INTERPRETED:
        return 2 * INTERPRETER_BLOCKS["BV"]
    fitting = GRAD_TILE_BYTES // max(1, positions * dtype.itemsize) // VOCAB_GRANULE * VOCAB_GRANULE
    return min(max(VOCAB_GRANULE, fitting), triton.cdiv(vocab, VOCAB_GRANULE) * VOCAB_GRANULE)


def _precision(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """(dot in fp32, input precision): tensor cores for two equal half dtypes, else fp32 operands, tf32
    only if torch allows it."""
    dot_f32 = not (hidden.dtype in _HALF and weight.dtype == hidden.dtype)
    tf32 = hidden.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return dot_f32, "tf32" if tf32 else "ieee"


class _Problem:
    """The arguments every kernel shares, derived once from the call's tensors."""

    def __init__(self, hidden, weight, bias, labels, shift, softcap, ignore_index):
        # the kernels index the bias densely (bias_ptr + v): a strided or expanded [V] view becomes a dense copy
        bias = None if bias is None else bias.contiguous()
        self.hidden, self.weight, self.bias, self.labels = hidden, weight, bias, labels
        self.shift, self.ignore_index = int(shift), ignore_index
        self.seq_len = hidden.shape[1]
        self.steps = max(self.seq_len - 1, 0) if shift else self.seq_len
        self.tokens = hidden.shape[0] * self.steps
        self.vocab, self.width = weight.shape
        self.dot_f32, precision = _precision(hidden, weight)
        self.g_dtype = torch.float32 if self.dot_f32 else hidden.dtype  # as eager autograd rounds grad_logits
        self.tensors = (
            hidden, *hidden.stride(), weight, *weight.stride(), bias if bias is not None else weight,
            labels, *labels.stride(),
        )
        self.softcap = 1.0 if softcap is None else softcap
        self.flags = {"HAS_BIAS": bias is not None, "SOFTCAP": softcap is not None, "DOT_F32": self.dot_f32,
                      "PRECISION": precision}

    def scored_tokens(self) -> torch.Tensor:
        """int64 [S]: the flat indices n = b * Ts + t of the tokens that score a label, in order (one host
        sync). The kernels and the cuBLAS products run over these S rows only: a prompt costs nothing."""
        used = self.labels[:, self.shift:self.shift + self.steps]
        return (used != self.ignore_index).reshape(-1).nonzero().squeeze(1)

    def coordinates(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, t) of the tokens n = b * Ts + t: their rows in hidden [B, T, H]."""
        steps = max(self.steps, 1)
        return tokens // steps, tokens % steps


def check_supported(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    backend: str = "triton") -> None:
    """Raises if these (already validated) inputs cannot run on this module's kernels (backend 'triton' or
    'cublas', named in the message)."""
    for name, tensor in (("hidden", hidden), ("lm_head_weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype not in DTYPES:
            raise TypeError(f"backend={backend!r} supports float32/bfloat16/float16; {name} is {tensor.dtype} "
                            "(use backend='torch' for float64)")
    if not hidden.is_cuda and not INTERPRETED:
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors, got hidden on {hidden.device}; to run the Triton kernels on "
            "the CPU set TRITON_INTERPRET=1 in the environment before amapo_kernels is imported"
        )
    if not INTERPRETED:
        _pinned_config("fp32" if _precision(hidden, weight)[0] else "half")  # a bad AMAPO_TRITON_CONFIG


# ---------------------------------------------------------------------------------------------
# Entry points (used by amapo_kernels.fused_linear's autograd Function)
# ---------------------------------------------------------------------------------------------


MATMULS = ("triton", "cublas")


def _check_matmuls(matmuls: str) -> None:
    if matmuls not in MATMULS:
        raise ValueError(f"matmuls must be one of {list(MATMULS)}, got {matmuls!r}")


@torch.compiler.disable
def token_stats(hidden, weight, bias, labels, *, shift, softcap, ignore_index, matmuls="triton") -> torch.Tensor:
    """[N, 3] fp64 (max, log sum exp(s - max), label logit) per scored position, as the torch backend's;
    positions whose label is ignore_index get zeros. matmuls: "triton" (the logits in the stats kernel's
    tile epilogue, never in memory) or "cublas" (see _cublas_split_stats)."""
    _check_matmuls(matmuls)
    problem = _Problem(hidden, weight, bias, labels, shift, softcap, ignore_index)
    device = hidden.device
    stats = torch.zeros(problem.tokens, 3, dtype=torch.float64, device=device)
    scored = problem.scored_tokens()
    rows = scored.numel()
    if rows == 0:
        return stats
    if matmuls == "cublas":
        maxima, sums, label_logit = _cublas_split_stats(problem, scored)
    else:
        split_width = _stats_splits(rows, problem.vocab, device)
        splits = triton.cdiv(problem.vocab, split_width)
        maxima = torch.empty(splits, rows, dtype=torch.float32, device=device)
        sums = torch.empty_like(maxima)
        label_logit = torch.zeros(rows, dtype=torch.float32, device=device)
        _launch("_stats_kernel", problem.dot_f32, lambda meta: (triton.cdiv(rows, meta["BN"]), splits),
                *problem.tensors, scored, maxima, sums, label_logit, rows, max(problem.steps, 1), problem.vocab,
                problem.width, problem.shift, ignore_index, problem.softcap, split_width, **problem.flags)
    # the merge of the splits in fp64: O(splits * N), rounding that does not grow with the split count
    row_max = maxima.double().amax(dim=0)
    log_sum = (sums.double() * torch.exp(maxima.double() - row_max)).sum(dim=0).log()
    stats[scored] = torch.stack([row_max, log_sum, label_logit.double()], dim=1)
    return stats


def _cublas_split_stats(problem: _Problem, scored: torch.Tensor):
    """(maxima [splits, S], sums of exp, label logits [S]) of the scored tokens with matmuls="cublas", as
    _stats_kernel's: by the backward's vocabulary chunks, the chunk's fp32 logits from the very cuBLAS product
    the backward recomputes (_cublas_chunk_logits, same operands and shapes: the same bits), reduced by
    _stats_from_logits_kernel. So the backward's softmax exp(z - max - log sum) sums to 1 over its own logits:
    logits of another product (whole rows, as this pass took before) differ in the last bits, which biased
    every gradient by about their difference times E_p[W] (fp32 grad_hidden 5x torch's error, measured in the
    interpreter)."""
    rows = scored.numel()
    device = problem.hidden.device
    chunk = _cublas_chunk(rows, problem.vocab)
    blocks = INTERPRETER_BLOCKS if INTERPRETED else ELEMENTWISE_BLOCKS
    split_width = 2 * blocks["BV"]  # two tiles a program: the in-program fold and the merge of splits both run
    chunk_splits = [triton.cdiv(min(chunk, problem.vocab - v0), split_width)
                    for v0 in range(0, problem.vocab, chunk)]
    maxima = torch.empty(sum(chunk_splits), rows, dtype=torch.float32, device=device)
    sums = torch.empty_like(maxima)
    label_logit = torch.zeros(rows, dtype=torch.float32, device=device)
    operands = _scored_hidden_rows(problem, scored, problem.g_dtype)
    bias = problem.bias if problem.bias is not None else maxima
    first_split = 0
    for (v0, weight_chunk), splits in zip(_vocab_chunks(problem, chunk), chunk_splits):
        z = _cublas_chunk_logits(operands, weight_chunk)
        _stats_from_logits_kernel[(triton.cdiv(rows, blocks["BN"]), splits)](
            z, z.stride(0), bias, problem.labels, *problem.labels.stride(), scored, maxima, sums, label_logit, rows,
            max(problem.steps, 1), problem.shift, problem.ignore_index, problem.softcap, v0, weight_chunk.shape[0],
            split_width, first_split, HAS_BIAS=problem.flags["HAS_BIAS"], SOFTCAP=problem.flags["SOFTCAP"],
            BN=blocks["BN"], BV=blocks["BV"], **({} if INTERPRETED else {"num_warps": blocks["num_warps"]}),
        )
        first_split += splits
    return maxima, sums, label_logit


def _cublas_chunk(positions: int, vocab: int) -> int:
    """Vocabulary columns of one chunk with matmuls="cublas", forward and backward alike (their logits must be
    the same product): fp32 logits of GRAD_TILE_BYTES at most."""
    return _grad_chunk(positions, vocab, torch.float32)


def _vocab_chunks(problem: _Problem, chunk: int):
    """(v0, W[v0:v0 + chunk] in g's dtype) over the vocabulary: a view unless the dtypes are mixed."""
    for v0 in range(0, problem.vocab, chunk):
        yield v0, problem.weight[v0:v0 + chunk].to(problem.g_dtype)


def _cublas_chunk_logits(rows: torch.Tensor, weight_chunk: torch.Tensor) -> torch.Tensor:
    """The fp32 logits rows @ weight_chunk^T of a chunk (bias and softcap not applied), the one product
    both passes of matmuls="cublas" take."""
    return _product_fp32(rows, weight_chunk.t())


def _product_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32: cuBLAS accumulates two 16-bit operands into an fp32 output directly; fp32 operands
    follow torch's tf32 setting, as eager autograd."""
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _alert_atomics(what: str) -> None:
    """As torch's own CUDA ops with atomics (index_add_, scatter_add_, ...) do under
    torch.use_deterministic_algorithms(True): a RuntimeError, or a warning with warn_only=True. fp32 atomic adds
    sum the programs' partials in the order they happen to run, so those gradients' bits change from run to run."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"amapo_kernels.sequence_logps_from_hidden's Triton backward ({what}: fp32 atomic adds) does not "
               "have a deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'; "
               "backend='torch' is deterministic")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


@torch.compiler.disable
def gradients(hidden, weight, bias, labels, softmax_stats, coefs, *, shift, softcap, ignore_index,
              need_hidden, need_weight, need_bias, gradient_filter=False, accumulate="auto", matmuls="triton"):
    """(grad_hidden, grad_weight, grad_bias) of sum_n coefs[n] * lp[n], in the inputs' dtypes (None where
    not needed). softmax_stats: [N, 2] (max, log sum) of the forward; coefs: [N].
    accumulate: "matmul" (g chunks and cuBLAS), "in_kernel" (the accumulating kernel), "auto" (in_kernel
    exactly when the gradient filter is on, which only that kernel implements).
    matmuls: where the g chunks' logits are recomputed: "triton" (in _grad_logits_kernel's matmul) or "cublas"
    (an fp32 cuBLAS product read by _grad_from_logits_kernel); "cublas" needs accumulate "matmul" / "auto"."""
    if accumulate not in ("auto", "matmul", "in_kernel"):
        raise ValueError(f"accumulate must be 'auto', 'matmul' or 'in_kernel', got {accumulate!r}")
    if gradient_filter and accumulate == "matmul":
        raise ValueError("gradient_filter=True runs on the in-kernel accumulation (accumulate='in_kernel')")
    _check_matmuls(matmuls)
    if matmuls == "cublas" and (gradient_filter or accumulate == "in_kernel"):
        raise ValueError("matmuls='cublas' recomputes the logits with cuBLAS for the g chunks; the gradient filter "
                         "and accumulate='in_kernel' run on the accumulating Triton kernel (matmuls='triton')")
    if (gradient_filter or accumulate == "in_kernel") and (need_hidden or need_weight or need_bias):
        _alert_atomics("the accumulating kernel" + (" of gradient_filter=True" if gradient_filter else ""))
    elif need_bias:
        _alert_atomics("the bias gradient")
    problem = _Problem(hidden, weight, bias, labels, shift, softcap, ignore_index)
    scored = problem.scored_tokens() if need_hidden or need_weight or need_bias else None
    if scored is None or scored.numel() == 0:
        grads = (torch.zeros_like(hidden), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
        return tuple(g if need else None for g, need in zip(grads, (need_hidden, need_weight, need_bias)))
    # the scored tokens' rows only, in order
    stats, coefs = softmax_stats[scored].float().contiguous(), coefs[scored].float().contiguous()
    if gradient_filter or accumulate == "in_kernel":
        grad_rows, grad_weight, grad_bias = _accumulated_gradients(problem, scored, stats, coefs, need_hidden,
                                                                   need_weight, need_bias, gradient_filter)
    else:
        grad_rows, grad_weight, grad_bias = _chunked_gradients(problem, scored, stats, coefs, need_hidden,
                                                               need_weight, need_bias, matmuls)
    grad_hidden = _scatter_rows(problem, scored, grad_rows) if need_hidden else None
    return grad_hidden, grad_weight, grad_bias


def _scored_hidden_rows(problem: _Problem, scored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, H] copy of hidden's rows of the scored tokens in `dtype`, for grad_W = g^T @ rows: the rows of
    unscored positions (padding, whose NaN / inf must not reach grad_W) are never read."""
    return problem.hidden[problem.coordinates(scored)].to(dtype)


def _scatter_rows(problem: _Problem, scored: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """grad_hidden [B, T, H] in hidden's dtype: the scored tokens' rows of grad_rows [S, H], zeros elsewhere."""
    hidden = problem.hidden
    grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_hidden[problem.coordinates(scored)] = grad_rows.to(hidden.dtype)
    return grad_hidden


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc float32: cuBLAS accumulates 16-bit products into the fp32 output directly."""
    if a.is_cuda and a.dtype in _HALF:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _chunked_gradients(problem: _Problem, scored, stats, coefs, need_hidden, need_weight, need_bias, matmuls):
    """Vocabulary chunks: the g kernel writes the chunk's [S, chunk] gradient of the logits of the S scored
    tokens, then grad_rows += g @ W_chunk (an [S, H] fp32 accumulator) and grad_W[chunk] = g^T @ rows (the
    scored tokens' hidden rows; cast once). Returns (grad_rows, grad_weight, grad_bias)."""
    hidden, weight, bias = problem.hidden, problem.weight, problem.bias
    width, vocab, device = problem.width, problem.vocab, hidden.device
    positions = scored.numel()
    g_dtype = problem.g_dtype
    # with cuBLAS recomputing them, the chunk's fp32 logits are the larger buffer
    chunk = _cublas_chunk(positions, vocab) if matmuls == "cublas" else _grad_chunk(positions, vocab, g_dtype)
    g_chunk = torch.empty(positions, chunk, dtype=g_dtype, device=device)
    grad_rows = torch.zeros(positions, width, dtype=torch.float32, device=device) if need_hidden else None
    rows = _scored_hidden_rows(problem, scored, g_dtype) if need_weight or matmuls == "cublas" else None
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    unused = torch.zeros(1, dtype=torch.float32, device=device)
    for v0, weight_chunk in _vocab_chunks(problem, chunk):
        v1 = v0 + weight_chunk.shape[0]
        g = g_chunk[:, : v1 - v0]
        # without a bias gradient the kernel still takes a pointer, one the autotuner's reset may zero
        bias_part = grad_bias[v0:v1] if need_bias else unused
        if matmuls == "cublas":
            _cublas_grad_chunk(problem, scored, stats, coefs, rows, weight_chunk, v0, g, bias_part, need_bias)
        else:
            _launch("_grad_logits_kernel", problem.dot_f32,
                    lambda meta, columns=v1 - v0: (triton.cdiv(positions, meta["BN"]),
                                                   triton.cdiv(columns, meta["BV"])),
                    *problem.tensors, scored, stats, coefs, g, g.stride(0), bias_part, positions,
                    max(problem.steps, 1), vocab, width, problem.shift, problem.ignore_index, problem.softcap, v0,
                    v1 - v0, NEED_B=bool(need_bias), **problem.flags)
        if need_hidden:
            _add_product_fp32(grad_rows, g, weight_chunk)
        if need_weight:
            if weight.dtype == g_dtype:
                torch.mm(g.t(), rows, out=grad_weight[v0:v1])
            else:
                grad_weight[v0:v1] = torch.mm(g.t(), rows)
    del g, g_chunk, rows  # before grad_hidden's scatter, which allocates the gradient itself
    return grad_rows, grad_weight, grad_bias.to(bias.dtype) if need_bias else None


def _cublas_grad_chunk(problem: _Problem, scored, stats, coefs, rows, weight_chunk, v0, g, bias_part,
                       need_bias) -> None:
    """g [S, chunk] of the chunk of columns starting at v0 with matmuls="cublas": the fp32 logits
    rows @ weight_chunk^T from cuBLAS, then _grad_from_logits_kernel (bias, softcap, softmax from the saved
    statistics, g in g's dtype)."""
    columns = weight_chunk.shape[0]
    z = _cublas_chunk_logits(rows, weight_chunk)  # the forward's product (_cublas_split_stats): the same bits
    blocks = INTERPRETER_BLOCKS if INTERPRETED else ELEMENTWISE_BLOCKS
    grid = (triton.cdiv(scored.numel(), blocks["BN"]), triton.cdiv(columns, blocks["BV"]))
    bias = problem.bias if problem.bias is not None else z
    _grad_from_logits_kernel[grid](
        z, z.stride(0), bias, problem.labels, *problem.labels.stride(), scored, stats, coefs, g, g.stride(0),
        bias_part, scored.numel(), max(problem.steps, 1), problem.shift, problem.ignore_index, problem.softcap, v0,
        columns, HAS_BIAS=problem.flags["HAS_BIAS"], SOFTCAP=problem.flags["SOFTCAP"], NEED_B=bool(need_bias),
        BN=blocks["BN"], BV=blocks["BV"], **({} if INTERPRETED else {"num_warps": blocks["num_warps"]}),
    )


def _accumulated_gradients(problem: _Problem, scored, stats, coefs, need_hidden, need_weight, need_bias,
                           gradient_filter):
    """The accumulating kernel over (scored token block x vocabulary block) tiles into fp32 buffers.
    Returns (grad_rows [S, H] fp32, grad_weight, grad_bias)."""
    hidden, weight, bias = problem.hidden, problem.weight, problem.bias
    tokens, width, device = scored.numel(), problem.width, hidden.device
    grad_rows = torch.zeros(tokens, width, dtype=torch.float32, device=device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
    grad_bias = torch.zeros(problem.vocab, dtype=torch.float32, device=device) if need_bias else None
    # the resolution of the gradients computed: the finest of their dtypes (an fp32 grad_hidden or grad_bias of a
    # bf16 head is not filtered at bf16's eps)
    needed = [t for t, need in ((hidden, need_hidden), (weight, need_weight), (bias, need_bias)) if need]
    finest = min(torch.finfo(t.dtype).eps for t in needed)
    blocks = INTERPRETER_BLOCKS if INTERPRETED else ACCUMULATING_BLOCKS["fp32" if problem.dot_f32 else "half"]
    placeholder = stats  # a valid pointer for the gradients that are not needed
    grid = (triton.cdiv(tokens, blocks["BN"]), triton.cdiv(problem.vocab, blocks["BV"]))
    _accumulating_backward_kernel[grid](
        *problem.tensors, scored, stats, coefs,
        grad_rows if need_hidden else placeholder, grad_weight if need_weight else placeholder,
        grad_bias if need_bias else placeholder, tokens, max(problem.steps, 1), problem.vocab, width,
        problem.shift, problem.ignore_index, problem.softcap, finest,
        NEED_H=bool(need_hidden), NEED_W=bool(need_weight), NEED_B=bool(need_bias), FILTER=bool(gradient_filter),
        **problem.flags, **blocks,
    )
    return (
        grad_rows,
        grad_weight.to(weight.dtype) if need_weight else None,
        grad_bias.to(bias.dtype) if need_bias else None,
    )
