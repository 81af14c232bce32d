// kvstore._copy_hash: the fused copy + XXH3-64 of copy_hash.h as a CPython module (the shm
// transport's verified reads, kvstore/transport/shm.py). A real extension rather than a ctypes
// entry point of _kvops_cpu: the client must not import torch (kvstore.ops does), and a
// METH_FASTCALL call costs well under the ~1 us of a ctypes call, which matters at 64 KiB.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "copy_split.h"
#include "range_table.h"
#include "read_ranges.h"
#include "shm_locations.h"
#include "stream_copy.h"

extern "C" uint64_t kvops_copy_hash_base(char* dst, const char* src, size_t num_bytes);
extern "C" uint64_t kvops_copy_hash_split_base(char* dst, const char* src, size_t num_bytes);
#if defined(__x86_64__)
extern "C" uint64_t kvops_copy_hash_avx2(char* dst, const char* src, size_t num_bytes);
extern "C" uint64_t kvops_copy_hash_split_avx2(char* dst, const char* src, size_t num_bytes);
#endif

namespace {

// The build of copy_hash.h for this CPU, chosen once when the module loads.
KvstoreCopyHashFn pick_copy_hash() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) return kvops_copy_hash_avx2;
#endif
  return kvops_copy_hash_base;
}

// copy_hash.h's two-thread copy_hash_split for this CPU.
KvstoreCopyHashFn pick_copy_hash_split() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2")) return kvops_copy_hash_split_avx2;
#endif
  return kvops_copy_hash_split_base;
}

// Plain copies from this size on are shared with a helper thread (kvstore_copy_split).
// NOTE: as copy_hash.h's kSplitMinBytes: a thread's start (~20-50 us) against the copy.
constexpr size_t kCopySplitMinBytes = size_t{2} << 20;

// A chunk of a shared plain copy: non-temporal stores, fenced before its flag is set (the
// stores are weakly ordered) or before the call returns.
void copy_fenced(char* dst, const char* src, size_t num_bytes) {
  kvops::copy_streaming(dst, src, num_bytes);
  kvops::store_fence();
}

}  // namespace

const KvstoreCopyHashFn kvstore_copy_hash_fn = pick_copy_hash();

void kvstore_copy(char* dst, const char* src, size_t num_bytes) {
  if (num_bytes >= kvstore_copy_stream_min_bytes) {
    kvops::copy_streaming(dst, src, num_bytes);
    kvops::store_fence();
  } else {
    memcpy(dst, src, num_bytes);
  }
}

// kvstore_copy with the second half shared with a helper thread from kCopySplitMinBytes
// (copy_split.h: the caller does the first half, then every chunk the helper has not
// taken, and waits for those it took); kvstore_copy below that.
void kvstore_copy_split(char* dst, const char* src, size_t num_bytes) {
  if (num_bytes < kCopySplitMinBytes) {
    kvstore_copy(dst, src, num_bytes);
    return;
  }
  const size_t split = num_bytes / 2 / 64 * 64;
  auto state = kvsplit::make_split(dst, src, num_bytes, split, 64);
  kvsplit::start_helper(state, copy_fenced);
  copy_fenced(dst, src, split);
  for (size_t c = 0; c < state->num_chunks; ++c) {
    if (kvsplit::claim(*state, c)) {
      const size_t begin = state->chunk_begin(c);
      copy_fenced(dst + begin, src + begin, state->chunk_end(c) - begin);
    } else {
      kvsplit::wait_helper(*state, c);
    }
  }
}

namespace {

const KvstoreCopyHashFn copy_hash_fn = kvstore_copy_hash_fn;
const KvstoreCopyHashFn copy_hash_split_fn = pick_copy_hash_split();

// The optional num_threads argument args[index] of call ``name`` (1 when absent): 1 or 2;
// -1 with a Python error set otherwise.
int num_threads_arg(const char* name, PyObject* const* args, Py_ssize_t nargs,
                    Py_ssize_t index) {
  if (nargs <= index) return 1;
  const long value = PyLong_AsLong(args[index]);
  if (value == -1 && PyErr_Occurred()) return -1;
  if (value != 1 && value != 2) {
    PyErr_Format(PyExc_ValueError, "%s: num_threads must be 1 or 2, got %ld", name, value);
    return -1;
  }
  return static_cast<int>(value);
}
constexpr Py_ssize_t kReleaseGilMinBytes = static_cast<Py_ssize_t>(kvstore_release_gil_min_bytes);

// Views of one (dst, src) pair of call ``name``; false with a Python error set when they are
// not usable.
bool get_pair(const char* name, PyObject* dst, PyObject* src, Py_buffer* dst_view,
              Py_buffer* src_view) {
  if (PyObject_GetBuffer(dst, dst_view, PyBUF_CONTIG) != 0) return false;
  if (PyObject_GetBuffer(src, src_view, PyBUF_CONTIG_RO) != 0) {
    PyBuffer_Release(dst_view);
    return false;
  }
  if (dst_view->len != src_view->len) {
    PyErr_Format(PyExc_ValueError, "%s: dst has %zd bytes, src %zd", name, dst_view->len,
                 src_view->len);
    PyBuffer_Release(src_view);
    PyBuffer_Release(dst_view);
    return false;
  }
  return true;
}

// Runs op(dst, src, num_bytes) on the pair args[0], args[1] of call ``name`` (the GIL released
// from 16 KiB), which takes 2 arguments, or up to ``max_args`` (the rest read by the caller);
// false with a Python error set when they are not two usable buffers.
template <typename Op>
bool on_pair(const char* name, PyObject* const* args, Py_ssize_t nargs, const Op& op,
             Py_ssize_t max_args = 2) {
  if (nargs < 2 || nargs > max_args) {
    PyErr_Format(PyExc_TypeError, "%s(dst, src%s) takes %s arguments", name,
                 max_args > 2 ? "[, num_threads]" : "", max_args > 2 ? "2 or 3" : "exactly 2");
    return false;
  }
  Py_buffer dst, src;
  if (!get_pair(name, args[0], args[1], &dst, &src)) return false;
  char* d = static_cast<char*>(dst.buf);
  const char* s = static_cast<const char*>(src.buf);
  if (dst.len >= kReleaseGilMinBytes) {
    Py_BEGIN_ALLOW_THREADS op(d, s, static_cast<size_t>(dst.len));
    Py_END_ALLOW_THREADS
  } else {
    op(d, s, static_cast<size_t>(dst.len));
  }
  PyBuffer_Release(&src);
  PyBuffer_Release(&dst);
  return true;
}

// copy_hash(dst, src) with the build ``fn``.
PyObject* copy_hash_with(const char* name, KvstoreCopyHashFn fn, PyObject* const* args,
                         Py_ssize_t nargs) {
  uint64_t digest = 0;
  const bool ok = on_pair(name, args, nargs, [&](char* d, const char* s, size_t num_bytes) {
    digest = fn(d, s, num_bytes);
  });
  return ok ? PyLong_FromUnsignedLongLong(digest) : nullptr;
}

PyObject* copy_hash(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return copy_hash_with("copy_hash", copy_hash_fn, args, nargs);
}

PyObject* copy_hash_base(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return copy_hash_with("copy_hash_base", kvops_copy_hash_base, args, nargs);
}

PyObject* copy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const int num_threads = num_threads_arg("copy", args, nargs, 2);
  if (num_threads < 0) return nullptr;
  if (!on_pair("copy", args, nargs, num_threads == 2 ? kvstore_copy_split : kvstore_copy, 3)) {
    return nullptr;
  }
  Py_RETURN_NONE;
}

// copy_hash_many and put_copy_hash_many: fn over each (dsts[i], srcs[i]) of call ``name``.
PyObject* copy_hash_pairs(const char* name, KvstoreCopyHashFn fn, PyObject* const* args) {
  PyObject* dsts = PySequence_Fast(args[0], "copy_hash_many: dsts must be a sequence");
  if (dsts == nullptr) return nullptr;
  PyObject* srcs = PySequence_Fast(args[1], "copy_hash_many: srcs must be a sequence");
  if (srcs == nullptr) {
    Py_DECREF(dsts);
    return nullptr;
  }
  const Py_ssize_t num = PySequence_Fast_GET_SIZE(dsts);
  PyObject* result = nullptr;
  std::vector<Py_buffer> views;
  std::vector<uint64_t> digests;
  Py_ssize_t total_bytes = 0;
  if (PySequence_Fast_GET_SIZE(srcs) != num) {
    PyErr_Format(PyExc_ValueError, "%s: %zd dsts but %zd srcs", name, num,
                 PySequence_Fast_GET_SIZE(srcs));
    goto done;
  }
  views.resize(2 * static_cast<size_t>(num));
  for (Py_ssize_t i = 0; i < num; ++i) {
    if (!get_pair(name, PySequence_Fast_GET_ITEM(dsts, i),
                  PySequence_Fast_GET_ITEM(srcs, i), &views[2 * i], &views[2 * i + 1])) {
      views.resize(2 * static_cast<size_t>(i));  // release only the pairs acquired
      goto done;
    }
    total_bytes += views[2 * i].len;
  }
  digests.resize(static_cast<size_t>(num));
  {
    PyThreadState* saved = total_bytes >= kReleaseGilMinBytes ? PyEval_SaveThread() : nullptr;
    for (Py_ssize_t i = 0; i < num; ++i) {
      digests[i] = fn(static_cast<char*>(views[2 * i].buf),
                                    static_cast<const char*>(views[2 * i + 1].buf),
                                    static_cast<size_t>(views[2 * i].len));
    }
    if (saved != nullptr) PyEval_RestoreThread(saved);
  }
  result = PyList_New(num);
  if (result == nullptr) goto done;
  for (Py_ssize_t i = 0; i < num; ++i) {
    PyObject* value = PyLong_FromUnsignedLongLong(digests[i]);
    if (value == nullptr) {
      Py_CLEAR(result);
      goto done;
    }
    PyList_SET_ITEM(result, i, value);
  }
done:
  for (Py_buffer& view : views) PyBuffer_Release(&view);
  Py_DECREF(srcs);
  Py_DECREF(dsts);
  return result;
}

PyObject* copy_hash_many(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "copy_hash_many(dsts, srcs) takes exactly 2 arguments");
    return nullptr;
  }
  return copy_hash_pairs("copy_hash_many", copy_hash_fn, args);
}

PyObject* put_copy_hash_many(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 && nargs != 3) {
    PyErr_SetString(PyExc_TypeError,
                    "put_copy_hash_many(dsts, srcs[, num_threads]) takes 2 or 3 arguments");
    return nullptr;
  }
  const int num_threads = num_threads_arg("put_copy_hash_many", args, nargs, 2);
  if (num_threads < 0) return nullptr;
  return copy_hash_pairs("put_copy_hash_many",
                         num_threads == 2 ? copy_hash_split_fn : copy_hash_fn, args);
}

PyMethodDef methods[] = {
    {"copy_hash", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(copy_hash)),
     METH_FASTCALL,
     "copy_hash(dst, src) -> int: copy src into dst (writable, C-contiguous buffers of equal "
     "length, not overlapping) and return the XXH3-64 digest of the copied bytes.\n"
     "Raises ValueError for unequal lengths, TypeError/BufferError for unusable buffers "
     "(nothing copied then). Releases the GIL from 16 KiB."},
    {"copy_hash_base",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(copy_hash_base)),
     METH_FASTCALL,
     "copy_hash_base(dst, src) -> int: copy_hash with the baseline build (SSE2 on x86-64) "
     "whatever this CPU has: for tests and benchmarks comparing it with the build ISA names."},
    {"copy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(copy)),
     METH_FASTCALL,
     "copy(dst, src[, num_threads]) -> None: copy src into dst (writable, C-contiguous "
     "buffers of equal length, not overlapping), with non-temporal stores from 1 MiB; with "
     "num_threads=2, from 2 MiB on a helper thread copies part of the second half "
     "(copy_split.h: never waiting for a helper that did not start). Raises as copy_hash, "
     "ValueError for num_threads other than 1 or 2 (nothing copied then). Releases the GIL "
     "from 16 KiB."},
    {"copy_hash_many",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(copy_hash_many)),
     METH_FASTCALL,
     "copy_hash_many(dsts, srcs) -> list[int]: copy_hash of each pair, in one call that "
     "releases the GIL once for the batch. Every pair is checked before anything is copied: "
     "one bad pair raises and copies nothing."},
    {"put_copy_hash_many",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(put_copy_hash_many)),
     METH_FASTCALL,
     "put_copy_hash_many(dsts, srcs[, num_threads]) -> list[int]: copy_hash_many for a put; "
     "with num_threads=2 each pair of 2 MiB or more is copied and hashed by this thread and "
     "a helper (copy_split.h: never waiting for a helper that did not start), the same "
     "digests. Raises as copy_hash_many, ValueError for num_threads other than 1 or 2."},
    {"read_ranges",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_read_ranges)),
     METH_FASTCALL,
     "read_ranges(dsts, sizes, checksums, starts, counts, replica_segment, replica_offset, "
     "segment_addresses, segment_sizes, verify, empty_checksum, segment_flags, chunk_bytes, "
     "tensor_type[, guard_tables, guard_seqs, guard_epochs]) -> "
     "(written, slow): the shm reads of a GetReplicas batch (read_ranges.cpp). Per key i: copy (and with verify, hash and compare) the first replica whose "
     "segment address is not 0, populating its chunks (segment_flags: a bytearray per "
     "segment, one byte per chunk_bytes, or None; dsts are writable buffers or, when "
     "tensor_type is torch.Tensor, contiguous CPU tensors); written[i] = bytes written (0 for the "
     "empty marker), or None and i in slow when the key must take the general path. Raises "
     "TypeError/ValueError for malformed lists only. With the guards (cached shm reads, "
     "client/shm_locations.py): guard_tables has each segment's location table address (0: "
     "none), guard_seqs/guard_epochs each key's cached slot sequence and epoch; a key is "
     "copied only while loc_valid holds before the copy and still holds after it, else slow."},
    {"loc_publish",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_loc_publish)),
     METH_FASTCALL,
     "loc_publish(table, offset, epoch, key_hash, length, checksum): the object at offset owns "
     "its slot of the shm location table at address table (shm_locations.h; daemon only)."},
    {"loc_publish_many",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_loc_publish_many)),
     METH_FASTCALL,
     "loc_publish_many(table, epoch, keys, offsets, lengths, checksums): loc_publish of each "
     "object (lists; key hash XXH3-64 of the UTF-8, computed here; daemon only)."},
    {"loc_prefault",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_loc_prefault)),
     METH_FASTCALL,
     "loc_prefault(table, num_bytes): touch every page of a new table (daemon only)."},
    {"loc_clear",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_loc_clear)),
     METH_FASTCALL,
     "loc_clear(table, offset): empty the slot of offset if that object owns it (daemon only)."},
    {"loc_set", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_loc_set)),
     METH_FASTCALL, "loc_set(table, word, value): set a header word (daemon only)."},
    {"loc_vouch",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_loc_vouch)),
     METH_FASTCALL,
     "loc_vouch(keys, written, sizes, checksums, starts, counts, replica_segment, "
     "replica_offset, segment_addresses, table_addresses, segments, entry_type) -> "
     "[(key, entry_type(segment, offset, size, checksum, seq, epoch))]: the keys read_ranges "
     "served whose replica's table vouches for it now (shm_locations.cpp)."},
    {"loc_read", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kvstore_loc_read)),
     METH_FASTCALL,
     "loc_read(table, offset) -> (seq, epoch, key_hash, length, checksum, table_epoch, "
     "lease_until_ns) or None: a consistent read of the slot of offset while it holds it."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_copy_hash",
                      "Fused copy + XXH3-64 digest (csrc/cpu/copy_hash.h)", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__copy_hash(void) {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  // ISA: the build copy_hash and read_ranges use on this CPU ("avx2" or "base")
  const char* isa = copy_hash_fn == kvops_copy_hash_base ? "base" : "avx2";
  if (PyModule_AddStringConstant(m, "ISA", isa) != 0 || kvstore_add_range_table(m) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
