// Op schemas of amapo_kernels. Kernels register per device in the *_cpu.cpp / *_cuda.cu files;
// fake (meta) kernels and autograd live in amapo_kernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "sequence_logps_cpu_rows.h"

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
namespace {

// _C.cpu_kernels(): the CPU kernels the sequence_logps op runs, "avx512", "avx2" or "aten" (AMAPO_CPU_KERNELS).
PyObject* cpu_kernels(PyObject* /*module*/, PyObject* /*args*/) {
  try {
    return PyUnicode_FromString(amapo::cpu_rows::isa_name(amapo::cpu_rows::selected()));
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_kernels", cpu_kernels, METH_NOARGS, "the CPU kernels of sequence_logps: avx512, avx2 or aten"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "torch_version", AMAPO_TORCH_VERSION) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
