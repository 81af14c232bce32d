// The shm location table (kvstore/daemon/shm_locations.py writes it, the client reads it):
// one per DRAM segment, in POSIX shared memory beside it, so a same-host client can prove
// that a range it cached still holds the key's current value without asking the master.
//
// Layout (native 64-bit words): a 64-byte header, then kLocSlots... slots of 6 words.
//   header: magic, epoch (bumped on a full resync: every slot of an older epoch is void),
//           lease_until_ns (CLOCK_MONOTONIC; 0: no lease), num_slots, creator pid, 0, 0, 0
//   slot:   seq (seqlock: odd while the slot changes, bumped twice per change), epoch,
//           key_hash (XXH3-64 of the key's UTF-8), offset, length, checksum
// The slot of an object is a hash of its offset (loc_slot); two live objects whose offsets
// share a slot: the later one owns it (the earlier one's cached entries see a new seq).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <time.h>

constexpr uint64_t kLocMagic = 0x31544c434f4c564bull;  // "KVLOCLT1"
constexpr uint64_t kLocHeaderWords = 8;
constexpr uint64_t kLocSlotWords = 6;
enum : uint64_t { kHdrMagic = 0, kHdrEpoch = 1, kHdrLease = 2, kHdrSlots = 3, kHdrPid = 4 };
enum : uint64_t { kSlotSeq = 0, kSlotEpoch = 1, kSlotKey = 2, kSlotOffset = 3,
                  kSlotLength = 4, kSlotChecksum = 5 };

inline uint64_t loc_slot(uint64_t offset, uint64_t num_slots) {
  return ((offset >> 6) * 0x9E3779B97F4A7C15ull >> 17) % num_slots;
}

inline uint64_t* loc_slot_words(uint64_t* table, uint64_t slot) {
  return table + kLocHeaderWords + slot * kLocSlotWords;
}

inline uint64_t loc_load(const uint64_t* word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }

inline uint64_t loc_now_ns() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<uint64_t>(now.tv_sec) * 1000000000ull + static_cast<uint64_t>(now.tv_nsec);
}

// True while the table's lease runs and its epoch is ``epoch`` and the slot of ``offset``
// holds sequence ``seq`` (even: not changing).
inline bool loc_valid(uint64_t* table, uint64_t offset, uint64_t seq, uint64_t epoch,
                      uint64_t now_ns) {
  if (loc_load(table + kHdrMagic) != kLocMagic) return false;
  if (loc_load(table + kHdrLease) <= now_ns || loc_load(table + kHdrEpoch) != epoch) return false;
  const uint64_t num_slots = loc_load(table + kHdrSlots);
  if (num_slots == 0 || (seq & 1) != 0) return false;
  return loc_load(loc_slot_words(table, loc_slot(offset, num_slots)) + kSlotSeq) == seq;
}

PyObject* kvstore_loc_publish(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* kvstore_loc_publish_many(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* kvstore_loc_prefault(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* kvstore_loc_clear(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* kvstore_loc_read(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* kvstore_loc_vouch(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* kvstore_loc_set(PyObject*, PyObject* const* args, Py_ssize_t nargs);
