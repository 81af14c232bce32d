// Python module shell of the CUDA kernel library: the kernels are plain C entry points (see
// kvops/abi.h) that kvstore/ops loads with ctypes, only when a CUDA tensor reaches an op.
#include <Python.h>

#include <string>

#include "kvops/abi.h"

namespace kvops {

namespace {
thread_local std::string last_error;
}

void set_last_error(const char* message) { last_error = message; }

}  // namespace kvops

extern "C" int kvops_abi_version() { return 1; }

extern "C" const char* kvops_last_error() { return kvops::last_error.c_str(); }

static struct PyModuleDef kvops_module = {PyModuleDef_HEAD_INIT, "_kvops_cuda",
                                          "kvstore CUDA kernels (C entry points via ctypes)", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__kvops_cuda(void) { return PyModule_Create(&kvops_module); }
