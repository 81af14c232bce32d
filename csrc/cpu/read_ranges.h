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

// memcpy of src[0, num_bytes) to dst (not overlapping), with non-temporal stores (and a
// store fence) from kvstore_copy_stream_min_bytes on.
void kvstore_copy(char* dst, const char* src, size_t num_bytes);

// kvstore_copy shared with a helper thread from 2 MiB (copy_split.h; copy_hash_module.cpp).
void kvstore_copy_split(char* dst, const char* src, size_t num_bytes);

// NOTE: measured here (bench/RESULTS.md "Issue 15m"), 4 MiB: 1.5-1.75x the bytes per
// CPU-second of glibc's memcpy from one source into distinct places (a put: the destination
// lines are not read for ownership first), 0.96-1.2x from cold sources into one reused buffer
// (a get_into: a 4 MiB destination does not stay in this CPU's 2 MiB L2 anyway). Below 1 MiB
// a reused buffer can stay cached, where plain stores are as fast.
#ifndef KVSTORE_COPY_STREAM_MIN_BYTES
#define KVSTORE_COPY_STREAM_MIN_BYTES (uint64_t{1} << 20)
#endif
constexpr uint64_t kvstore_copy_stream_min_bytes = KVSTORE_COPY_STREAM_MIN_BYTES;

// Calls moving fewer bytes than this keep the GIL. NOTE: dropping and taking it back costs
// about a microsecond; under 16 KiB that is more than the copy itself.
constexpr uint64_t kvstore_release_gil_min_bytes = uint64_t{16} << 10;

PyObject* kvstore_read_ranges(PyObject*, PyObject* const* args, Py_ssize_t nargs);
