// encode_get_replicas: the GetReplicasResponse of the common batch (every key found, one
// replica each) written in wire form from the reply's columns, for the fast path
// (kvstore/master/replies.py ``ReplyEncoder.get_replicas_wire``).
//
// Why: building the protobuf message from the columns (the constructor, the per-field
// extends, merging the cached tables, serializing) was 6 of a one-key GetReplicas' 9.4 us in
// process (bench/RESULTS.md, "Master fast path in wire form"); here it is one pass over the
// columns.
//
// Output: the bytes protobuf writes for the same message: fields in number order, repeated
// integers packed (statuses all ITEM_OK = 0, replica_start 0..n-1, replica_count all 1),
// then ``tables`` (fields 9 and 10, already in wire form), then lease_expires_in_s (11) and
// lease_id (13) unless zero, as proto3 omits zero scalars.
//
// Errors: TypeError or ValueError (nothing returned) if a column is not a sequence of n
// ints in range (n = len(sizes) >= 1), or a value does not fit its field.
#include "keyindex.h"

#include <algorithm>

// NOTE: protobuf's double is little-endian; this file copies the host's bytes
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "a little-endian host");

namespace kvstore_keyindex {

namespace {

inline void put_varint(std::string& out, uint64_t value) {
  while (value > 0x7F) {
    out.push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

inline size_t varint_size(uint64_t value) {
  size_t size = 1;
  while (value > 0x7F) {
    value >>= 7;
    ++size;
  }
  return size;
}

// Appends field ``number`` packed from ``values``.
void put_packed(std::string& out, uint32_t number, const std::vector<uint64_t>& values) {
  size_t num_bytes = 0;
  for (uint64_t v : values) num_bytes += varint_size(v);
  put_varint(out, static_cast<uint64_t>(number) << 3 | 2);
  put_varint(out, num_bytes);
  for (uint64_t v : values) put_varint(out, v);
}

// The n ints of ``column`` (at most ``max_value`` each); false with a Python error.
bool read_column(PyObject* column, size_t n, uint64_t max_value, const char* name,
                 std::vector<uint64_t>& out) {
  PyObject* seq = PySequence_Fast(column, "reply columns must be sequences of int");
  if (seq == nullptr) return false;
  if (static_cast<size_t>(PySequence_Fast_GET_SIZE(seq)) != n) {
    PyErr_Format(PyExc_ValueError, "column %s has %zd values, expected %zu", name,
                 PySequence_Fast_GET_SIZE(seq), n);
    Py_DECREF(seq);
    return false;
  }
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.resize(n);
  for (size_t k = 0; k < n; ++k) {
    unsigned long long value = PyLong_AsUnsignedLongLong(items[k]);
    if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      Py_DECREF(seq);
      return false;
    }
    if (value > max_value) {
      PyErr_Format(PyExc_ValueError, "column %s: %llu does not fit its field", name, value);
      Py_DECREF(seq);
      return false;
    }
    out[k] = value;
  }
  Py_DECREF(seq);
  return true;
}

}  // namespace

PyObject* encode_get_replicas(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_SetString(PyExc_TypeError,
                    "encode_get_replicas(sizes, checksums, codecs, segments, offsets, tables, "
                    "lease_expires_in_s, lease_id) takes 8 arguments");
    return nullptr;
  }
  Py_ssize_t n_signed = PyObject_Length(args[0]);
  if (n_signed < 0) return nullptr;
  if (n_signed == 0) {
    PyErr_SetString(PyExc_ValueError, "encode_get_replicas needs at least one key");
    return nullptr;
  }
  size_t n = static_cast<size_t>(n_signed);
  constexpr uint64_t kU64 = ~0ull, kU32 = 0xFFFFFFFFull;
  std::vector<uint64_t> sizes, checksums, codecs, segments, offsets;
  if (!read_column(args[0], n, kU64, "sizes", sizes) ||
      !read_column(args[1], n, kU64, "checksums", checksums) ||
      !read_column(args[2], n, kU32, "codecs", codecs) ||
      !read_column(args[3], n, kU32, "segments", segments) ||
      !read_column(args[4], n, kU64, "offsets", offsets))
    return nullptr;
  Py_buffer tables;
  if (PyObject_GetBuffer(args[5], &tables, PyBUF_SIMPLE) < 0) return nullptr;
  double lease_expires_in_s = PyFloat_AsDouble(args[6]);
  unsigned long long lease_id = PyLong_AsUnsignedLongLong(args[7]);
  if (PyErr_Occurred()) {
    PyBuffer_Release(&tables);
    return nullptr;
  }
  std::string out;
  try {
    out.reserve(n * 32 + static_cast<size_t>(tables.len) + 64);
    std::vector<uint64_t> column(n, 0);
    put_packed(out, 1, column);                       // statuses: ITEM_OK
    put_packed(out, 2, sizes);
    put_packed(out, 3, checksums);
    put_packed(out, 4, codecs);
    for (size_t k = 0; k < n; ++k) column[k] = k;
    put_packed(out, 5, column);                       // replica_start
    std::fill(column.begin(), column.end(), 1);
    put_packed(out, 6, column);                       // replica_count
    put_packed(out, 7, segments);
    put_packed(out, 8, offsets);
    out.append(static_cast<const char*>(tables.buf), static_cast<size_t>(tables.len));
    if (lease_expires_in_s != 0.0) {
      out.push_back(static_cast<char>(11 << 3 | 1));
      char bytes[8];
      std::memcpy(bytes, &lease_expires_in_s, 8);     // little-endian, as on every target
      out.append(bytes, 8);
    }
    if (lease_id != 0) {
      out.push_back(static_cast<char>(13 << 3));
      put_varint(out, lease_id);
    }
  } catch (const std::bad_alloc&) {
    PyBuffer_Release(&tables);
    return PyErr_NoMemory();
  }
  PyBuffer_Release(&tables);
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

}  // namespace kvstore_keyindex
