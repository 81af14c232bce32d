// The master's key index: the table's layout and the lookup helpers shared by its two
// translation units (keyindex.cpp: the KeyIndex type; keybatch.cpp: KeyBatch, a request's
// keys decoded from protobuf wire form, and the lookups that take one).
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kvstore_keyindex {

struct Slot {
  Py_hash_t hash;
  PyObject* key;    // nullptr: empty
  PyObject* value;
};

struct KeyIndex {
  PyObject_HEAD
  Slot* slots;
  size_t mask;      // capacity - 1
  size_t size;
  // ``follow``: values of exactly this class have an object slot at this byte offset whose
  // object get_many prefetches, with a tuple's items (nullptr: follow nothing)
  PyTypeObject* follow_type;
  Py_ssize_t follow_offset;
};

constexpr size_t kMinCapacity = 64;

inline bool same_text(PyObject* a, PyObject* b) {
  if (a == b) return true;
  Py_ssize_t len = PyUnicode_GET_LENGTH(a);
  if (len != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b)) return false;
  return std::memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b),
                     static_cast<size_t>(len) * PyUnicode_KIND(a)) == 0;
}

// Index of the slot holding ``key`` or of the empty slot ending its run.
inline size_t find_slot(const KeyIndex* self, PyObject* key, Py_hash_t hash) {
  // NOTE: self->slots is never null here: every method re-creates a table cleared by the GC
  // (ensure_table) before looking anything up
  size_t i = static_cast<size_t>(hash) & self->mask;
  while (true) {
    const Slot& s = self->slots[i];
    if (s.key == nullptr) return i;
    if (s.hash == hash && same_text(s.key, key)) return i;
    i = (i + 1) & self->mask;
  }
}

inline bool check_key(PyObject* key) {
  if (!PyUnicode_CheckExact(key)) {
    PyErr_Format(PyExc_TypeError, "keys must be str, got %.100s", Py_TYPE(key)->tp_name);
    return false;
  }
  return true;
}

// Index of the slot holding the ASCII text ``data[0:len]`` (hash ``hash``, the str hash of
// that text) or of the empty slot ending its run. Only a compact ASCII str can equal it.
inline size_t find_slot_ascii(const KeyIndex* self, const char* data, Py_ssize_t len,
                              Py_hash_t hash) {
  size_t i = static_cast<size_t>(hash) & self->mask;
  while (true) {
    const Slot& s = self->slots[i];
    if (s.key == nullptr) return i;
    if (s.hash == hash && PyUnicode_IS_COMPACT_ASCII(s.key) &&
        PyUnicode_GET_LENGTH(s.key) == len &&
        std::memcmp(PyUnicode_DATA(s.key), data, static_cast<size_t>(len)) == 0)
      return i;
    i = (i + 1) & self->mask;
  }
}

bool ensure_table(KeyIndex* self);
void prefetch_followed(const KeyIndex* self, const std::vector<PyObject*>& values);

// KeyBatch (keybatch.cpp): the keys (field 1) and epoch (field 120) of an ExistsRequest or
// GetReplicasRequest, parsed from wire form, every key ASCII, with its str hash.
struct KeyBatch {
  PyObject_HEAD
  std::string* text;             // every key's bytes, one after another
  std::vector<size_t>* ends;     // end offset of key i in text
  std::vector<Py_hash_t>* hashes;
  unsigned long long epoch;
  unsigned long long lease_ttl_ms;   // field 2 of GetReplicasRequest
  PyObject* client_host_id;          // field 3 of GetReplicasRequest (str)
  char shm_reads;                    // field 160 of GetReplicasRequest
};

extern PyTypeObject* KeyBatch_type;
int add_keybatch(PyObject* module);
PyObject* KeyIndex_contains_batch(KeyIndex* self, PyObject* batch);
PyObject* KeyIndex_get_batch(KeyIndex* self, PyObject* batch);
// replywire.cpp: GetReplicasResponse of the common batch in wire form (module function)
PyObject* encode_get_replicas(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace kvstore_keyindex
