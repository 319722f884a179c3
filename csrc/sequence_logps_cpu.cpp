// CPU kernels of amapo_kernels::sequence_logps_{fwd,bwd,bwd_inplace}. Accumulation is fp32 (fp64 for fp64).
// Two paths with the same results (NaN and inf included):
// - row kernels (sequence_logps_cpu_rows.cpp, built for AVX-512 and for AVX2 + FMA + F16C) for fp32/bf16/fp16,
//   the widest set the processor has (cpu_rows::selected): three passes over each row while it is in cache, no
//   temporaries;
// - otherwise (and for fp64) blocks of about a million logits through ATen's vectorized, multithreaded ops
//   (Sleef exp, cascade sums), never more than one block of temporaries.
// Every sum has one order whatever the thread count (row_sums), so results do not depend on it.
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <torch/library.h>

#include "sequence_logps.h"
#include "sequence_logps_cpu_rows.h"

namespace amapo {

namespace cpu_rows {
namespace {

// Whether this build has the kernels of `isa` and this processor has its instructions.
bool can_run(Isa isa) {
#if defined(AMAPO_CPU_ROWS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == Isa::avx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;  // not an x86-64 build: no row kernels
#endif
}

Isa select_from_environment() {
  const char* value = std::getenv("AMAPO_CPU_KERNELS");
  const std::string wanted = value == nullptr ? "auto" : value;
  if (wanted == "auto" || wanted.empty()) {
    for (const Isa isa : {Isa::avx512, Isa::avx2}) {
      if (can_run(isa)) return isa;
    }
    return Isa::aten;
  }
  for (const Isa isa : {Isa::avx512, Isa::avx2, Isa::aten}) {
    if (wanted != isa_name(isa)) continue;
    TORCH_CHECK(isa == Isa::aten || can_run(isa), "AMAPO_CPU_KERNELS=", wanted, ": this processor (or a non-x86 ",
                "build) cannot run the ", isa == Isa::avx512 ? "AVX-512 F/BW/VL/DQ" : "AVX2/FMA/F16C",
                " row kernels; use auto or aten");
    return isa;
  }
  TORCH_CHECK(false, "AMAPO_CPU_KERNELS must be auto, avx512, avx2 or aten, got '", wanted, "'");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "aten";
  }
}

Isa selected() {
  static const Isa isa = select_from_environment();
  return isa;
}

}  // namespace cpu_rows

namespace {

// The row kernels to use for these logits, Isa::aten for ATen's ops (always for fp64; AMAPO_CPU_KERNELS is
// checked for every dtype, so a bad value is an error whatever the logits).
cpu_rows::Isa row_isa(const at::Tensor& logits) {
  const auto isa = cpu_rows::selected();
  return logits.scalar_type() == at::kDouble ? cpu_rows::Isa::aten : isa;
}

// The forward and backward row kernels of `isa` (never Isa::aten); a build without them (not x86-64) never
// selects them.
struct RowKernels {
  decltype(&cpu_rows::avx2::forward) forward;
  decltype(&cpu_rows::avx2::backward) backward;
};

RowKernels row_kernels_of(cpu_rows::Isa isa) {
#if defined(AMAPO_CPU_ROWS)
  if (isa == cpu_rows::Isa::avx512) return {cpu_rows::avx512::forward, cpu_rows::avx512::backward};
  return {cpu_rows::avx2::forward, cpu_rows::avx2::backward};
#else
  TORCH_INTERNAL_ASSERT(false, "no CPU row kernels in this build");
#endif
}

constexpr int64_t kBlockElements = 1 << 20;

int64_t block_rows(int64_t vocab) { return std::max<int64_t>(1, kBlockElements / vocab); }

// Calls fn(b, t0, t1) for row blocks of each sequence's scored steps.
template <typename Fn>
void for_each_block(int64_t batch, int64_t steps, int64_t vocab, Fn fn) {
  const int64_t rows = block_rows(vocab);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t0 = 0; t0 < steps; t0 += rows) fn(b, t0, std::min(steps, t0 + rows));
  }
}

// Sums of a [n, m] tensor's rows ([n]), in an order that does not depend on the thread count. ATen splits a
// sum to one output (n = 1) of GRAIN_SIZE elements or more between the threads at points that depend on their
// number (sums to several outputs run one output per thread); one such row is summed in fixed blocks (one
// output each), then over its blocks (fewer than GRAIN_SIZE unless m > 2^27: one thread).
at::Tensor row_sums(const at::Tensor& x) {
  const int64_t n = x.size(1);
  if (x.size(0) != 1 || n < at::internal::GRAIN_SIZE) return x.sum(1);
  constexpr int64_t kSumBlock = 4096;
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  return at::constant_pad_nd(x, {0, blocks * kSumBlock - n}).view({1, blocks, kSumBlock}).sum(2).sum(1);
}

// Sums token log-probs per sequence; average divides by the count of scored labels (0 if none).
at::Tensor sequence_sums(const at::Tensor& token_logps, const at::Tensor& counts, bool average) {
  const auto sums = row_sums(token_logps);
  if (!average) return sums;
  return sums / counts.clamp_min(1).to(sums.scalar_type());
}

struct BlockLabels {
  at::Tensor valid;  // [n] bool: scored
  at::Tensor index;  // [n, 1] int64: the label, 0 where ignored (safe to gather)
};

BlockLabels block_labels(const at::Tensor& used, int64_t b, int64_t t0, int64_t t1, int64_t ignore_index) {
  const auto labels = used.select(0, b).slice(0, t0, t1);
  const auto valid = labels.ne(ignore_index);
  return {valid, at::where(valid, labels, at::zeros_like(labels)).unsqueeze(1)};
}

// check_labels is not read: on the CPU the range check costs no device sync, so it always runs (an
// out-of-range label is an error here, NaN on CUDA with check_labels=False).
std::tuple<at::Tensor, at::Tensor> sequence_logps_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t ignore_index, bool average, bool shift,
                                                          bool /*check_labels*/) {
  check_logits_labels(logits, labels, shift);
  const auto used = scored_labels(labels, shift);
  check_label_range(used, logits.size(2), ignore_index);
  const auto dtype = acc_dtype(logits);
  const auto opts = logits.options().dtype(dtype);
  auto token_logps = at::empty(used.sizes(), opts);
  auto softmax_stats = at::empty({used.size(0), used.size(1), 2}, opts);
  if (const auto isa = row_isa(logits); isa != cpu_rows::Isa::aten) {
    row_kernels_of(isa).forward(logits, used, ignore_index, token_logps, softmax_stats);
    return {sequence_sums(token_logps, label_counts(used, ignore_index), average), softmax_stats};
  }
  for_each_block(used.size(0), used.size(1), logits.size(2), [&](int64_t b, int64_t t0, int64_t t1) {
    const auto x = logits.select(0, b).slice(0, t0, t1).to(dtype);  // [n, V]
    const auto max_x = x.amax(1, /*keepdim=*/true);
    const auto log_sum = row_sums((x - max_x).exp_()).log_().unsqueeze(1);  // [n, 1]
    const auto labels_b = block_labels(used, b, t0, t1, ignore_index);
    // (x - max) - log(sum) keeps the precision of log_softmax; max + log(sum) would round at |max|.
    const auto token = (x.gather(1, labels_b.index) - max_x).sub_(log_sum).squeeze(1);
    token_logps.select(0, b).slice(0, t0, t1).copy_(at::where(labels_b.valid, token, at::zeros_like(token)));
    auto stats = softmax_stats.select(0, b).slice(0, t0, t1);
    stats.select(1, 0).copy_(max_x.squeeze(1));
    stats.select(1, 1).copy_(log_sum.squeeze(1));
    stats.masked_fill_(labels_b.valid.logical_not().unsqueeze(1), 0);  // an ignored row's, as the row kernels'
  });
  return {sequence_sums(token_logps, label_counts(used, ignore_index), average), softmax_stats};
}

// ATen's ops for the backward (fp64, or AMAPO_CPU_KERNELS=aten), block by block: each block is read into a
// temporary before its gradient is written back, so `grad` may be the logits themselves.
void aten_backward(const at::Tensor& logits, const at::Tensor& used, const at::Tensor& softmax_stats,
                   const at::Tensor& coef, int64_t ignore_index, bool shift, at::Tensor& grad) {
  const auto dtype = acc_dtype(logits);
  for_each_block(used.size(0), used.size(1), logits.size(2), [&](int64_t b, int64_t t0, int64_t t1) {
    const auto stats = softmax_stats.select(0, b).slice(0, t0, t1);
    const auto labels_b = block_labels(used, b, t0, t1, ignore_index);
    // d log_softmax(x)[label] / dx_v = [v == label] - softmax(x)_v, scaled by the row's coefficient
    const auto token_coef = at::where(labels_b.valid, coef[b], at::zeros({}, coef.options())).unsqueeze(1);
    auto g = logits.select(0, b).slice(0, t0, t1).to(dtype).sub(stats.select(1, 0).unsqueeze(1));
    g.sub_(stats.select(1, 1).unsqueeze(1)).exp_().mul_(token_coef.neg());
    g.scatter_add_(1, labels_b.index, token_coef);
    g.masked_fill_(labels_b.valid.logical_not().unsqueeze(1), 0);  // exact zeros, even for inf logits
    grad.select(0, b).slice(0, t0, t1).copy_(g);
  });
  if (shift) grad.select(1, logits.size(1) - 1).zero_();  // the last step scores nothing
}

// Writes d(sum of seq_logps * grad_seq) / d logits into `grad` (a new tensor, or logits itself).
void backward_into(const at::Tensor& grad_seq, const at::Tensor& logits, const at::Tensor& labels,
                   const at::Tensor& softmax_stats, int64_t ignore_index, bool average, bool shift, at::Tensor& grad) {
  check_logits_labels(logits, labels, shift);
  const auto used = scored_labels(labels, shift);
  check_backward_inputs(grad_seq, logits, used, softmax_stats);
  check_label_range(used, logits.size(2), ignore_index);  // a direct call's labels: the kernels index rows by them
  if (grad.is_same(logits)) check_writable_in_place(logits);
  const auto coef = row_coefficients(grad_seq, label_counts(used, ignore_index), average, acc_dtype(logits));
  if (const auto isa = row_isa(logits); isa != cpu_rows::Isa::aten) {
    row_kernels_of(isa).backward(logits, used, softmax_stats.contiguous(), coef, ignore_index, grad);
  } else {
    aten_backward(logits, used, softmax_stats, coef, ignore_index, shift, grad);
  }
  if (grad.is_same(logits)) mark_written_in_place(logits);
}

// An uninitialized tensor whose 2 MiB-aligned interior is advised onto transparent huge pages (Linux; a hint,
// without effect where THP is off). The out-of-place gradient is as large as the logits and written once:
// on 4 KiB pages the kernel spends most of its time in first-touch page faults. torch does the same for every
// allocation under THP_MEM_ALLOC_ENABLE=1; this is for the one buffer that needs it.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // failure: 4 KiB pages
#endif
  return out;
}

at::Tensor sequence_logps_bwd_cpu(const at::Tensor& grad_seq, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& softmax_stats, int64_t ignore_index, bool average, bool shift) {
  auto grad = empty_on_huge_pages(logits.sizes(), logits.options());
  backward_into(grad_seq, logits, labels, softmax_stats, ignore_index, average, shift, grad);
  return grad;
}

void sequence_logps_bwd_inplace_cpu(const at::Tensor& grad_seq, at::Tensor& logits, const at::Tensor& labels,
                                    const at::Tensor& softmax_stats, int64_t ignore_index, bool average, bool shift) {
  backward_into(grad_seq, logits, labels, softmax_stats, ignore_index, average, shift, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(amapo_kernels, CPU, m) {
  m.impl("sequence_logps_fwd", &sequence_logps_fwd_cpu);
  m.impl("sequence_logps_bwd", &sequence_logps_bwd_cpu);
  m.impl("sequence_logps_bwd_inplace", &sequence_logps_bwd_inplace_cpu);
}

}  // namespace amapo
