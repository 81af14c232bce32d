// kvstore._copy_hash's shm location table calls (the layout: shm_locations.h). The daemon
// (kvstore/daemon/shm_locations.py) is the only writer of a table, under its object table's
// lock; clients only read. NOTE: in C, not struct.pack_into: a seqlock needs whole-word
// stores in order (release) and loads that see them so (acquire); a Python struct write of a
// word is a byte loop.
#include "shm_locations.h"

#include <string.h>

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
