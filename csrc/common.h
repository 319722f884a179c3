// Helpers shared by the CPU and CUDA kernels of every op family.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define AMAPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AMAPO_HOST_DEVICE inline
#endif

namespace amapo {

// Accumulation type: fp32 for half/bf16/fp32, fp64 for fp64 (used by gradcheck).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// Logits may be [B, T, V] with any batch/time strides; the vocabulary dim must be dense.
// These checks guard direct calls of the ops; the Python wrappers give friendlier messages first.
inline void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, bool shift) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "logits must be [B, T, V], got ", logits.dim(), " dims");
  TORCH_CHECK_VALUE(labels.dim() == 2, "labels must be [B, T], got ", labels.dim(), " dims");
  TORCH_CHECK_VALUE(logits.size(0) == labels.size(0) && logits.size(1) == labels.size(1),
                    "logits [B, T, V] and labels [B, T] disagree on B or T");
  TORCH_CHECK_VALUE(logits.size(2) > 0, "logits has an empty vocabulary (V = 0)");
  TORCH_CHECK_VALUE(logits.size(2) == 1 || logits.stride(2) == 1, "logits must have a contiguous vocabulary dimension");
  TORCH_CHECK_VALUE(!shift || logits.size(1) >= 1, "shift=True needs T >= 1");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64");
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()) &&
                       (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble ||
                        logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kBFloat16),
                   "logits must be float32, float64, float16 or bfloat16");
  TORCH_CHECK_VALUE(logits.device() == labels.device(), "logits and labels must be on the same device");
}

// The labels scored by each logits row: labels[:, 1:] with shift, else labels.
inline at::Tensor scored_labels(const at::Tensor& labels, bool shift) {
  return (shift ? labels.slice(1, 1) : labels).contiguous();
}

// Data-dependent check, done before any kernel of ours reads memory with these labels: the min and max of the
// scored labels (ignore_index counted as 0) in one reduction and one copy to the host (on CUDA 4 small kernels
// where an elementwise test per bound took 6), and the error says which labels were out of range.
inline void check_label_range(const at::Tensor& used_labels, int64_t vocab, int64_t ignore_index) {
  if (used_labels.numel() == 0) return;
  const auto scored = at::where(used_labels.eq(ignore_index), at::Scalar(int64_t(0)), used_labels);
  const auto [lowest, highest] = at::aminmax(scored);
  const auto range = at::stack({lowest, highest}).cpu();
  const int64_t low = range.const_data_ptr<int64_t>()[0], high = range.const_data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(low >= 0 && high < vocab, "labels must lie in [0, V=", vocab, ") or equal ignore_index=",
                    ignore_index, ", got labels from ", low, " to ", high);
}

// Whether no two elements of t share memory, proven from sizes and strides (as the Python wrapper's
// amapo_kernels.sequence_logps._elements_are_distinct): taken by increasing stride, each dimension of size > 1
// steps over the whole span of the ones before it.
inline bool elements_are_distinct(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += stride * (size - 1);
  }
  return true;
}

// The in-place backward writes the gradient over `logits`, as any in-place op: refused for logits whose elements
// share memory (the writes would collide) and for a leaf that requires grad while grad mode is on; and the
// version is bumped, so that a graph that saved the logits raises "modified by an inplace operation" instead of
// computing with the gradient in their place. (sequence_logps(inplace_backward=True) checks the first before its
// forward, and calls the op from a backward, with grad mode off.)
inline void check_writable_in_place(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(elements_are_distinct(logits), "sequence_logps_bwd_inplace: logits must not have elements that "
                    "share memory (an expand or an overlapping as_strided view), got strides ", logits.strides(),
                    " for shape ", logits.sizes());
  TORCH_CHECK(!(logits.requires_grad() && logits.is_leaf() && at::GradMode::is_enabled()),
              "sequence_logps_bwd_inplace: a leaf Variable that requires grad is being used in an in-place operation");
}

inline void mark_written_in_place(const at::Tensor& logits) { logits.unsafeGetTensorImpl()->bump_version(); }

// Per-sequence count of scored labels (int64 [B]).
inline at::Tensor label_counts(const at::Tensor& used_labels, int64_t ignore_index) {
  return used_labels.ne(ignore_index).sum(1);
}

}  // namespace amapo
