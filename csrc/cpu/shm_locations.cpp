// kvstore._copy_hash's shm location table calls (the layout: shm_locations.h). The daemon
// (kvstore/daemon/shm_locations.py) is the only writer of a table, under its object table's
// lock; clients only read. NOTE: in C, not struct.pack_into: a seqlock needs whole-word
// stores in order (release) and loads that see them so (acquire); a Python struct write of a
// word is a byte loop.
#include "shm_locations.h"

#include <string.h>

#include <vector>

#define XXH_INLINE_ALL
#include "xxhash.h"

namespace {

bool u64_args(const char* name, PyObject* const* args, Py_ssize_t nargs, Py_ssize_t expected,
              uint64_t* out) {
  if (nargs != expected) {
    PyErr_Format(PyExc_TypeError, "%s takes exactly %zd arguments", name, expected);
    return false;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    out[i] = PyLong_AsUnsignedLongLong(args[i]);
    if (out[i] == static_cast<uint64_t>(-1) && PyErr_Occurred()) return false;
  }
  if (out[0] == 0) {
    PyErr_Format(PyExc_ValueError, "%s: no table", name);
    return false;
  }
  return true;
}

void store(uint64_t* word, uint64_t value) { __atomic_store_n(word, value, __ATOMIC_RELEASE); }

// The slot's words rewritten as one seqlock change (single writer).
void rewrite(uint64_t* slot, uint64_t epoch, uint64_t key_hash, uint64_t offset,
             uint64_t length, uint64_t checksum) {
  const uint64_t seq = __atomic_load_n(slot + kSlotSeq, __ATOMIC_RELAXED);
  store(slot + kSlotSeq, seq | 1);  // odd: changing (from even; odd stays odd)
  __atomic_thread_fence(__ATOMIC_RELEASE);
  store(slot + kSlotEpoch, epoch);
  store(slot + kSlotKey, key_hash);
  store(slot + kSlotOffset, offset);
  store(slot + kSlotLength, length);
  store(slot + kSlotChecksum, checksum);
  store(slot + kSlotSeq, (seq | 1) + 1);
}

}  // namespace

// loc_publish(table, offset, epoch, key_hash, length, checksum): the object at ``offset``
// now owns its slot.
PyObject* kvstore_loc_publish(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  uint64_t a[6];
  if (!u64_args("loc_publish", args, nargs, 6, a)) return nullptr;
  uint64_t* table = reinterpret_cast<uint64_t*>(a[0]);
  uint64_t* slot = loc_slot_words(table, loc_slot(a[1], table[kHdrSlots]));
  rewrite(slot, a[2], a[3], a[1], a[4], a[5]);
  Py_RETURN_NONE;
}

// loc_publish_many(table, epoch, keys, offsets, lengths, checksums): loc_publish of each
// object (parallel lists; the key's hash is XXH3-64 of its UTF-8, as _loc_table.key_hash).
// NOTE: one call per change set or ring record instead of one per key, and the key hash in
// C (issue 10, 10d2). Every argument is checked before any slot is written.
PyObject* kvstore_loc_publish_many(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError, "loc_publish_many takes exactly 6 arguments");
    return nullptr;
  }
  uint64_t a[2];
  for (int i = 0; i < 2; ++i) {
    a[i] = PyLong_AsUnsignedLongLong(args[i]);
    if (a[i] == static_cast<uint64_t>(-1) && PyErr_Occurred()) return nullptr;
  }
  if (a[0] == 0) {
    PyErr_SetString(PyExc_ValueError, "loc_publish_many: no table");
    return nullptr;
  }
  PyObject* lists[4] = {args[2], args[3], args[4], args[5]};
  for (PyObject* list : lists) {
    if (!PyList_Check(list)) {
      PyErr_SetString(PyExc_TypeError, "loc_publish_many: keys, offsets, lengths and "
                                       "checksums must be lists");
      return nullptr;
    }
  }
  const Py_ssize_t count = PyList_GET_SIZE(lists[0]);
  for (PyObject* list : lists) {
    if (PyList_GET_SIZE(list) != count) {
      PyErr_SetString(PyExc_ValueError, "loc_publish_many: lists of different lengths");
      return nullptr;
    }
  }
  std::vector<uint64_t> words(4 * static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    Py_ssize_t size;
    const char* utf8 = PyUnicode_Check(PyList_GET_ITEM(lists[0], i))
                           ? PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(lists[0], i), &size)
                           : nullptr;
    if (utf8 == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "loc_publish_many: a key is no str");
      return nullptr;
    }
    words[4 * i] = XXH3_64bits(utf8, static_cast<size_t>(size));
    for (int j = 1; j < 4; ++j) {
      uint64_t value = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(lists[j], i));
      if (value == static_cast<uint64_t>(-1) && PyErr_Occurred()) return nullptr;
      words[4 * i + j] = value;
    }
  }
  uint64_t* table = reinterpret_cast<uint64_t*>(a[0]);
  const uint64_t num_slots = table[kHdrSlots];
  for (Py_ssize_t i = 0; i < count; ++i) {
    const uint64_t* w = &words[4 * i];
    rewrite(loc_slot_words(table, loc_slot(w[1], num_slots)), a[1], w[0], w[1], w[2], w[3]);
  }
  Py_RETURN_NONE;
}

// loc_prefault(table, num_bytes): write a zero into every page of the (new, zero) table, so
// no publish takes a page fault. NOTE: a first touch of a tmpfs page was most of a publish
// (loc_publish 20-30% of a ring drain in the profile of 10d2); at creation it is ~1 ms per
// 4 MiB of table, before the table's magic is set (no reader looks yet).
PyObject* kvstore_loc_prefault(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  uint64_t a[2];
  if (!u64_args("loc_prefault", args, nargs, 2, a)) return nullptr;
  volatile char* bytes = reinterpret_cast<volatile char*>(a[0]);
  Py_BEGIN_ALLOW_THREADS
  for (uint64_t at = 0; at < a[1]; at += 4096) bytes[at] = 0;
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// loc_clear(table, offset): the object at ``offset`` is gone; its slot is emptied if it
// still owns it (else another object does, and keeps it).
PyObject* kvstore_loc_clear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  uint64_t a[2];
  if (!u64_args("loc_clear", args, nargs, 2, a)) return nullptr;
  uint64_t* table = reinterpret_cast<uint64_t*>(a[0]);
  uint64_t* slot = loc_slot_words(table, loc_slot(a[1], table[kHdrSlots]));
  if (slot[kSlotOffset] == a[1] && slot[kSlotLength] != 0) rewrite(slot, 0, 0, 0, 0, 0);
  Py_RETURN_NONE;
}

// loc_set(table, word, value): header word ``word`` (epoch 1, lease 2, ...) set to ``value``.
PyObject* kvstore_loc_set(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  uint64_t a[3];
  if (!u64_args("loc_set", args, nargs, 3, a)) return nullptr;
  if (a[1] >= kLocHeaderWords) {
    PyErr_SetString(PyExc_ValueError, "loc_set: no such header word");
    return nullptr;
  }
  store(reinterpret_cast<uint64_t*>(a[0]) + a[1], a[2]);
  Py_RETURN_NONE;
}

// loc_read(table, offset) -> (seq, epoch, key_hash, length, checksum, table_epoch,
// lease_until_ns), a consistent read of the slot of ``offset`` while it holds that offset;
// None when it holds another object, none, or is changing.
PyObject* kvstore_loc_read(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  uint64_t a[2];
  if (!u64_args("loc_read", args, nargs, 2, a)) return nullptr;
  uint64_t* table = reinterpret_cast<uint64_t*>(a[0]);
  const uint64_t num_slots = loc_load(table + kHdrSlots);
  if (loc_load(table + kHdrMagic) != kLocMagic || num_slots == 0) Py_RETURN_NONE;
  uint64_t* slot = loc_slot_words(table, loc_slot(a[1], num_slots));
  const uint64_t seq = loc_load(slot + kSlotSeq);
  if ((seq & 1) != 0) Py_RETURN_NONE;
  const uint64_t epoch = loc_load(slot + kSlotEpoch), key = loc_load(slot + kSlotKey);
  const uint64_t offset = loc_load(slot + kSlotOffset), length = loc_load(slot + kSlotLength);
  const uint64_t checksum = loc_load(slot + kSlotChecksum);
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
  if (loc_load(slot + kSlotSeq) != seq || offset != a[1] || length == 0) Py_RETURN_NONE;
  return Py_BuildValue("(KKKKKKK)", static_cast<unsigned long long>(seq),
                       static_cast<unsigned long long>(epoch),
                       static_cast<unsigned long long>(key),
                       static_cast<unsigned long long>(length),
                       static_cast<unsigned long long>(checksum),
                       static_cast<unsigned long long>(loc_load(table + kHdrEpoch)),
                       static_cast<unsigned long long>(loc_load(table + kHdrLease)));
}

// loc_vouch(keys, written, sizes, checksums, starts, counts, replica_segment, replica_offset,
// segment_addresses, table_addresses, segments, entry_type) -> [(key, entry), ...]: for each
// key read_ranges served (written[i] a positive int), the replica it read (the first in a
// mapped segment, as read_ranges picks) when its segment's table vouches for it now: the
// slot read consistently names this key's hash, that offset, size and checksum, in the
// table's epoch, and the lease runs. entry: an ``entry_type`` (a 6-field tuple subclass,
// client/shm_locations.py CachedShm) of (segments[segment], offset, size, checksum, seq,
// epoch). The batch form of client/shm_locations.py entry_for. NOTE: the entries are made
// here (tp_alloc, as tuple's own subtype constructor does): a NamedTuple's Python __new__
// per key cost more than the slot checks of the whole batch.
PyObject* kvstore_loc_vouch(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 12) {
    PyErr_SetString(PyExc_TypeError, "loc_vouch takes exactly 12 arguments");
    return nullptr;
  }
  if (!PyType_Check(args[11]) ||
      !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(args[11]), &PyTuple_Type)) {
    PyErr_SetString(PyExc_TypeError, "loc_vouch: entry_type must be a tuple subclass");
    return nullptr;
  }
  PyTypeObject* const entry_type = reinterpret_cast<PyTypeObject*>(args[11]);
  for (Py_ssize_t a = 0; a < 11; ++a) {
    if (!PyList_Check(args[a])) {
      PyErr_SetString(PyExc_TypeError, "loc_vouch: every argument must be a list");
      return nullptr;
    }
  }
  const Py_ssize_t num_keys = PyList_GET_SIZE(args[0]);
  const Py_ssize_t num_replicas = PyList_GET_SIZE(args[6]);
  const Py_ssize_t num_segments = PyList_GET_SIZE(args[8]);
  for (Py_ssize_t a = 1; a <= 5; ++a) {
    if (PyList_GET_SIZE(args[a]) != num_keys) {
      PyErr_SetString(PyExc_ValueError, "loc_vouch: the per-key lists differ in length");
      return nullptr;
    }
  }
  if (PyList_GET_SIZE(args[7]) != num_replicas || PyList_GET_SIZE(args[9]) != num_segments ||
      PyList_GET_SIZE(args[10]) != num_segments) {
    PyErr_SetString(PyExc_ValueError, "loc_vouch: the per-replica or per-segment lists differ");
    return nullptr;
  }
  const uint64_t now_ns = loc_now_ns();
  PyObject* result = PyList_New(0);
  if (result == nullptr) return nullptr;
  auto u64 = [](PyObject* list, Py_ssize_t i, uint64_t* out) {
    *out = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list, i));
    return !(*out == static_cast<uint64_t>(-1) && PyErr_Occurred());
  };
  for (Py_ssize_t i = 0; i < num_keys; ++i) {
    PyObject* done = PyList_GET_ITEM(args[1], i);
    if (!PyLong_Check(done) || PyLong_AsLongLong(done) <= 0) continue;
    uint64_t size, checksum, start, count;
    if (!u64(args[2], i, &size) || !u64(args[3], i, &checksum) || !u64(args[4], i, &start) ||
        !u64(args[5], i, &count)) {
      Py_DECREF(result);
      return nullptr;
    }
    if (start > static_cast<uint64_t>(num_replicas) ||
        count > static_cast<uint64_t>(num_replicas) - start) {
      continue;
    }
    for (uint64_t j = start; j < start + count; ++j) {
      uint64_t segment, offset, address, table_address;
      if (!u64(args[6], static_cast<Py_ssize_t>(j), &segment) ||
          !u64(args[7], static_cast<Py_ssize_t>(j), &offset)) {
        Py_DECREF(result);
        return nullptr;
      }
      if (segment >= static_cast<uint64_t>(num_segments)) break;
      if (!u64(args[8], static_cast<Py_ssize_t>(segment), &address) ||
          !u64(args[9], static_cast<Py_ssize_t>(segment), &table_address)) {
        Py_DECREF(result);
        return nullptr;
      }
      if (address == 0) continue;        // not mapped: read_ranges tried the next replica
      if (table_address == 0) break;     // the replica read has no table
      uint64_t* table = reinterpret_cast<uint64_t*>(table_address);
      const uint64_t num_slots = loc_load(table + kHdrSlots);
      if (loc_load(table + kHdrMagic) != kLocMagic || num_slots == 0 ||
          loc_load(table + kHdrLease) <= now_ns) {
        break;
      }
      uint64_t* slot = loc_slot_words(table, loc_slot(offset, num_slots));
      const uint64_t seq = loc_load(slot + kSlotSeq);
      const uint64_t epoch = loc_load(slot + kSlotEpoch), key = loc_load(slot + kSlotKey);
      const uint64_t slot_offset = loc_load(slot + kSlotOffset);
      const uint64_t length = loc_load(slot + kSlotLength);
      const uint64_t slot_checksum = loc_load(slot + kSlotChecksum);
      __atomic_thread_fence(__ATOMIC_ACQUIRE);
      if ((seq & 1) != 0 || loc_load(slot + kSlotSeq) != seq || slot_offset != offset ||
          length != size || slot_checksum != checksum || epoch != loc_load(table + kHdrEpoch)) {
        break;
      }
      Py_ssize_t key_len = 0;
      const char* key_bytes = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(args[0], i), &key_len);
      if (key_bytes == nullptr) {
        Py_DECREF(result);
        return nullptr;
      }
      if (XXH3_64bits(key_bytes, static_cast<size_t>(key_len)) != key) break;
      PyObject* entry = entry_type->tp_alloc(entry_type, 6);
      if (entry == nullptr) {
        Py_DECREF(result);
        return nullptr;
      }
      PyObject* segment_target = PyList_GET_ITEM(args[10], static_cast<Py_ssize_t>(segment));
      Py_INCREF(segment_target);
      PyTuple_SET_ITEM(entry, 0, segment_target);
      const uint64_t fields[5] = {offset, size, checksum, seq, epoch};
      for (int f = 0; f < 5; ++f) {
        PyObject* value = PyLong_FromUnsignedLongLong(fields[f]);
        if (value == nullptr) {
          Py_DECREF(entry);
          Py_DECREF(result);
          return nullptr;
        }
        PyTuple_SET_ITEM(entry, f + 1, value);
      }
      PyObject* item = PyTuple_Pack(2, PyList_GET_ITEM(args[0], i), entry);
      Py_DECREF(entry);
      if (item == nullptr || PyList_Append(result, item) != 0) {
        Py_XDECREF(item);
        Py_DECREF(result);
        return nullptr;
      }
      Py_DECREF(item);
      break;
    }
  }
  return result;
}
