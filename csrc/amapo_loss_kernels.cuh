// Kernels of amapo_kernels::amapo_loss_{fwd,bwd} and the host code that launches them on a `Device`
// (cuda_device.cuh; the tests' CPU emulation runs the same code). B is small (pairs per micro-batch), so one
// block walks all pairs in fp64 and reduces in a fixed order: bit-identical reruns.
#pragma once

#include <ATen/Dispatch.h>

#include <algorithm>
#include <string>

#include "amapo_loss.h"

namespace amapo::amapo_loss_kernels {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void amapo_forward_kernel(const scalar_t* __restrict__ chosen, const scalar_t* __restrict__ rejected,
                                     const double* __restrict__ batch_moments, int64_t n, double beta, double eps,
                                     Variant variant, Ablation ablation, scalar_t* __restrict__ loss,
                                     scalar_t* __restrict__ margins, double* __restrict__ stats_out) {
  __shared__ double partial[kThreads];
  const BatchStats stats = batch_stats_from_moments(batch_moments[0], batch_moments[1], batch_moments[2], batch_moments[3]);
  double total = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const double d = double(chosen[i]) - double(rejected[i]);
    const double m = adaptive_margin(d, stats, beta, variant, ablation);
    margins[i] = static_cast<scalar_t>(m);
    total += pair_loss(beta * d - m, eps);
  }
  partial[threadIdx.x] = total;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *loss = static_cast<scalar_t>(n > 0 ? partial[0] / double(n) : 0.0);
    stats_out[0] = stats.mean();
    stats_out[1] = stats.std;
  }
}

template <typename scalar_t>
__global__ void amapo_backward_kernel(const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ chosen,
                                      const scalar_t* __restrict__ rejected, const scalar_t* __restrict__ margins,
                                      int64_t n, double beta, double eps, scalar_t* __restrict__ grad_chosen,
                                      scalar_t* __restrict__ grad_rejected) {
  const double scale = double(*grad_loss) * beta / double(n);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double x = beta * (double(chosen[i]) - double(rejected[i])) - double(margins[i]);
    const double g = scale * pair_loss_grad(x, eps);
    grad_chosen[i] = static_cast<scalar_t>(g);
    grad_rejected[i] = static_cast<scalar_t>(-g);
  }
}

// The forward op on `device`: (loss, margins [B], [mean, std] of the gaps).
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const Device& device, const at::Tensor& chosen,
                                                       const at::Tensor& rejected, const at::Tensor& batch_moments,
                                                       double beta, double label_smoothing,
                                                       c10::string_view variant, c10::string_view ablation) {
  check_pairs(chosen, rejected, batch_moments);
  const Variant var = parse_variant(std::string(variant));
  const Ablation abl = parse_ablation(std::string(ablation));
  const auto c = chosen.contiguous(), r = rejected.contiguous(), moments = batch_moments.contiguous();
  auto margins = at::empty_like(c);
  auto loss = at::empty({}, c.options());
  auto stats_out = at::empty({2}, moments.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "amapo_loss_fwd", [&] {
    device.launch(amapo_forward_kernel<scalar_t>, 1, kThreads, c.const_data_ptr<scalar_t>(),
                  r.const_data_ptr<scalar_t>(), moments.const_data_ptr<double>(), c.size(0), beta, label_smoothing,
                  var, abl, loss.mutable_data_ptr<scalar_t>(), margins.mutable_data_ptr<scalar_t>(),
                  stats_out.mutable_data_ptr<double>());
  });
  return {loss, margins, stats_out};
}

// The backward op on `device`: (d loss / d chosen, d loss / d rejected).
template <typename Device>
std::tuple<at::Tensor, at::Tensor> backward(const Device& device, const at::Tensor& grad_loss,
                                            const at::Tensor& chosen, const at::Tensor& rejected,
                                            const at::Tensor& margins, double beta, double label_smoothing) {
  check_pair_backward_inputs(grad_loss, chosen, rejected, margins);
  const auto c = chosen.contiguous(), r = rejected.contiguous();
  const auto m = margins.to(c.scalar_type()).contiguous(), g = grad_loss.to(c.scalar_type()).contiguous();
  auto grad_chosen = at::empty_like(c), grad_rejected = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n == 0) return {grad_chosen, grad_rejected};
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "amapo_loss_bwd", [&] {
    device.launch(amapo_backward_kernel<scalar_t>, blocks, kThreads, g.const_data_ptr<scalar_t>(),
                  c.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), n, beta,
                  label_smoothing, grad_chosen.mutable_data_ptr<scalar_t>(),
                  grad_rejected.mutable_data_ptr<scalar_t>());
  });
  return {grad_chosen, grad_rejected};
}

}  // namespace amapo::amapo_loss_kernels
