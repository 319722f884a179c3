// The CUDA ops amapo_kernels::sequence_logps_{fwd,bwd,bwd_inplace}: the kernels and their launches are in
// sequence_logps_kernels.cuh.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_device.cuh"
#include "sequence_logps_kernels.cuh"

namespace amapo {
namespace {

std::tuple<at::Tensor, at::Tensor> sequence_logps_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index, bool average, bool shift,
                                                           bool check_labels) {
  const c10::cuda::CUDAGuard guard(op_device({&logits, &labels}));
  return sequence_logps_kernels::forward(CudaDevice{}, logits, labels, ignore_index, average, shift, check_labels);
}

at::Tensor sequence_logps_bwd_cuda(const at::Tensor& grad_seq, const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& softmax_stats, int64_t ignore_index, bool average, bool shift) {
  const c10::cuda::CUDAGuard guard(op_device({&logits, &grad_seq, &labels, &softmax_stats}));
  auto grad = at::empty(logits.sizes(), logits.options());
  sequence_logps_kernels::backward_into(CudaDevice{}, grad_seq, logits, labels, softmax_stats, ignore_index, average,
                                        shift, grad);
  return grad;
}

void sequence_logps_bwd_inplace_cuda(const at::Tensor& grad_seq, at::Tensor& logits, const at::Tensor& labels,
                                     const at::Tensor& softmax_stats, int64_t ignore_index, bool average, bool shift) {
  const c10::cuda::CUDAGuard guard(op_device({&logits, &grad_seq, &labels, &softmax_stats}));
  sequence_logps_kernels::backward_into(CudaDevice{}, grad_seq, logits, labels, softmax_stats, ignore_index, average,
                                        shift, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(amapo_kernels, CUDA, m) {
  m.impl("sequence_logps_fwd", &sequence_logps_fwd_cuda);
  m.impl("sequence_logps_bwd", &sequence_logps_bwd_cuda);
  m.impl("sequence_logps_bwd_inplace", &sequence_logps_bwd_inplace_cuda);
}

}  // namespace amapo
