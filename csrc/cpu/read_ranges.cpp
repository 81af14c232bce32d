// kvstore._copy_hash.read_ranges: the whole shm read of a GetReplicas batch in one call (the
// client's same-host batch read, kvstore/client/shm_batch.py). Per key it picks the first
// replica in a mapped segment, checks the range and the destination, copies and (verify)
// hashes, and compares with the recorded checksum; the copies run with the GIL released once
// for the batch when they move at least 16 KiB. Keys it cannot serve this way (no mapped
// replica, a range outside its segment, a destination that is no writable C-contiguous buffer
// or too small (CPU torch tensors are destinations too), a digest that does not match) are
// returned
// as "slow": the caller reads them through the general path, which names the error or falls
// back to the next replica. Nothing here raises for a single key. Like the shm transport's
// ChunkPopulator, it fills this process's page tables (MADV_POPULATE_WRITE) for each chunk of
// a segment the first time a copy touches it, and marks the chunk in the segment's flags.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <errno.h>

#include <vector>

#include "read_ranges.h"
#include "shm_locations.h"

namespace {

struct Copy {
  char* dst;
  const char* src;
  size_t num_bytes;
  uint64_t expected;
  Py_ssize_t key;
  uint64_t* table;   // the guard's location table (cached reads), else nullptr
  uint64_t offset;
};

// Item i of list ``seq`` as an unsigned 64-bit int; false (error set) when it is not one.
bool u64_at(PyObject* seq, Py_ssize_t i, uint64_t* out) {
  *out = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(seq, i));
  return !(*out == static_cast<uint64_t>(-1) && PyErr_Occurred());
}

bool check_list(PyObject* obj, Py_ssize_t expected, const char* what) {
  if (!PyList_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "read_ranges: %s must be a list", what);
    return false;
  }
  if (expected >= 0 && PyList_GET_SIZE(obj) != expected) {
    PyErr_Format(PyExc_ValueError, "read_ranges: %s has %zd items, expected %zd", what,
                 PyList_GET_SIZE(obj), expected);
    return false;
  }
  return true;
}

// One destination: a buffer's view (held until the call ends), or a CPU torch tensor's memory
// (the caller's list keeps the tensor alive for the call).
struct Dst {
  Py_buffer view{};
  bool held = false;
  char* buf = nullptr;
  Py_ssize_t len = 0;
  void release() {
    if (held) PyBuffer_Release(&view);
    held = false;
  }
};

// A torch tensor's memory when it is on the CPU and contiguous (torch tensors have no buffer
// protocol). NOTE: the same checks as values.as_destination, for about 0.3 us instead of ~4 us
// per tensor (a ctypes array over data_ptr); anything unusual is left to that function.
bool tensor_dst(PyObject* tensor, Dst* out) {
  static PyObject* const is_cpu = PyUnicode_InternFromString("is_cpu");
  static PyObject* const is_contiguous = PyUnicode_InternFromString("is_contiguous");
  static PyObject* const data_ptr = PyUnicode_InternFromString("data_ptr");
  static PyObject* const nbytes = PyUnicode_InternFromString("nbytes");
  bool ok = false;
  PyObject* cpu = PyObject_GetAttr(tensor, is_cpu);
  PyObject* contiguous = cpu == Py_True ? PyObject_CallMethodNoArgs(tensor, is_contiguous)
                                        : nullptr;
  PyObject* address = contiguous == Py_True ? PyObject_CallMethodNoArgs(tensor, data_ptr)
                                            : nullptr;
  PyObject* size = address != nullptr ? PyObject_GetAttr(tensor, nbytes) : nullptr;
  if (size != nullptr) {
    out->buf = static_cast<char*>(PyLong_AsVoidPtr(address));
    out->len = PyLong_AsSsize_t(size);
    ok = !PyErr_Occurred() && out->len >= 0 && (out->buf != nullptr || out->len == 0);
  }
  Py_XDECREF(size);
  Py_XDECREF(address);
  Py_XDECREF(contiguous);
  Py_XDECREF(cpu);
  PyErr_Clear();
  return ok;
}

// ``obj`` as a writable C-contiguous destination; false (no error set) when it is not one.
bool get_dst(PyObject* obj, PyObject* tensor_type, Dst* out) {
  if (tensor_type != Py_None && PyObject_TypeCheck(obj, reinterpret_cast<PyTypeObject*>(
                                                             tensor_type))) {
    return tensor_dst(obj, out);
  }
  if (PyObject_GetBuffer(obj, &out->view, PyBUF_WRITABLE | PyBUF_ND) != 0) {
    PyErr_Clear();
    return false;
  }
  out->held = true;
  out->buf = static_cast<char*>(out->view.buf);
  out->len = out->view.len;
  return true;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // linux/mman.h, Linux >= 5.14
#endif

// The page-table flags of one segment (a bytearray, one byte per chunk: nonzero = populated).
struct Flags {
  Py_buffer view{};
  bool held = false;
};

// Populates the chunks of [offset, offset + size) of the segment at ``base`` not yet marked
// in ``flags`` (GIL released during madvise). False once the kernel refuses the advice with
// EINVAL (it lacks it): the caller stops asking for this call.
bool populate(Flags& flags, uintptr_t base, uint64_t seg_size, uint64_t chunk_bytes,
              uint64_t offset, uint64_t size) {
  if (!flags.held || size == 0 || chunk_bytes == 0) return true;
  char* marks = static_cast<char*>(flags.view.buf);
  const uint64_t num_marks = static_cast<uint64_t>(flags.view.len);
  const uint64_t first = offset / chunk_bytes;
  const uint64_t last = (offset + size - 1) / chunk_bytes;
  if (last >= num_marks) return true;
  bool all_marked = true;
  for (uint64_t c = first; c <= last; ++c) all_marked = all_marked && marks[c] != 0;
  if (all_marked) return true;
  const uint64_t start = first * chunk_bytes;
  const uint64_t end = (last + 1) * chunk_bytes < seg_size ? (last + 1) * chunk_bytes : seg_size;
  int rc, error;
  Py_BEGIN_ALLOW_THREADS
  // NOTE: madvise wants a page-aligned start; the range is widened to whole pages
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t aligned = (base + start) & ~(page - 1);
  rc = madvise(reinterpret_cast<void*>(aligned), base + end - aligned, MADV_POPULATE_WRITE);
  error = errno;
  Py_END_ALLOW_THREADS
  if (rc == 0) {
    memset(marks + first, 1, last + 1 - first);
    return true;
  }
  return error != EINVAL;  // other failures: pages fault in on first touch, as before
}

}  // namespace

PyObject* kvstore_read_ranges(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 14 && nargs != 17) {
    PyErr_SetString(PyExc_TypeError,
                    "read_ranges(dsts, sizes, checksums, starts, counts, replica_segment, "
                    "replica_offset, segment_addresses, segment_sizes, verify, "
                    "empty_checksum, segment_flags, chunk_bytes, tensor_type) takes exactly "
                    "14 arguments (17 with guard_tables, guard_seqs, guard_epochs)");
    return nullptr;
  }
  PyObject* dsts = args[0];
  if (!check_list(dsts, -1, "dsts")) return nullptr;
  const Py_ssize_t num_keys = PyList_GET_SIZE(dsts);
  const char* names[] = {"sizes", "checksums", "starts", "counts"};
  for (int a = 1; a <= 4; ++a) {
    if (!check_list(args[a], num_keys, names[a - 1])) return nullptr;
  }
  if (!check_list(args[5], -1, "replica_segment")) return nullptr;
  const Py_ssize_t num_replicas = PyList_GET_SIZE(args[5]);
  if (!check_list(args[6], num_replicas, "replica_offset")) return nullptr;
  if (!check_list(args[7], -1, "segment_addresses")) return nullptr;
  const Py_ssize_t num_segments = PyList_GET_SIZE(args[7]);
  if (!check_list(args[8], num_segments, "segment_sizes")) return nullptr;
  const int verify = PyObject_IsTrue(args[9]);
  if (verify < 0) return nullptr;
  const uint64_t empty_checksum = PyLong_AsUnsignedLongLong(args[10]);
  if (PyErr_Occurred()) return nullptr;
  if (!check_list(args[11], num_segments, "segment_flags")) return nullptr;
  const uint64_t chunk_bytes = PyLong_AsUnsignedLongLong(args[12]);
  if (PyErr_Occurred()) return nullptr;
  PyObject* const tensor_type = args[13];
  if (tensor_type != Py_None && !PyType_Check(tensor_type)) {
    PyErr_SetString(PyExc_TypeError, "read_ranges: tensor_type must be a type or None");
    return nullptr;
  }

  const bool guarded = nargs == 17;
  if (guarded && (!check_list(args[14], num_segments, "guard_tables") ||
                  !check_list(args[15], num_keys, "guard_seqs") ||
                  !check_list(args[16], num_keys, "guard_epochs"))) {
    return nullptr;
  }
  std::vector<uint64_t> seg_table(static_cast<size_t>(guarded ? num_segments : 0));
  for (Py_ssize_t s = 0; guarded && s < num_segments; ++s) {
    if (!u64_at(args[14], s, &seg_table[s])) return nullptr;
  }
  const uint64_t now_ns = guarded ? loc_now_ns() : 0;
  std::vector<uint64_t> key_seq(static_cast<size_t>(guarded ? num_keys : 0));
  std::vector<uint64_t> key_epoch(static_cast<size_t>(guarded ? num_keys : 0));

  std::vector<uintptr_t> seg_address(static_cast<size_t>(num_segments));
  std::vector<uint64_t> seg_size(static_cast<size_t>(num_segments));
  for (Py_ssize_t s = 0; s < num_segments; ++s) {
    uint64_t address;
    if (!u64_at(args[7], s, &address) || !u64_at(args[8], s, &seg_size[s])) return nullptr;
    seg_address[s] = static_cast<uintptr_t>(address);
  }
  std::vector<Flags> seg_flags(static_cast<size_t>(num_segments));
  bool may_populate = true;

  // -1: slow; otherwise the bytes written
  std::vector<int64_t> written(static_cast<size_t>(num_keys), -1);
  std::vector<Py_buffer> views;
  views.reserve(static_cast<size_t>(num_keys));
  std::vector<Copy> copies;
  copies.reserve(static_cast<size_t>(num_keys));
  uint64_t total_bytes = 0;
  PyObject* result = nullptr;
  PyObject* written_list = nullptr;
  PyObject* slow_list = nullptr;

  for (Py_ssize_t s = 0; s < num_segments; ++s) {
    PyObject* flags = PyList_GET_ITEM(args[11], s);
    if (flags == Py_None) continue;
    if (!PyByteArray_Check(flags)) {
      PyErr_SetString(PyExc_TypeError, "read_ranges: segment_flags holds bytearrays or None");
      goto done;
    }
    if (PyObject_GetBuffer(flags, &seg_flags[s].view, PyBUF_WRITABLE) != 0) goto done;
    seg_flags[s].held = true;
  }
  for (Py_ssize_t i = 0; i < num_keys; ++i) {
    PyObject* dst = PyList_GET_ITEM(dsts, i);
    uint64_t size, expected, start, count;
    if (!u64_at(args[1], i, &size) || !u64_at(args[2], i, &expected) ||
        !u64_at(args[3], i, &start) || !u64_at(args[4], i, &count)) {
      goto done;
    }
    Dst out;
    if (!get_dst(dst, tensor_type, &out)) continue;  // the general path names what is wrong
    if (size == 1 && expected == empty_checksum) {  // an empty value: nothing to read
      out.release();
      written[i] = 0;
      continue;
    }
    if (static_cast<uint64_t>(out.len) < size || start > static_cast<uint64_t>(num_replicas) ||
        count > static_cast<uint64_t>(num_replicas) - start) {
      out.release();
      continue;
    }
    const char* src = nullptr;
    uint64_t* table = nullptr;
    uint64_t src_offset = 0;
    for (uint64_t j = start; j < start + count; ++j) {
      uint64_t segment, offset;
      if (!u64_at(args[5], static_cast<Py_ssize_t>(j), &segment) ||
          !u64_at(args[6], static_cast<Py_ssize_t>(j), &offset)) {
        out.release();
        goto done;
      }
      if (segment >= static_cast<uint64_t>(num_segments)) break;  // malformed: general path
      if (seg_address[segment] == 0) continue;                   // not mapped: next replica
      if (offset > seg_size[segment] || size > seg_size[segment] - offset) break;
      if (guarded) {
        // NOTE: a cached location: served only while its table proves it current (lease,
        // epoch, the slot's sequence unchanged since it was cached); checked again after
        if (!u64_at(args[15], i, &key_seq[i]) || !u64_at(args[16], i, &key_epoch[i])) {
          out.release();
          goto done;
        }
        table = reinterpret_cast<uint64_t*>(seg_table[segment]);
        if (table == nullptr || !loc_valid(table, offset, key_seq[i], key_epoch[i], now_ns)) {
          break;
        }
      }
      src = reinterpret_cast<const char*>(seg_address[segment] + offset);
      src_offset = offset;
      if (may_populate) {
        may_populate = populate(seg_flags[segment], seg_address[segment], seg_size[segment],
                                chunk_bytes, offset, size);
      }
      break;
    }
    if (src == nullptr) {
      out.release();
      continue;
    }
    if (out.held) views.push_back(out.view);
    copies.push_back({out.buf, src, static_cast<size_t>(size), expected, i, table, src_offset});
    total_bytes += size;
  }
  {
    // NOTE: the segments stay mapped for the call: the caller holds their mappings
    PyThreadState* saved = total_bytes >= kvstore_release_gil_min_bytes ? PyEval_SaveThread()
                                                                       : nullptr;
    for (const Copy& copy : copies) {
      if (verify) {
        if (kvstore_copy_hash_fn(copy.dst, copy.src, copy.num_bytes) != copy.expected) continue;
      } else {
        kvstore_copy(copy.dst, copy.src, copy.num_bytes);
      }
      written[copy.key] = static_cast<int64_t>(copy.num_bytes);
    }
    if (guarded) {
      // NOTE: after the copies: a slot changed meanwhile (the daemon applied a removal or a
      // move) voids its key's bytes even when their digest matched
      __atomic_thread_fence(__ATOMIC_ACQUIRE);
      for (const Copy& copy : copies) {
        if (written[copy.key] >= 0 && (copy.table == nullptr ||
            !loc_valid(copy.table, copy.offset, key_seq[copy.key], key_epoch[copy.key], now_ns))) {
          written[copy.key] = -1;
        }
      }
    }
    if (saved != nullptr) PyEval_RestoreThread(saved);
  }
  written_list = PyList_New(num_keys);
  slow_list = PyList_New(0);
  if (written_list == nullptr || slow_list == nullptr) goto done;
  for (Py_ssize_t i = 0; i < num_keys; ++i) {
    PyObject* value;
    if (written[i] >= 0) {
      value = PyLong_FromLongLong(written[i]);
    } else {
      value = Py_None;
      Py_INCREF(value);
      PyObject* index = PyLong_FromSsize_t(i);
      if (index == nullptr || PyList_Append(slow_list, index) != 0) {
        Py_XDECREF(index);
        Py_DECREF(value);
        goto done;
      }
      Py_DECREF(index);
    }
    if (value == nullptr) goto done;
    PyList_SET_ITEM(written_list, i, value);
  }
  result = PyTuple_Pack(2, written_list, slow_list);
done:
  Py_XDECREF(written_list);
  Py_XDECREF(slow_list);
  for (Py_buffer& view : views) PyBuffer_Release(&view);
  for (Flags& flags : seg_flags) {
    if (flags.held) PyBuffer_Release(&flags.view);
  }
  return result;
}
