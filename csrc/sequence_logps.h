// Per-sequence log-probabilities from logits: the parts shared by the CPU and CUDA kernels.
#pragma once

#include <tuple>

#include "common.h"

namespace amapo {

// Rows scored: logits[:, t] scores labels[:, t + shift] for t < T - shift.
inline int64_t scored_steps(const at::Tensor& logits, bool shift) {
  return shift ? logits.size(1) - 1 : logits.size(1);
}

inline at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Guards the saved tensors a direct call of the backward op may pass.
inline void check_backward_inputs(const at::Tensor& grad_seq, const at::Tensor& logits, const at::Tensor& used,
                                  const at::Tensor& softmax_stats) {
  TORCH_CHECK_VALUE(grad_seq.dim() == 1 && grad_seq.size(0) == logits.size(0), "grad must be [B]");
  TORCH_CHECK_VALUE(softmax_stats.dim() == 3 && softmax_stats.size(0) == used.size(0) &&
                        softmax_stats.size(1) == used.size(1) && softmax_stats.size(2) == 2,
                    "softmax_stats must be [B, T - shift, 2]");
  TORCH_CHECK_TYPE(softmax_stats.scalar_type() == acc_dtype(logits), "softmax_stats must be ", acc_dtype(logits));
  TORCH_CHECK_VALUE(grad_seq.device() == logits.device() && softmax_stats.device() == logits.device(),
                    "grad, softmax_stats and logits must be on the same device");
}

// d seq_logps[b] / d token_logps[b, t] for scored tokens.
inline at::Tensor row_coefficients(const at::Tensor& grad_seq, const at::Tensor& counts, bool average,
                                   at::ScalarType dtype) {
  auto coef = grad_seq.to(dtype).contiguous();
  return average ? coef / counts.clamp_min(1).to(dtype) : coef;
}

}  // namespace amapo
