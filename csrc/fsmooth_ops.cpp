// fsmooth._C: operator schemas (TORCH_LIBRARY) and the Python module stub.
// Importing fsmooth._C registers the ops under torch.ops.fsmooth.*.
#include <Python.h>
#include <torch/library.h>

#include <string>

// setup.py defines these (the torch and CUDA the build compiled against, a digest of csrc/), so that
// fsmooth._ext can tell a stale build from a current one.
#ifndef FSMOOTH_BUILD_TORCH_VERSION
#define FSMOOTH_BUILD_TORCH_VERSION "unknown"
#endif
#ifndef FSMOOTH_BUILD_CUDA_VERSION
#define FSMOOTH_BUILD_CUDA_VERSION "unknown"
#endif
#ifndef FSMOOTH_BUILD_SOURCES_DIGEST
#define FSMOOTH_BUILD_SOURCES_DIGEST "unknown"
#endif

extern "C" {
// An empty module: the ops live in the dispatcher, not in module attributes.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fsmooth, m) {
  m.def("abi_version() -> int");
  m.def("build_info() -> str");
}

TORCH_LIBRARY_IMPL(fsmooth, CompositeExplicitAutograd, m) {
  // 2: WhileLoopGraph(body, pred, max_trips) with a device-side trip cap; build_info().
  m.impl("abi_version", []() -> int64_t { return 2; });
  m.impl("build_info", []() -> std::string {
    return std::string("{\"torch\": \"") + FSMOOTH_BUILD_TORCH_VERSION + "\", \"cuda\": \"" +
           FSMOOTH_BUILD_CUDA_VERSION + "\", \"sources\": \"" + FSMOOTH_BUILD_SOURCES_DIGEST + "\"}";
  });
}
