// What copy_hash_module.cpp and read_ranges.cpp share: the copy + XXH3 build chosen for this
// CPU, the GIL threshold, and read_ranges itself (registered by the module).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>

using KvstoreCopyHashFn = uint64_t (*)(char*, const char*, size_t);

// copy_hash.h built for this CPU (AVX2 or SSE2), picked when the module loads.
extern const KvstoreCopyHashFn kvstore_copy_hash_fn;

// Calls moving fewer bytes than this keep the GIL. NOTE: dropping and taking it back costs
// about a microsecond; under 16 KiB that is more than the copy itself.
constexpr uint64_t kvstore_release_gil_min_bytes = uint64_t{16} << 10;

PyObject* kvstore_read_ranges(PyObject*, PyObject* const* args, Py_ssize_t nargs);
