// Kernels of amapo_kernels::sequence_logps_{fwd,bwd,bwd_inplace} and the host code that launches them, written
// for HBM bandwidth: the forward reads each scored row of logits once, the backward reads it once more and writes
// its gradient once.
// - 16-byte vector loads (8 bf16/fp16, 4 fp32, 2 fp64 values) after peeling the row's unaligned head, so any V
//   and any row stride work; kUnroll (kBackwardUnroll) independent loads in flight per thread; per-vector max,
//   then exp of the exact difference x - max with the MUFU exponential (ex2.approx.ftz) for fp32 accumulation
//   (exact exp for fp64).
// - A fixed reduction order everywhere (no atomics), so reruns are bit-identical.
// - When B*T rows are too few to fill the GPU, each row's vocabulary is split across blocks and a second small
//   kernel merges the partial (max, sum of exp) in order; the per-sequence sums, label counts and backward
//   coefficients are one small kernel each.
// - 64-bit offsets throughout; rows of ignored labels are skipped (forward) or get exact zeros (backward).
// The host code is written against a `Device` (cuda_device.cuh): sequence_logps_cuda.cu launches on the current
// CUDA stream; the tests' CPU emulation of the CUDA execution model (tests/cuda_emulation) runs the same kernels
// and the same host code on a machine without a GPU.
#pragma once

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>

#include "sequence_logps.h"

namespace amapo::sequence_logps_kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;               // independent 16-byte loads in flight per thread (forward)
constexpr int kBackwardUnroll = 2;       // the backward's: 4 blocks per SM with kUnroll spill bf16 registers
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops beyond this
constexpr int64_t kMinChunk = 4096;      // vocabulary elements per block, at least, when a row is split

template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

// kVec values of one 16-byte load.
template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[kVec<scalar_t>];
};

// The logits are read-only in the forward: the non-coherent load path. The backward may write over them.
template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_readonly(const scalar_t* p) {
  Pack<scalar_t> pack;
  *reinterpret_cast<uint4*>(&pack) = __ldg(reinterpret_cast<const uint4*>(p));
  return pack;
}

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const scalar_t* p) {
  Pack<scalar_t> pack;
  *reinterpret_cast<uint4*>(&pack) = *reinterpret_cast<const uint4*>(p);
  return pack;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t>& pack) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&pack);
}

// exp for the softmax terms: ex2.approx.ftz of x * log2(e) for fp32 (an FMUL and a MUFU.EX2 instead of the
// ~10 instructions of expf; __expf adds 3 more to keep results below 2^-126, which no fp32 sum or 16-bit
// gradient needs), the exact exp for fp64 (gradcheck). Its argument is an exact difference x - max (or that
// minus log_sum), not a pre-scaled x * log2(e) - max * log2(e): the rounding of the pre-scaled max would cost
// the label's gradient c * (1 - p) its precision where p is close to 1.
__device__ __forceinline__ float softmax_exp(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#elif defined(AMAPO_EX2_APPROX_FTZ)  // the tests' CPU emulation (tests/cuda_emulation): the instruction's model
  return AMAPO_EX2_APPROX_FTZ(x * 1.4426950408889634f);
#else  // nvcc's host pass: never called
  return exp2f(x * 1.4426950408889634f);
#endif
}
__device__ __forceinline__ double softmax_exp(double x) { return exp(x); }

// Elements [0, n) of a row starting at p, split for 16-byte access: `head` scalars up to the first 16-byte
// boundary, `vectors` aligned packs, then the tail scalars.
struct RowLayout {
  int64_t head;
  int64_t vectors;
  int64_t tail_begin;
};

template <typename scalar_t>
__device__ __forceinline__ RowLayout row_layout(const scalar_t* p, int64_t n) {
  constexpr int vec = kVec<scalar_t>;
  const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) % vec);
  const int64_t head = min(n, misaligned == 0 ? int64_t(0) : vec - misaligned);
  const int64_t vectors = (n - head) / vec;
  return {head, vectors, head + vectors * vec};
}

// Running (max, sum of exp(x - max)) of one thread's values; -inf values contribute nothing. A NaN value makes
// sum_exp NaN (the max ignores it, exp(NaN - max) does not), and NaN stays there through every later add and
// merge, as in the CPU op. A +inf value makes sum_exp NaN too (exp(inf - inf)): the row's log-prob and
// gradient are NaN either way, as on the CPU.
template <typename acc>
struct SoftmaxState {
  acc max_x;
  acc sum_exp;

  template <int N>
  __device__ __forceinline__ void add(const acc (&x)[N]) {
    acc local = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) local = fmax(local, x[i]);
    if (local > max_x) {
      sum_exp *= softmax_exp(max_x - local);
      max_x = local;
    }
    if (max_x == -INFINITY) {  // every value so far is -inf or NaN: exp(x - max) would be exp(-inf + inf)
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (x[i] != x[i]) sum_exp = x[i];
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) sum_exp += softmax_exp(x[i] - max_x);
  }

  __device__ __forceinline__ void merge(acc other_max, acc other_sum) {
    const acc new_max = fmax(max_x, other_max);
    if (new_max == -INFINITY) {
      sum_exp += other_sum;  // both 0, unless one side saw a NaN
      return;
    }
    sum_exp = sum_exp * softmax_exp(max_x - new_max) + other_sum * softmax_exp(other_max - new_max);
    max_x = new_max;
  }
};

// Block-wide merge in a fixed order; the result is valid in every thread. The caller must __syncthreads()
// before calling it again (the shared scratch is reused).
template <typename acc>
__device__ SoftmaxState<acc> block_merge(SoftmaxState<acc> state) {
  __shared__ acc shared_max[kWarps];
  __shared__ acc shared_sum[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) {
    state.merge(__shfl_xor_sync(0xffffffff, state.max_x, offset), __shfl_xor_sync(0xffffffff, state.sum_exp, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_max[warp] = state.max_x;
    shared_sum[warp] = state.sum_exp;
  }
  __syncthreads();
  SoftmaxState<acc> total{shared_max[0], shared_sum[0]};
  for (int w = 1; w < kWarps; ++w) total.merge(shared_max[w], shared_sum[w]);
  return total;
}

// Block-wide sums of (acc, int64) in a fixed order; valid in thread 0. Same reuse rule as block_merge.
template <typename acc>
__device__ void block_sum(acc& value, int64_t& count) {
  __shared__ acc shared_value[kWarps];
  __shared__ int64_t shared_count[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffff, value, offset);
    count += __shfl_xor_sync(0xffffffff, count, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_value[warp] = value;
    shared_count[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      value += shared_value[w];
      count += shared_count[w];
    }
  }
}

// The (max, sum of exp) of elements [0, n) of the row at p, reduced over the block.
template <typename scalar_t, typename acc>
__device__ SoftmaxState<acc> row_softmax_state(const scalar_t* p, int64_t n) {
  constexpr int vec = kVec<scalar_t>;
  const RowLayout layout = row_layout(p, n);
  SoftmaxState<acc> state{acc(-INFINITY), acc(0)};
  if (threadIdx.x < layout.head) {  // fewer than vec scalars each
    const acc x[1] = {static_cast<acc>(p[threadIdx.x])};
    state.add(x);
  }
  if (threadIdx.x < n - layout.tail_begin) {
    const acc x[1] = {static_cast<acc>(p[layout.tail_begin + threadIdx.x])};
    state.add(x);
  }
  const scalar_t* aligned = p + layout.head;
  for (int64_t first = threadIdx.x; first < layout.vectors; first += int64_t(kThreads) * kUnroll) {
    Pack<scalar_t> packs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll in flight
      const int64_t v = first + int64_t(u) * kThreads;
      if (v < layout.vectors) packs[u] = load_readonly(aligned + v * vec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (first + int64_t(u) * kThreads < layout.vectors) {
        acc x[vec];
#pragma unroll
        for (int i = 0; i < vec; ++i) x[i] = static_cast<acc>(packs[u].v[i]);
        state.add(x);
      }
    }
  }
  return block_merge(state);
}

// The label's logit in the row at x. Labels are range-checked on the host before launch unless the caller turned
// the check off (check_labels=False, or CUDA-graph capture): an out-of-range label then gives NaN, never an
// out-of-bounds read.
template <typename scalar_t, typename acc>
__device__ __forceinline__ acc label_logit(const scalar_t* x, int64_t label, int64_t vocab) {
  return label >= 0 && label < vocab ? static_cast<acc>(x[label]) : acc(NAN);
}

// The row's (max, log sum exp(x - max)) as the CPU op computes them with ATen's amax and exp (a row with NaN or
// +inf, whose log-prob is NaN on every device, gets non-finite statistics, not necessarily the CPU's: fmax drops
// NaN), and the label's log-prob. (x - max) - log(sum) keeps the precision of log_softmax; max + log(sum) would
// round at |max|.
template <typename acc>
__device__ void finish_row(const SoftmaxState<acc>& total, acc label_x, acc* token_logp, acc* stats) {
  acc max_x = total.max_x;
  acc log_sum = log(total.sum_exp);
  if (isnan(log_sum)) {
    max_x = log_sum;
  } else if (max_x == INFINITY) {
    log_sum = acc(NAN);
  }
  stats[0] = max_x;
  stats[1] = log_sum;
  *token_logp = (label_x - max_x) - log_sum;
}

// How a row's vocabulary is cut across blocks: chunk elements per block, splits blocks per row.
struct VocabSplit {
  int64_t chunk;
  int64_t splits;
};

// One block per row when there are enough rows to fill the GPU (4 blocks of 256 threads per SM); otherwise
// the vocabulary is split, at least kMinChunk elements per block. Depends on (rows, vocab, SM count) only,
// so a rerun on the same GPU takes the same path and gives the same bits.
inline VocabSplit vocab_split(int64_t rows, int64_t vocab, int64_t multiprocessors) {
  const int64_t target_blocks = 4 * multiprocessors;
  int64_t splits = 1;
  if (rows > 0 && rows < target_blocks) {
    splits = std::min((target_blocks + rows - 1) / rows, std::max<int64_t>(1, vocab / kMinChunk));
  }
  int64_t chunk = (vocab + splits - 1) / splits;
  chunk = (chunk + 63) / 64 * 64;  // whole 128-byte lines of bf16 between chunks
  return {chunk, (vocab + chunk - 1) / chunk};
}

// Row `row` of the [B, T'] scored rows in logits with batch/time strides (64-bit offsets).
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* scored_row(const scalar_t* logits, int64_t row, int64_t steps,
                                                      int64_t stride_b, int64_t stride_t) {
  return logits + (row / steps) * stride_b + (row % steps) * stride_t;
}

inline unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(items, kMaxBlocks)));
}

// Forward, one block per (scored row, vocabulary chunk). With one chunk per row the block finishes the row
// (stats and the label's log-prob); otherwise it writes its partial (max, sum of exp) for merge_splits_kernel.
// Each item's label is loaded during the item before it (a dependent load less at the start of every row).
template <typename scalar_t, typename acc>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(const scalar_t* __restrict__ logits, int64_t stride_b, int64_t stride_t,
                   const int64_t* __restrict__ labels, int64_t rows, int64_t steps, int64_t vocab, VocabSplit split,
                   int64_t ignore_index, acc* __restrict__ token_logps, acc* __restrict__ softmax_stats,
                   acc* __restrict__ partials) {
  const int64_t items = rows * split.splits;
  int64_t label = blockIdx.x < items ? labels[blockIdx.x / split.splits] : ignore_index;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t next = item + gridDim.x;
    const int64_t next_label = next < items ? labels[next / split.splits] : ignore_index;
    const int64_t row = item / split.splits, part = item % split.splits;
    if (label == ignore_index) {  // skipped: not read at all (uniform across the block, as every branch here)
      if (threadIdx.x == 0 && split.splits == 1) {
        token_logps[row] = softmax_stats[2 * row] = softmax_stats[2 * row + 1] = acc(0);
      }
    } else {
      const scalar_t* x = scored_row(logits, row, steps, stride_b, stride_t);
      const int64_t begin = part * split.chunk, end = min(vocab, begin + split.chunk);
      // Loaded before the row is streamed, so its latency hides behind the stream instead of following it.
      const acc label_x =
          threadIdx.x == 0 && split.splits == 1 ? label_logit<scalar_t, acc>(x, label, vocab) : acc(0);
      const SoftmaxState<acc> total = row_softmax_state<scalar_t, acc>(x + begin, end - begin);
      if (threadIdx.x == 0) {
        if (split.splits == 1) {
          finish_row(total, label_x, token_logps + row, softmax_stats + 2 * row);
        } else {
          partials[2 * item] = total.max_x;
          partials[2 * item + 1] = total.sum_exp;
        }
      }
      __syncthreads();  // block_merge's shared scratch is reused by the next item
    }
    label = next_label;
  }
}

// Merges each split row's partials in chunk order and finishes it; one thread per row.
template <typename scalar_t, typename acc>
__global__ void merge_splits_kernel(const scalar_t* __restrict__ logits, int64_t stride_b, int64_t stride_t,
                                    const int64_t* __restrict__ labels, int64_t rows, int64_t steps, int64_t vocab,
                                    int64_t splits, int64_t ignore_index, const acc* __restrict__ partials,
                                    acc* __restrict__ token_logps, acc* __restrict__ softmax_stats) {
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t label = labels[row];
    if (label == ignore_index) {
      token_logps[row] = softmax_stats[2 * row] = softmax_stats[2 * row + 1] = acc(0);
      continue;
    }
    const acc* mine = partials + 2 * row * splits;
    SoftmaxState<acc> total{mine[0], mine[1]};
    for (int64_t s = 1; s < splits; ++s) total.merge(mine[2 * s], mine[2 * s + 1]);
    const scalar_t* x = scored_row(logits, row, steps, stride_b, stride_t);
    finish_row(total, label_logit<scalar_t, acc>(x, label, vocab), token_logps + row, softmax_stats + 2 * row);
  }
}

// Per sequence b: the sum of its token log-probs (ignored ones are 0) and its count of scored labels, in a
// fixed order; seq_logps[b] = sum, or sum / max(count, 1) with average (0 for a sequence with none).
template <typename acc>
__global__ void __launch_bounds__(kThreads)
    sequence_sums_kernel(const acc* __restrict__ token_logps, const int64_t* __restrict__ labels, int64_t batch,
                         int64_t steps, int64_t ignore_index, bool average, acc* __restrict__ seq_logps) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    acc sum = 0;
    int64_t count = 0;
    for (int64_t t = threadIdx.x; t < steps; t += kThreads) {
      sum += token_logps[b * steps + t];
      count += labels[b * steps + t] != ignore_index;
    }
    block_sum(sum, count);
    if (threadIdx.x == 0) seq_logps[b] = average ? sum / static_cast<acc>(count > 0 ? count : 1) : sum;
    __syncthreads();
  }
}

// Per sequence b: d seq_logps[b] / d token_logp = grad[b] (sum) or grad[b] / max(count, 1) (average).
template <typename acc>
__global__ void __launch_bounds__(kThreads)
    coefficients_kernel(const acc* __restrict__ grad_seq, const int64_t* __restrict__ labels, int64_t batch,
                        int64_t steps, int64_t ignore_index, bool average, acc* __restrict__ coef) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    acc unused = 0;
    int64_t count = 0;
    if (average) {
      for (int64_t t = threadIdx.x; t < steps; t += kThreads) count += labels[b * steps + t] != ignore_index;
      block_sum(unused, count);
    }
    if (threadIdx.x == 0) coef[b] = average ? grad_seq[b] / static_cast<acc>(count > 0 ? count : 1) : grad_seq[b];
    __syncthreads();
  }
}

// Gradient of elements [0, n) of one row: g = c * ([v == label] - exp((x - max) - log_sum)). Each thread loads
// all its packs of an iteration before it stores any, and only ever writes what it read itself, so `grad` may
// be `x` (the in-place backward). Vector stores where grad has the logits' alignment, scalar stores otherwise.
template <typename scalar_t, typename acc>
__device__ void row_gradient(const scalar_t* x, scalar_t* grad, int64_t n, int64_t label, acc max_x, acc log_sum,
                             acc c) {
  constexpr int vec = kVec<scalar_t>;
  const RowLayout layout = row_layout(x, n);
  const bool vector_stores = (reinterpret_cast<uintptr_t>(grad) - reinterpret_cast<uintptr_t>(x)) % 16 == 0;
  auto gradient = [&](scalar_t value, bool is_label) {
    const acc p = softmax_exp((static_cast<acc>(value) - max_x) - log_sum);
    return static_cast<scalar_t>(c * ((is_label ? acc(1) : acc(0)) - p));
  };
  if (threadIdx.x < layout.head) {
    const int64_t v = threadIdx.x;
    grad[v] = gradient(x[v], v == label);
  }
  if (threadIdx.x < n - layout.tail_begin) {
    const int64_t v = layout.tail_begin + threadIdx.x;
    grad[v] = gradient(x[v], v == label);
  }
  // The label's pack and lane within the aligned part (none: -1), so the loop compares once per pack.
  const int64_t label_offset = label - layout.head;
  const int64_t label_pack = (label_offset >= 0 && label_offset < layout.vectors * vec) ? label_offset / vec : -1;
  const int label_lane = label_pack >= 0 ? static_cast<int>(label_offset % vec) : -1;
  const scalar_t* x_aligned = x + layout.head;
  scalar_t* g_aligned = grad + layout.head;
  for (int64_t first = threadIdx.x; first < layout.vectors; first += int64_t(kThreads) * kBackwardUnroll) {
    Pack<scalar_t> packs[kBackwardUnroll];
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) {
      const int64_t v = first + int64_t(u) * kThreads;
      if (v < layout.vectors) packs[u] = load_pack(x_aligned + v * vec);
    }
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) {
      const int64_t v = first + int64_t(u) * kThreads;
      if (v >= layout.vectors) continue;
      const int lane_of_label = v == label_pack ? label_lane : -1;
      Pack<scalar_t> out;
#pragma unroll
      for (int i = 0; i < vec; ++i) out.v[i] = gradient(packs[u].v[i], i == lane_of_label);
      if (vector_stores) {
        store_pack(g_aligned + v * vec, out);
      } else {
#pragma unroll
        for (int i = 0; i < vec; ++i) g_aligned[v * vec + i] = out.v[i];
      }
    }
  }
}

// One value (exact zeros, or NaN) over elements [0, n) of a gradient row, 16 bytes at a time where aligned.
template <typename scalar_t>
__device__ void row_fill(scalar_t* grad, int64_t n, scalar_t value) {
  constexpr int vec = kVec<scalar_t>;
  const RowLayout layout = row_layout(grad, n);
  if (threadIdx.x < layout.head) grad[threadIdx.x] = value;
  if (threadIdx.x < n - layout.tail_begin) grad[layout.tail_begin + threadIdx.x] = value;
  Pack<scalar_t> fill;
#pragma unroll
  for (int i = 0; i < vec; ++i) fill.v[i] = value;
  for (int64_t v = threadIdx.x; v < layout.vectors; v += kThreads) store_pack(grad + layout.head + v * vec, fill);
}

// Backward, one block per (row of logits, vocabulary chunk); rows that score nothing (ignored labels, the last
// step with shift) get exact zeros, and a row whose label is out of range NaN (labels are range-checked by the
// forward unless check_labels=False, where its log-prob is NaN too; a direct call of the backward op is not
// checked on the host, which would cost a sync).
template <typename scalar_t, typename acc>
// No __restrict__ on logits and grad: the in-place backward passes the same buffer for both. At least 4 blocks
// per SM (at most 64 registers): unbounded, bf16 took 121 registers, so 2 blocks of 4 loads in flight per thread;
// now 4 blocks of kBackwardUnroll = 2 (the same bytes in flight, from twice the warps). fp64 (gradcheck) asks
// for 3: at 4 (64 registers) it spilled 12 bytes.
__global__ void __launch_bounds__(kThreads, sizeof(scalar_t) == 8 ? 3 : 4)
    backward_rows_kernel(const scalar_t* logits, int64_t stride_b, int64_t stride_t, const int64_t* __restrict__ labels,
                    const acc* __restrict__ softmax_stats, const acc* __restrict__ coef, int64_t rows, int64_t steps,
                    int64_t scored, int64_t vocab, VocabSplit split, int64_t ignore_index, scalar_t* grad,
                    int64_t grad_stride_b, int64_t grad_stride_t) {
  for (int64_t item = blockIdx.x; item < rows * split.splits; item += gridDim.x) {
    const int64_t row = item / split.splits, part = item % split.splits;
    const int64_t b = row / steps, t = row % steps;
    const int64_t begin = part * split.chunk, n = min(vocab, begin + split.chunk) - begin;
    scalar_t* g = grad + b * grad_stride_b + t * grad_stride_t;
    const int64_t scored_row = b * scored + t;
    const int64_t label = t < scored ? labels[scored_row] : ignore_index;
    if (label == ignore_index || label < 0 || label >= vocab) {
      row_fill(g + begin, n, label == ignore_index ? scalar_t(0) : scalar_t(NAN));
      continue;
    }
    const scalar_t* x = logits + b * stride_b + t * stride_t;
    row_gradient<scalar_t, acc>(x + begin, g + begin, n, label - begin, softmax_stats[2 * scored_row],
                                softmax_stats[2 * scored_row + 1], coef[b]);
  }
}

// The forward op on `device`: (seq_logps [B], softmax_stats [B, T - shift, 2]).
template <typename Device>
std::tuple<at::Tensor, at::Tensor> forward(const Device& device, const at::Tensor& logits, const at::Tensor& labels,
                                           int64_t ignore_index, bool average, bool shift, bool check_labels) {
  check_logits_labels(logits, labels, shift);
  const auto used = scored_labels(labels, shift);
  if (check_labels && device.may_sync()) {
    check_label_range(used, logits.size(2), ignore_index);  // a host sync: not allowed while capturing a graph
  }
  const auto opts = logits.options().dtype(acc_dtype(logits));
  const int64_t batch = used.size(0), steps = used.size(1), vocab = logits.size(2), rows = used.numel();
  auto token_logps = at::empty(used.sizes(), opts);
  auto softmax_stats = at::empty({batch, steps, 2}, opts);
  auto seq_logps = at::empty({batch}, opts);
  if (batch == 0) return {seq_logps, softmax_stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sequence_logps_fwd", [&] {
    using acc = acc_t<scalar_t>;
    if (rows > 0) {
      const VocabSplit split = vocab_split(rows, vocab, device.multiprocessors());
      const auto partials = split.splits > 1 ? at::empty({rows, split.splits, 2}, opts) : at::Tensor();
      device.launch(forward_rows_kernel<scalar_t, acc>, grid_for(rows * split.splits), kThreads,
                    logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                    used.const_data_ptr<int64_t>(), rows, steps, vocab, split, ignore_index,
                    token_logps.mutable_data_ptr<acc>(), softmax_stats.mutable_data_ptr<acc>(),
                    split.splits > 1 ? partials.mutable_data_ptr<acc>() : nullptr);
      if (split.splits > 1) {
        device.launch(merge_splits_kernel<scalar_t, acc>, grid_for((rows + kThreads - 1) / kThreads), kThreads,
                      logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                      used.const_data_ptr<int64_t>(), rows, steps, vocab, split.splits, ignore_index,
                      partials.const_data_ptr<acc>(), token_logps.mutable_data_ptr<acc>(),
                      softmax_stats.mutable_data_ptr<acc>());
      }
    }
    device.launch(sequence_sums_kernel<acc>, grid_for(batch), kThreads, token_logps.const_data_ptr<acc>(),
                  used.const_data_ptr<int64_t>(), batch, steps, ignore_index, average,
                  seq_logps.mutable_data_ptr<acc>());
  });
  return {seq_logps, softmax_stats};
}

// The backward on `device`: writes d(sum of seq_logps * grad_seq) / d logits into `grad` (a new tensor, or
// logits itself for the in-place backward).
template <typename Device>
void backward_into(const Device& device, const at::Tensor& grad_seq, const at::Tensor& logits,
                   const at::Tensor& labels, const at::Tensor& softmax_stats, int64_t ignore_index, bool average,
                   bool shift, at::Tensor& grad) {
  check_logits_labels(logits, labels, shift);
  const auto used = scored_labels(labels, shift);
  check_backward_inputs(grad_seq, logits, used, softmax_stats);
  if (grad.is_same(logits)) check_writable_in_place(logits);
  const int64_t batch = logits.size(0), steps = logits.size(1), vocab = logits.size(2), rows = batch * steps;
  if (rows == 0) return;
  const auto grad_seq_acc = grad_seq.to(acc_dtype(logits)).contiguous();
  auto coef = at::empty({batch}, grad_seq_acc.options());
  const auto stats_c = softmax_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sequence_logps_bwd", [&] {
    using acc = acc_t<scalar_t>;
    device.launch(coefficients_kernel<acc>, grid_for(batch), kThreads, grad_seq_acc.const_data_ptr<acc>(),
                  used.const_data_ptr<int64_t>(), batch, used.size(1), ignore_index, average,
                  coef.mutable_data_ptr<acc>());
    const VocabSplit split = vocab_split(rows, vocab, device.multiprocessors());
    device.launch(backward_rows_kernel<scalar_t, acc>, grid_for(rows * split.splits), kThreads,
                  logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                  used.const_data_ptr<int64_t>(), stats_c.const_data_ptr<acc>(), coef.const_data_ptr<acc>(), rows,
                  steps, used.size(1), vocab, split, ignore_index, grad.mutable_data_ptr<scalar_t>(), grad.stride(0),
                  grad.stride(1));
  });
  if (grad.is_same(logits)) mark_written_in_place(logits);
}

}  // namespace amapo::sequence_logps_kernels
