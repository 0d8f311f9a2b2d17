// fsmooth._C: operator schemas (TORCH_LIBRARY) and the Python module stub.
// Importing fsmooth._C registers the ops under torch.ops.fsmooth.*.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: the ops live in the dispatcher, not in module attributes.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fsmooth, m) {
  m.def("abi_version() -> int");
}

TORCH_LIBRARY_IMPL(fsmooth, CompositeExplicitAutograd, m) {
  m.impl("abi_version", []() -> int64_t { return 1; });
}
