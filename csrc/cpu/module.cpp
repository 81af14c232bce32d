// Python module shell of the CPU kernel library: the kernels are plain C entry points (see
// kvops/abi.h) that kvstore/ops loads with ctypes; this init function only lets the build
// install the library as a module.
#include <Python.h>

#include "kvops/abi.h"

extern "C" int kvops_abi_version() { return 1; }

// The CPU kernels cannot fail after validation, so there is never a message.
extern "C" const char* kvops_last_error() { return ""; }

static struct PyModuleDef kvops_module = {PyModuleDef_HEAD_INIT, "_kvops_cpu",
                                          "kvstore CPU kernels (C entry points via ctypes)", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__kvops_cpu(void) { return PyModule_Create(&kvops_module); }
