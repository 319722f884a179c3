// The CUDA ops amapo_kernels::amapo_loss_{fwd,bwd}: the kernels and their launches are in amapo_loss_kernels.cuh.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "amapo_loss_kernels.cuh"
#include "cuda_device.cuh"

namespace amapo {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> amapo_loss_fwd_cuda(const at::Tensor& chosen, const at::Tensor& rejected,
                                                                   const at::Tensor& batch_moments, double beta,
                                                                   double label_smoothing, c10::string_view variant,
                                                                   c10::string_view ablation) {
  const c10::cuda::CUDAGuard guard(op_device({&chosen, &rejected, &batch_moments}));
  return amapo_loss_kernels::forward(CudaDevice{}, chosen, rejected, batch_moments, beta, label_smoothing, variant,
                                     ablation);
}

std::tuple<at::Tensor, at::Tensor> amapo_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& chosen,
                                                       const at::Tensor& rejected, const at::Tensor& margins,
                                                       double beta, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(op_device({&chosen, &grad_loss, &rejected, &margins}));
  return amapo_loss_kernels::backward(CudaDevice{}, grad_loss, chosen, rejected, margins, beta, label_smoothing);
}

}  // namespace

TORCH_LIBRARY_IMPL(amapo_kernels, CUDA, m) {
  m.impl("amapo_loss_fwd", &amapo_loss_fwd_cuda);
  m.impl("amapo_loss_bwd", &amapo_loss_bwd_cuda);
}

}  // namespace amapo
