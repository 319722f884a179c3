// CPU kernels of amapo_kernels::amapo_loss_{fwd,bwd}: the batch margin and loss over B pairs.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>

#include "amapo_loss.h"

namespace amapo {
namespace {

// double -> scalar_t, beyond scalar_t's range +-inf as IEEE rounding (and the CUDA kernels' cvt) gives: a C++
// cast of an out-of-range double is undefined, and fill_ refuses one ("cannot be converted ... without overflow").
template <typename scalar_t>
scalar_t narrow(double x) {
  constexpr double largest = static_cast<double>(std::numeric_limits<scalar_t>::max());
  if (x > largest) return std::numeric_limits<scalar_t>::infinity();
  if (x < -largest) return -std::numeric_limits<scalar_t>::infinity();
  return static_cast<scalar_t>(x);  // NaN stays NaN
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> amapo_loss_fwd_cpu(const at::Tensor& chosen, const at::Tensor& rejected,
                                                                  const at::Tensor& batch_moments, double beta,
                                                                  double label_smoothing, c10::string_view variant,
                                                                  c10::string_view ablation) {
  check_pairs(chosen, rejected, batch_moments);
  const Variant var = parse_variant(std::string(variant));
  const Ablation abl = parse_ablation(std::string(ablation));
  const auto moments = batch_moments.contiguous();
  const double* s = moments.const_data_ptr<double>();
  const BatchStats stats = batch_stats_from_moments(s[0], s[1], s[2], s[3]);
  const int64_t n = chosen.size(0);
  auto margins = at::empty_like(chosen, at::MemoryFormat::Contiguous);
  auto loss = at::empty({}, chosen.options());
  auto stats_out = at::tensor({stats.mean(), stats.std}, moments.options());
  AT_DISPATCH_FLOATING_TYPES(chosen.scalar_type(), "amapo_loss_fwd_cpu", [&] {
    const auto c = chosen.contiguous(), r = rejected.contiguous();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* mp = margins.mutable_data_ptr<scalar_t>();
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = double(cp[i]) - double(rp[i]);
      const double m = adaptive_margin(d, stats, beta, var, abl);
      mp[i] = narrow<scalar_t>(m);
      total += pair_loss(beta * d - m, label_smoothing);
    }
    loss.fill_(narrow<scalar_t>(n > 0 ? total / double(n) : 0.0));
  });
  return {loss, margins, stats_out};
}

std::tuple<at::Tensor, at::Tensor> amapo_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& chosen,
                                                      const at::Tensor& rejected, const at::Tensor& margins,
                                                      double beta, double label_smoothing) {
  check_pair_backward_inputs(grad_loss, chosen, rejected, margins);
  const int64_t n = chosen.size(0);
  auto grad_chosen = at::empty_like(chosen, at::MemoryFormat::Contiguous);
  auto grad_rejected = at::empty_like(chosen, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(chosen.scalar_type(), "amapo_loss_bwd_cpu", [&] {
    const auto c = chosen.contiguous(), r = rejected.contiguous(), m = margins.contiguous().to(chosen.scalar_type());
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const double scale = grad_loss.item<double>() * beta / double(std::max<int64_t>(n, 1));
    scalar_t* gc = grad_chosen.mutable_data_ptr<scalar_t>();
    scalar_t* gr = grad_rejected.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const double x = beta * (double(cp[i]) - double(rp[i])) - double(mp[i]);
      const double g = scale * pair_loss_grad(x, label_smoothing);
      gc[i] = narrow<scalar_t>(g);
      gr[i] = narrow<scalar_t>(-g);
    }
  });
  return {grad_chosen, grad_rejected};
}

}  // namespace

TORCH_LIBRARY_IMPL(amapo_kernels, CPU, m) {
  m.impl("amapo_loss_fwd", &amapo_loss_fwd_cpu);
  m.impl("amapo_loss_bwd", &amapo_loss_bwd_cpu);
}

}  // namespace amapo
