// AMaPO margin + loss ops: argument parsing and checks shared by the CPU and CUDA kernels.
#pragma once

#include <string>

#include "amapo_margin.h"

namespace amapo {

inline Variant parse_variant(const std::string& name) {
  if (name == "code") return Variant::Code;
  if (name == "paper") return Variant::Paper;
  TORCH_CHECK_VALUE(false, "variant must be 'code' or 'paper', got '", name, "'");
}

inline Ablation parse_ablation(const std::string& name) {
  if (name == "none") return Ablation::None;
  if (name == "no_znorm") return Ablation::NoZnorm;
  if (name == "no_exp") return Ablation::NoExp;
  if (name == "no_adaptive") return Ablation::NoAdaptive;
  if (name == "no_zero") return Ablation::NoZero;
  TORCH_CHECK_VALUE(false, "ablation must be one of none, no_znorm, no_exp, no_adaptive, no_zero; got '", name, "'");
}

inline void check_pair_dtypes(const at::Tensor& chosen, const at::Tensor& rejected) {
  TORCH_CHECK_TYPE(chosen.scalar_type() == at::kFloat || chosen.scalar_type() == at::kDouble,
                   "chosen_logps must be float32 or float64");
  TORCH_CHECK_TYPE(rejected.scalar_type() == chosen.scalar_type(), "rejected_logps must have chosen_logps' dtype");
}

inline void check_pairs(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& batch_moments) {
  TORCH_CHECK_VALUE(chosen.dim() == 1, "chosen_logps must be 1-D [B]");
  TORCH_CHECK_VALUE(rejected.sizes() == chosen.sizes(), "rejected_logps must have the shape of chosen_logps");
  check_pair_dtypes(chosen, rejected);
  TORCH_CHECK_VALUE(batch_moments.dim() == 1 && batch_moments.size(0) == 4 && batch_moments.scalar_type() == at::kDouble,
                    "batch_moments must be float64 [count, pivot, mean offset, M2]");
  TORCH_CHECK_VALUE(rejected.device() == chosen.device() && batch_moments.device() == chosen.device(),
                    "chosen_logps, rejected_logps and batch_moments must be on one device");
}

inline void check_pair_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& chosen, const at::Tensor& rejected,
                                       const at::Tensor& margins) {
  TORCH_CHECK_VALUE(chosen.dim() == 1 && margins.sizes() == chosen.sizes() && rejected.sizes() == chosen.sizes(),
                    "margins, chosen_logps and rejected_logps must all be [B]");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad must be a scalar");
  check_pair_dtypes(chosen, rejected);
  TORCH_CHECK_TYPE(at::isFloatingType(margins.scalar_type()) && at::isFloatingType(grad_loss.scalar_type()),
                   "margins and grad must be floating point");
  TORCH_CHECK_VALUE(rejected.device() == chosen.device() && margins.device() == chosen.device() &&
                        grad_loss.device() == chosen.device(),
                    "grad, chosen_logps, rejected_logps and margins must be on one device");
}

}  // namespace amapo
