// The `Device` that the kernel families' host code (*_kernels.cuh) launches on in the CUDA build. The same host
// code runs in the tests' CPU emulation (tests/cuda_emulation/emulated_device.h), which provides the same three
// members, so what it verifies is the code built here.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <cuda_runtime.h>

#include <initializer_list>

namespace amapo {

struct CudaDevice {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  int64_t multiprocessors() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

  // False while the stream is being captured into a CUDA graph: no host synchronization is allowed then.
  bool may_sync() const {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  }

  // kernel<<<grid, threads>>>(args...) on the current stream, with the launch error checked.
  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, Args... args) const {
    kernel<<<grid, threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The GPU a CUDA op runs on, for its CUDAGuard: the first of its tensors that is on one (the dispatcher chose the
// CUDA kernel because one is). Guarding on a fixed argument that is the CPU tensor of a mixed call would fail
// inside CUDAGuard ("non-CUDA DeviceType") before the op's own device check could name the arguments.
inline c10::Device op_device(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* tensor : tensors) {
    if (tensor->is_cuda()) return tensor->device();
  }
  return (*tensors.begin())->device();  // no CUDA tensor: not reachable through the dispatcher
}

}  // namespace amapo
