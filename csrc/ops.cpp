// Op schemas of amapo_kernels. Kernels register per device in the *_cpu.cpp / *_cuda.cu files;
// fake (meta) kernels and autograd live in amapo_kernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(amapo_kernels, m) {
  // Per-sequence log-probs of labels under log_softmax(logits). softmax_stats [B, T - shift, 2] holds each
  // row's (max, log sum exp(x - max)) for the backward; both are kept for log_softmax's precision.
  // check_labels=False skips the label-range check (a host sync on CUDA): an out-of-range label then gives NaN.
  m.def("sequence_logps_fwd(Tensor logits, Tensor labels, int ignore_index, bool average, bool shift,"
        " bool check_labels=True) -> (Tensor seq_logps, Tensor softmax_stats)");
  m.def("sequence_logps_bwd(Tensor grad, Tensor logits, Tensor labels, Tensor softmax_stats, int ignore_index,"
        " bool average, bool shift) -> Tensor");
  // The same gradient written over the logits themselves (opt-in: sequence_logps(inplace_backward=True)).
  m.def("sequence_logps_bwd_inplace(Tensor grad, Tensor(a!) logits, Tensor labels, Tensor softmax_stats,"
        " int ignore_index, bool average, bool shift) -> ()");
  // AMaPO loss over B pairs given the moments (count, pivot, mean offset, M2) of d = chosen - rejected over all ranks.
  m.def("amapo_loss_fwd(Tensor chosen_logps, Tensor rejected_logps, Tensor batch_moments, float beta,"
        " float label_smoothing, str variant, str ablation) -> (Tensor loss, Tensor margins, Tensor batch_stats)");
  m.def("amapo_loss_bwd(Tensor grad, Tensor chosen_logps, Tensor rejected_logps, Tensor margins, float beta,"
        " float label_smoothing) -> (Tensor, Tensor)");
}

// An importable module whose import loads the library and runs the registrations above. It records the
// torch it was compiled against (AMAPO_TORCH_VERSION, set by CMakeLists.txt): the C++ ABI of torch changes
// between releases, so amapo_kernels warns on import when the running torch is another one.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "torch_version", AMAPO_TORCH_VERSION) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
