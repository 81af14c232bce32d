// Python module shell of the CPU kernel library: the kernels are plain C entry points that
// kvstore/ops loads with ctypes; this init function only lets the build install it as a module.
#include <Python.h>

extern "C" int kvops_abi_version() { return 1; }

static struct PyModuleDef kvops_module = {PyModuleDef_HEAD_INIT, "_kvops_cpu",
                                          "kvstore CPU kernels (C entry points via ctypes)", -1,
                                          nullptr};

PyMODINIT_FUNC PyInit__kvops_cpu(void) { return PyModule_Create(&kvops_module); }
