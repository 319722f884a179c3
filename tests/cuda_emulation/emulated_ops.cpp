// The CUDA ops of csrc/ (their kernels and host code, unchanged) on CPU tensors, through the CPU emulation of
// the CUDA execution model in gpu_emulator.h; and small kernels with known defects that show the emulator
// catches them. Built (and registered over the CPU kernels) by tests/emulated_cuda.py.
#include <torch/extension.h>

#include "gpu_emulator.h"  // after torch, before the kernels: it defines the CUDA keywords

#include "amapo_loss_kernels.cuh"
#include "sequence_logps_kernels.cuh"

namespace {

// The `Device` of the kernels' host code (csrc/cuda_device.cuh has the CUDA one). The tests choose the number
// of multiprocessors (one block per row, or rows split across blocks) and may cap the grid: every kernel here
// loops over its items with a grid stride, so a capped grid must give the same bits (and covers those loops,
// which on a GPU run only beyond 2^20 blocks), and may pretend a CUDA graph is being captured (no host sync).
struct EmulatedDevice {
  int64_t sms;
  uint64_t schedule;
  int64_t max_grid;
  bool capturing = false;

  int64_t multiprocessors() const { return sms; }
  bool may_sync() const { return !capturing; }

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, Args... args) const {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(grid, max_grid));
    gpu_emulator::run_grid(blocks, threads, schedule, [&] { kernel(args...); });
  }
};

// While an emulated op runs, at::empty fills what it returns with NaN (integers with their maximum), as torch
// does in deterministic mode: a kernel that reads an element nobody wrote (a row it skipped, a partial it did not
// merge) then gives NaN instead of whatever the memory held. compute-sanitizer's initcheck does this on the GPU.
class UninitializedMemoryIsNan {
 public:
  UninitializedMemoryIsNan()
      : algorithms_(at::globalContext().deterministicAlgorithms()),
        warn_only_(at::globalContext().deterministicAlgorithmsWarnOnly()),
        fill_(at::globalContext().deterministicFillUninitializedMemory()) {
    at::globalContext().setDeterministicAlgorithms(true, false);
    at::globalContext().setDeterministicFillUninitializedMemory(true);
  }
  ~UninitializedMemoryIsNan() {
    at::globalContext().setDeterministicAlgorithms(algorithms_, warn_only_);
    at::globalContext().setDeterministicFillUninitializedMemory(fill_);
  }
  UninitializedMemoryIsNan(const UninitializedMemoryIsNan&) = delete;
  UninitializedMemoryIsNan& operator=(const UninitializedMemoryIsNan&) = delete;

 private:
  bool algorithms_, warn_only_, fill_;
};

// A new tensor like at::empty(sizes, options) (NaN-filled here) inside a buffer whose kGuard elements before and
// after it are NaN too; check_guards then says whether a kernel wrote outside the tensor. The guards keep the
// tensor's start 16-byte aligned, as the CUDA caching allocator does.
class GuardedTensor {
 public:
  static constexpr int64_t kGuard = 64;

  GuardedTensor(at::IntArrayRef sizes, const at::TensorOptions& options)
      : buffer_(at::full({c10::multiply_integers(sizes) + 2 * kGuard}, NAN, options)),
        tensor_(buffer_.narrow(0, kGuard, buffer_.numel() - 2 * kGuard).view(sizes)) {}

  const at::Tensor& tensor() const { return tensor_; }

  void check_guards(const char* what) const {
    const auto before = buffer_.narrow(0, 0, kGuard), after = buffer_.narrow(0, buffer_.numel() - kGuard, kGuard);
    TORCH_CHECK(before.isnan().all().item<bool>() && after.isnan().all().item<bool>(), what,
                " wrote outside its output tensor (a guard element changed)");
  }

 private:
  at::Tensor buffer_, tensor_;
};

void check_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), name, " must be a CPU tensor (the emulation reads host memory)");
}

// Known defects, each launched on one block of 64 threads.
__global__ void divergent_barrier_kernel(int64_t* out) {
  if (threadIdx.x != 5) __syncthreads();  // thread 5 never reaches the barrier the others wait at
  out[threadIdx.x] = threadIdx.x;
}

__global__ void missing_barrier_kernel(int64_t* out) {
  __shared__ int64_t slots[64];
  slots[threadIdx.x] = int64_t(threadIdx.x) * threadIdx.x;
  out[threadIdx.x] = slots[(threadIdx.x + 1) % 64];  // reads a neighbour's slot without a __syncthreads first
}

__global__ void misaligned_vector_load_kernel(int64_t* out) {
  // out is 16-byte aligned (at::full): from the second element on, a 16-byte load starts 8 bytes off
  const uint4 pair = *reinterpret_cast<const uint4*>(out + 1 + 2 * (threadIdx.x / 32));
  out[threadIdx.x] = pair.x;
}

__global__ void butterfly_sum_kernel(int64_t* out) {
  int64_t value = threadIdx.x;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
  out[threadIdx.x] = value;  // every lane holds its warp's sum
}

at::Tensor run_toy(const std::string& name, uint64_t schedule) {
  auto out = at::full({64}, -1, at::kLong);
  const EmulatedDevice device{1, schedule, 1};
  auto* kernel = name == "divergent_barrier"        ? divergent_barrier_kernel
                 : name == "missing_barrier"        ? missing_barrier_kernel
                 : name == "misaligned_vector_load" ? misaligned_vector_load_kernel
                 : name == "butterfly_sum"          ? butterfly_sum_kernel
                                                    : nullptr;
  TORCH_CHECK_VALUE(kernel != nullptr, "unknown toy kernel ", name);
  device.launch(kernel, 1, 64, out.mutable_data_ptr<int64_t>());
  return out;
}

}  // namespace

// Every op takes, after its own arguments, how to emulate: multiprocessors, schedule (gpu_emulator::Schedule) and
// max_grid (a cap on every launch's grid).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const py::arg_v sms_arg = py::arg("multiprocessors") = 132;  // an H100 SXM's
  const py::arg_v schedule_arg = py::arg("schedule") = 0;
  const py::arg_v max_grid_arg = py::arg("max_grid") = int64_t(1) << 31;
  m.def(
      "sequence_logps_fwd",
      [](const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, bool average, bool shift,
         bool check_labels, int64_t multiprocessors, uint64_t schedule, int64_t max_grid, bool capturing) {
        check_cpu(logits, "logits");
        const UninitializedMemoryIsNan nan_fill;
        const EmulatedDevice device{multiprocessors, schedule, max_grid, capturing};
        return amapo::sequence_logps_kernels::forward(device, logits, labels, ignore_index, average, shift,
                                                      check_labels);
      },
      "the CUDA forward, emulated", py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("average"),
      py::arg("shift"), py::arg("check_labels"), sms_arg, schedule_arg, max_grid_arg,
      py::arg("capturing") = false);
  m.def(
      "sequence_logps_bwd",
      [](const at::Tensor& grad_seq, at::Tensor logits, const at::Tensor& labels, const at::Tensor& softmax_stats,
         int64_t ignore_index, bool average, bool shift, bool inplace, int64_t multiprocessors, uint64_t schedule,
         int64_t max_grid) {
        check_cpu(logits, "logits");
        const UninitializedMemoryIsNan nan_fill;
        const EmulatedDevice device{multiprocessors, schedule, max_grid};
        if (inplace) {
          amapo::sequence_logps_kernels::backward_into(device, grad_seq, logits, labels, softmax_stats, ignore_index,
                                                       average, shift, logits);
          return logits;
        }
        const GuardedTensor guarded(logits.sizes(), logits.options());  // as sequence_logps_bwd_cuda's at::empty
        auto grad = guarded.tensor();
        amapo::sequence_logps_kernels::backward_into(device, grad_seq, logits, labels, softmax_stats, ignore_index,
                                                     average, shift, grad);
        guarded.check_guards("the backward");
        return grad.clone();  // a tensor of its own, at storage offset 0, as the CUDA op returns
      },
      "the CUDA backward (into a new tensor, or in place into logits), emulated", py::arg("grad"), py::arg("logits"),
      py::arg("labels"), py::arg("softmax_stats"), py::arg("ignore_index"), py::arg("average"), py::arg("shift"),
      py::arg("inplace"), sms_arg, schedule_arg, max_grid_arg);
  m.def(
      "amapo_loss_fwd",
      [](const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& batch_moments, double beta,
         double label_smoothing, const std::string& variant, const std::string& ablation, int64_t multiprocessors,
         uint64_t schedule, int64_t max_grid) {
        check_cpu(chosen, "chosen");
        const UninitializedMemoryIsNan nan_fill;
        const EmulatedDevice device{multiprocessors, schedule, max_grid};
        return amapo::amapo_loss_kernels::forward(device, chosen, rejected, batch_moments, beta, label_smoothing,
                                                  variant, ablation);
      },
      "the CUDA AMaPO loss forward, emulated", py::arg("chosen"), py::arg("rejected"), py::arg("batch_moments"),
      py::arg("beta"), py::arg("label_smoothing"), py::arg("variant"), py::arg("ablation"), sms_arg, schedule_arg,
      max_grid_arg);
  m.def(
      "amapo_loss_bwd",
      [](const at::Tensor& grad_loss, const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& margins,
         double beta, double label_smoothing, int64_t multiprocessors, uint64_t schedule, int64_t max_grid) {
        check_cpu(chosen, "chosen");
        const UninitializedMemoryIsNan nan_fill;
        const EmulatedDevice device{multiprocessors, schedule, max_grid};
        return amapo::amapo_loss_kernels::backward(device, grad_loss, chosen, rejected, margins, beta,
                                                   label_smoothing);
      },
      "the CUDA AMaPO loss backward, emulated", py::arg("grad"), py::arg("chosen"), py::arg("rejected"),
      py::arg("margins"), py::arg("beta"), py::arg("label_smoothing"), sms_arg, schedule_arg, max_grid_arg);
  m.def("launches", [] { return gpu_emulator::launches; }, "the number of grids the emulation has run");
  m.def("run_toy", &run_toy, "one of the toy kernels with a known defect (or none: butterfly_sum), emulated",
        py::arg("name"), py::arg("schedule") = 0);
}
