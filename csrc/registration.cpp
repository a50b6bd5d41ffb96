// Op schemas of the extension mu_fast._C and the Python module stub that loads it.
//
// Implementations: masked_adamw_cpu.cpp (CPU), masked_adamw_cuda.cu (CUDA, only in CUDA builds). Fake (meta)
// implementations for torch.compile are registered in Python (mu_fast/optim/_ext_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import mu_fast._C` loads this shared library, which runs the static op registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mu_fast compiled ops (torch.ops.mu_fast)", -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef MU_FAST_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(mu_fast, m) {
  // Masked AdamW (mu_fast/optim/masked_adamw.py documents the semantics and the table layouts).
  // grads: one dense gradient (or None) per parameter, or empty when compact_grad is given. partial: fp64 per-tile
  // sums of squares. coef: one row per parameter slot (the update ops take their bucket's rows).
  m.def(
      "masked_adamw_grad_sumsq(Tensor?[] grads, Tensor? compact_grad, Tensor tiles, Tensor index, "
      "Tensor(a!) partial) -> ()");
  m.def(
      "masked_adamw_scalars(Tensor hyper, Tensor slot_group, Tensor(a!) slot_step, Tensor present, Tensor partial, "
      "Tensor(b!) coef, Tensor(c!) control, bool has_stats, bool check_finite) -> ()");
  m.def(
      "masked_adamw_update(Tensor(a!)[] params, Tensor?[] grads, Tensor? compact_grad, Tensor tiles, Tensor index, "
      "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!)? master, Tensor coef) -> ()");
  m.def(
      "masked_adamw8bit_update(Tensor(a!)[] params, Tensor?[] grads, Tensor? compact_grad, Tensor tiles, "
      "Tensor index, Tensor(b!) codes_m, Tensor(c!) codes_v, Tensor(d!) absmax_m, Tensor(e!) absmax_v, "
      "Tensor qmap_m, Tensor qmap_v, Tensor mids_m, Tensor mids_v, Tensor(f!)? master, Tensor coef) -> ()");
  m.def(
      "masked_gather_grad(Tensor grad, Tensor tiles, Tensor index, int tile_begin, int tile_end, "
      "Tensor(a!) compact_grad, bool accumulate) -> ()");
}
