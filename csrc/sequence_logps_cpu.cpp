// CPU kernels of amapo_kernels::sequence_logps_{fwd,bwd}: one row of logits per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "sequence_logps.h"

namespace amapo {
namespace {

// Rows a thread takes at once: about 64k logits of work.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (1 << 16) / vocab); }

template <typename scalar_t>
void forward_rows(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                  at::Tensor& token_logps, at::Tensor& softmax_stats) {
  using acc = acc_t<scalar_t>;
  const int64_t steps = labels.size(1), vocab = logits.size(2);
  const int64_t stride_b = logits.stride(0), stride_t = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  acc* tok_ptr = token_logps.mutable_data_ptr<acc>();
  acc* stats_ptr = softmax_stats.mutable_data_ptr<acc>();
  at::parallel_for(0, labels.numel(), grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = label_ptr[row];
      if (label == ignore_index) {
        tok_ptr[row] = stats_ptr[2 * row] = stats_ptr[2 * row + 1] = 0;
        continue;
      }
      const scalar_t* x = base + (row / steps) * stride_b + (row % steps) * stride_t;
      acc max_x = -std::numeric_limits<acc>::infinity();
      for (int64_t v = 0; v < vocab; ++v) max_x = std::max(max_x, static_cast<acc>(x[v]));
      // fp64 running sum: a long fp32 sum would drift by ~sqrt(V) ulps, more than log_softmax's own error.
      double sum_exp = 0;
      for (int64_t v = 0; v < vocab; ++v) sum_exp += std::exp(static_cast<acc>(x[v]) - max_x);
      const acc log_sum = static_cast<acc>(std::log(sum_exp));
      stats_ptr[2 * row] = max_x;
      stats_ptr[2 * row + 1] = log_sum;
      tok_ptr[row] = (static_cast<acc>(x[label]) - max_x) - log_sum;
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& softmax_stats,
                   const at::Tensor& coef, int64_t ignore_index, at::Tensor& grad) {
  using acc = acc_t<scalar_t>;
  const int64_t steps = logits.size(1), scored = labels.size(1), vocab = logits.size(2);
  const int64_t stride_b = logits.stride(0), stride_t = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  const acc* stats_ptr = softmax_stats.const_data_ptr<acc>();
  const acc* coef_ptr = coef.const_data_ptr<acc>();
  // grad may be logits itself (in-place backward): each element is read before it is written.
  scalar_t* grad_base = grad.mutable_data_ptr<scalar_t>();
  const int64_t grad_stride_b = grad.stride(0), grad_stride_t = grad.stride(1);
  at::parallel_for(0, logits.size(0) * steps, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / steps, t = row % steps;
      scalar_t* g = grad_base + b * grad_stride_b + t * grad_stride_t;
      const int64_t scored_row = b * scored + t;
      const int64_t label = t < scored ? label_ptr[scored_row] : ignore_index;
      if (label == ignore_index) {
        std::fill(g, g + vocab, scalar_t(0));
        continue;
      }
      const scalar_t* x = base + b * stride_b + t * stride_t;
      const acc max_x = stats_ptr[2 * scored_row], log_sum = stats_ptr[2 * scored_row + 1], c = coef_ptr[b];
      // d log_softmax(x)[label] / dx_v = [v == label] - softmax(x)_v
      for (int64_t v = 0; v < vocab; ++v) {
        const acc p = std::exp((static_cast<acc>(x[v]) - max_x) - log_sum);
        g[v] = static_cast<scalar_t>(c * ((v == label ? acc(1) : acc(0)) - p));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sequence_logps_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t ignore_index, bool average, bool shift) {
  check_logits_labels(logits, labels, shift);
  const auto used = scored_labels(labels, shift);
  check_label_range(used, logits.size(2), ignore_index);
  const auto opts = logits.options().dtype(acc_dtype(logits));
  auto token_logps = at::empty(used.sizes(), opts);
  auto softmax_stats = at::empty({used.size(0), used.size(1), 2}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sequence_logps_fwd_cpu", [&] {
    forward_rows<scalar_t>(logits, used, ignore_index, token_logps, softmax_stats);
  });
  return {sequence_sums(token_logps, label_counts(used, ignore_index), average), softmax_stats};
}

// Writes d(sum of seq_logps * grad_seq) / d logits into `grad` (a new tensor, or logits itself).
void backward_into(const at::Tensor& grad_seq, const at::Tensor& logits, const at::Tensor& labels,
                   const at::Tensor& softmax_stats, int64_t ignore_index, bool average, bool shift, at::Tensor& grad) {
  check_logits_labels(logits, labels, shift);
  const auto used = scored_labels(labels, shift);
  check_backward_inputs(grad_seq, logits, used, softmax_stats);
  const auto coef = row_coefficients(grad_seq, label_counts(used, ignore_index), average, acc_dtype(logits));
  const auto stats_c = softmax_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sequence_logps_bwd_cpu", [&] {
    backward_rows<scalar_t>(logits, used, stats_c, coef, ignore_index, grad);
  });
}

at::Tensor sequence_logps_bwd_cpu(const at::Tensor& grad_seq, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& softmax_stats, int64_t ignore_index, bool average, bool shift) {
  auto grad = at::empty(logits.sizes(), logits.options());
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
