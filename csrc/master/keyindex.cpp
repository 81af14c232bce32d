// kvstore._keyindex: the master's key index, a hash table from key (str) to a Python object,
// with batch lookups that overlap their cache misses.
//
// Why: a batch of 1,024 lookups into a table of 200,000 keys is bound by memory latency, not
// by computation: a dict lookup of a key the table has not seen recently misses the cache
// three times (index, entry, stored key) one after the other, ~1 us a key on the shared build
// VM (bench/RESULTS.md, "Master key index"). Here a batch first hashes every key and
// prefetches its slot, then prefetches each slot's stored key and value, then compares: the
// misses of different keys are in flight together. get_many then prefetches each found
// value's object and, with ``follow`` (a member descriptor, Class.slot, of the values'
// class), the object in that slot and a tuple's items: the encoder's next reads.
//
// Table: open addressing, linear probing, power-of-two capacity, at most half full; a slot
// is (hash, key, value) with strong references to key and value; removal shifts the run back
// (no tombstones). Keys are exact str objects; equal keys are found by length, kind and
// memcmp (CPython strs are canonical, so equal text means equal kind).
//
// Guarantees: every method takes and returns ordinary Python objects and never leaves a
// reference behind on error; a non-str key raises TypeError. Not thread-safe (the master's
// state is used under the service lock).
#include "keyindex.h"

#include <structmember.h>

namespace kvstore_keyindex {

bool resize(KeyIndex* self, size_t capacity) {
  Slot* fresh = static_cast<Slot*>(PyMem_Calloc(capacity, sizeof(Slot)));
  if (fresh == nullptr) {
    PyErr_NoMemory();
    return false;
  }
  Slot* old = self->slots;
  size_t old_capacity = old ? self->mask + 1 : 0;
  self->slots = fresh;
  self->mask = capacity - 1;
  for (size_t j = 0; j < old_capacity; ++j) {
    if (old[j].key == nullptr) continue;
    size_t i = static_cast<size_t>(old[j].hash) & self->mask;
    while (fresh[i].key != nullptr) i = (i + 1) & self->mask;
    fresh[i] = old[j];
  }
  PyMem_Free(old);
  return true;
}

void clear_slots(KeyIndex* self) {
  if (self->slots == nullptr) return;
  Slot* slots = self->slots;
  size_t capacity = self->mask + 1;
  self->slots = nullptr;
  self->size = 0;
  self->mask = 0;
  for (size_t j = 0; j < capacity; ++j) {
    Py_XDECREF(slots[j].key);
    Py_XDECREF(slots[j].value);
  }
  PyMem_Free(slots);
}

// A table the GC cleared (tp_clear, while breaking a cycle) is empty: give it slots again.
bool ensure_table(KeyIndex* self) {
  return self->slots != nullptr || resize(self, kMinCapacity);
}

PyObject* KeyIndex_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"follow", nullptr};
  PyObject* follow = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:KeyIndex", const_cast<char**>(kwlist),
                                   &follow))
    return nullptr;
  PyTypeObject* follow_type = nullptr;
  Py_ssize_t follow_offset = 0;
  if (follow != Py_None) {
    const PyMemberDef* member = nullptr;
    if (PyObject_TypeCheck(follow, &PyMemberDescr_Type))
      member = reinterpret_cast<PyMemberDescrObject*>(follow)->d_member;
    if (member == nullptr || (member->type != T_OBJECT_EX && member->type != T_OBJECT)) {
      PyErr_SetString(PyExc_TypeError,
                      "follow must be an object slot of the values' class (Class.attribute "
                      "of a class with __slots__)");
      return nullptr;
    }
    follow_type = PyDescr_TYPE(follow);
    follow_offset = member->offset;
  }
  KeyIndex* self = reinterpret_cast<KeyIndex*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  Py_XINCREF(follow_type);
  self->follow_type = follow_type;
  self->follow_offset = follow_offset;
  if (!resize(self, kMinCapacity)) {
    Py_DECREF(self);
    return nullptr;
  }
  return reinterpret_cast<PyObject*>(self);
}

int KeyIndex_traverse(KeyIndex* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(self->follow_type);
  if (self->slots == nullptr) return 0;
  for (size_t j = 0; j <= self->mask; ++j) {
    Py_VISIT(self->slots[j].key);
    Py_VISIT(self->slots[j].value);
  }
  return 0;
}

int KeyIndex_tp_clear(KeyIndex* self) {
  clear_slots(self);
  Py_CLEAR(self->follow_type);
  return 0;
}

void KeyIndex_dealloc(KeyIndex* self) {
  PyTypeObject* type = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  clear_slots(self);
  Py_CLEAR(self->follow_type);
  type->tp_free(reinterpret_cast<PyObject*>(self));
  Py_DECREF(type);   // a heap type: each instance holds a reference to it
}

PyObject* KeyIndex_set(KeyIndex* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!ensure_table(self)) return nullptr;
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "set(key, value) takes 2 arguments");
    return nullptr;
  }
  PyObject* key = args[0];
  PyObject* value = args[1];
  if (!check_key(key)) return nullptr;
  Py_hash_t hash = PyObject_Hash(key);
  if (hash == -1) return nullptr;
  if (2 * (self->size + 1) > self->mask + 1 && !resize(self, 2 * (self->mask + 1)))
    return nullptr;
  Slot& s = self->slots[find_slot(self, key, hash)];
  Py_INCREF(value);
  if (s.key == nullptr) {
    Py_INCREF(key);
    s.hash = hash;
    s.key = key;
    s.value = value;
    ++self->size;
  } else {
    PyObject* old = s.value;
    s.value = value;
    Py_DECREF(old);
  }
  Py_RETURN_NONE;
}

PyObject* KeyIndex_discard(KeyIndex* self, PyObject* key);

// store(mapping, key, value): set() here and mapping[key] = value in the dict ``mapping``
// (the dict's own slot: a subclass's __setitem__ is not called), in one C call.
PyObject* KeyIndex_store(KeyIndex* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyDict_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "store(mapping, key, value): mapping must be a dict");
    return nullptr;
  }
  PyObject* done = KeyIndex_set(self, args + 1, 2);
  if (done == nullptr) return nullptr;
  Py_DECREF(done);
  if (PyDict_SetItem(args[0], args[1], args[2]) < 0) {
    // NOTE: out of memory: put the index back to what the dict holds for the key
    PyObject* error_type;
    PyObject* error_value;
    PyObject* error_traceback;
    PyErr_Fetch(&error_type, &error_value, &error_traceback);
    PyObject* held = PyDict_GetItemWithError(args[0], args[1]);
    PyObject* undo[2] = {args[1], held};
    PyObject* undone = held != nullptr ? KeyIndex_set(self, undo, 2)
                                       : KeyIndex_discard(self, args[1]);
    Py_XDECREF(undone);
    PyErr_Restore(error_type, error_value, error_traceback);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* KeyIndex_discard(KeyIndex* self, PyObject* key) {
  if (!ensure_table(self)) return nullptr;
  if (!check_key(key)) return nullptr;
  Py_hash_t hash = PyObject_Hash(key);
  if (hash == -1) return nullptr;
  size_t i = find_slot(self, key, hash);
  if (self->slots[i].key == nullptr) Py_RETURN_FALSE;
  PyObject* old_key = self->slots[i].key;
  PyObject* old_value = self->slots[i].value;
  // backward-shift deletion: move later members of the run into the hole where allowed
  size_t hole = i;
  size_t j = i;
  while (true) {
    j = (j + 1) & self->mask;
    Slot& s = self->slots[j];
    if (s.key == nullptr) break;
    size_t home = static_cast<size_t>(s.hash) & self->mask;
    // s may move to the hole if its home is not in (hole, j] (cyclically)
    bool stays = (hole <= j) ? (hole < home && home <= j) : (hole < home || home <= j);
    if (stays) continue;
    self->slots[hole] = s;
    hole = j;
  }
  self->slots[hole].key = nullptr;
  self->slots[hole].value = nullptr;
  self->slots[hole].hash = 0;
  --self->size;
  Py_DECREF(old_key);
  Py_DECREF(old_value);
  Py_RETURN_TRUE;
}

PyObject* KeyIndex_clear(KeyIndex* self, PyObject*) {
  clear_slots(self);
  if (!ensure_table(self)) return nullptr;
  Py_RETURN_NONE;
}

// Looks every key of ``keys`` up; calls emit(i, slot or nullptr) in order. False (with the
// Python error set) on a non-sequence or a non-str key. With ``prefetch_values``, also
// prefetches each found value's object (its caller reads it next).
template <typename Emit>
bool lookup_many(KeyIndex* self, PyObject* keys, bool prefetch_values, Emit emit,
                 Py_ssize_t* out_len) {
  // NOTE: the sequence first: iterating an arbitrary iterable may run Python code (even a
  // collection that clears this table), so the table is looked at only afterwards
  PyObject* seq = PySequence_Fast(keys, "keys must be a sequence of str");
  if (seq == nullptr) return false;
  if (!ensure_table(self)) {
    Py_DECREF(seq);
    return false;
  }
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  *out_len = n;
  std::vector<Py_hash_t> hashes(static_cast<size_t>(n));
  for (Py_ssize_t k = 0; k < n; ++k) {
    if (!check_key(items[k])) {
      Py_DECREF(seq);
      return false;
    }
    Py_hash_t hash = PyObject_Hash(items[k]);
    if (hash == -1) {
      Py_DECREF(seq);
      return false;
    }
    hashes[k] = hash;
    __builtin_prefetch(&self->slots[static_cast<size_t>(hash) & self->mask]);
  }
  // NOTE: second pass: each home slot has (mostly) arrived; fetch the stored keys the
  // compares will read, so those misses overlap too
  for (Py_ssize_t k = 0; k < n; ++k) {
    const Slot& s = self->slots[static_cast<size_t>(hashes[k]) & self->mask];
    if (s.key != nullptr && s.hash == hashes[k]) {
      // NOTE: both lines of the stored key: a str's text starts 40-48 bytes in, so a key
      // of more than ~16 characters ends in the object's second line
      __builtin_prefetch(s.key);
      __builtin_prefetch(reinterpret_cast<const char*>(s.key) + 64);
      if (prefetch_values) __builtin_prefetch(s.value);
    }
  }
  for (Py_ssize_t k = 0; k < n; ++k) {
    const Slot& s = self->slots[find_slot(self, items[k], hashes[k])];
    if (s.key == nullptr) {
      emit(k, nullptr);
      continue;
    }
    if (prefetch_values) {
      // NOTE: the rest of the value's object (its first line came in the pass above): the
      // reader touches several of its attributes right after the batch
      const char* base = reinterpret_cast<const char*>(s.value);
      Py_ssize_t num_bytes = Py_TYPE(s.value)->tp_basicsize;
      for (Py_ssize_t offset = 64; offset < num_bytes; offset += 64)
        __builtin_prefetch(base + offset);
    }
    emit(k, &s);
  }
  Py_DECREF(seq);
  return true;
}

// Prefetches the object in the ``follow`` slot of each of ``values`` (of exactly that class),
// then a tuple's items: the second and third hops of a reader that goes from the value to
// its cached row and on to the row's fields.
void prefetch_followed(const KeyIndex* self, const std::vector<PyObject*>& values) {
  std::vector<PyObject*> followed;
  followed.reserve(values.size());
  for (PyObject* value : values) {
    if (Py_TYPE(value) != self->follow_type) continue;
    PyObject* target =
        *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(value) + self->follow_offset);
    if (target == nullptr) continue;
    __builtin_prefetch(target);
    followed.push_back(target);
  }
  for (PyObject* target : followed) {
    if (!PyTuple_CheckExact(target)) continue;
    Py_ssize_t num_items = PyTuple_GET_SIZE(target);
    for (Py_ssize_t i = 0; i < num_items; ++i) __builtin_prefetch(PyTuple_GET_ITEM(target, i));
  }
}

PyObject* KeyIndex_get_many(KeyIndex* self, PyObject* keys) {
  if (Py_TYPE(keys) == KeyBatch_type) return KeyIndex_get_batch(self, keys);
  PyObject* out = nullptr;
  Py_ssize_t n = 0;
  std::vector<PyObject*> found;   // new references: PyList_New may run the GC (and finalizers)
  bool ok = lookup_many(self, keys, true, [&](Py_ssize_t, const Slot* s) {
    PyObject* value = s != nullptr ? s->value : Py_None;
    Py_INCREF(value);
    found.push_back(value);
  }, &n);
  if (!ok) {
    for (PyObject* value : found) Py_DECREF(value);
    return nullptr;
  }
  if (self->follow_type != nullptr) prefetch_followed(self, found);
  out = PyList_New(n);
  if (out == nullptr) {
    for (PyObject* value : found) Py_DECREF(value);
    return nullptr;
  }
  for (Py_ssize_t k = 0; k < n; ++k) PyList_SET_ITEM(out, k, found[k]);
  return out;
}

PyObject* KeyIndex_contains_many(KeyIndex* self, PyObject* keys) {
  Py_ssize_t n = 0;
  std::vector<char> found;
  bool ok = lookup_many(self, keys, false, [&](Py_ssize_t, const Slot* s) {
    found.push_back(s != nullptr);
  }, &n);
  if (!ok) return nullptr;
  PyObject* out = PyList_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* flag = found[k] ? Py_True : Py_False;
    Py_INCREF(flag);
    PyList_SET_ITEM(out, k, flag);
  }
  return out;
}

PyObject* KeyIndex_get(KeyIndex* self, PyObject* key) {
  if (!ensure_table(self)) return nullptr;
  if (!check_key(key)) return nullptr;
  Py_hash_t hash = PyObject_Hash(key);
  if (hash == -1) return nullptr;
  const Slot& s = self->slots[find_slot(self, key, hash)];
  PyObject* value = s.key != nullptr ? s.value : Py_None;
  Py_INCREF(value);
  return value;
}

Py_ssize_t KeyIndex_len(KeyIndex* self) { return static_cast<Py_ssize_t>(self->size); }

PyMethodDef KeyIndex_methods[] = {
    {"set", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(KeyIndex_set)),
     METH_FASTCALL, "set(key, value): map key (str) to value, replacing any earlier value."},
    {"store", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(KeyIndex_store)),
     METH_FASTCALL, "store(mapping, key, value): set key here and in the dict mapping."},
    {"discard", reinterpret_cast<PyCFunction>(KeyIndex_discard), METH_O,
     "discard(key) -> bool: forget key; False if it was not there."},
    {"get", reinterpret_cast<PyCFunction>(KeyIndex_get), METH_O,
     "get(key): key's value, or None."},
    {"get_many", reinterpret_cast<PyCFunction>(KeyIndex_get_many), METH_O,
     "get_many(keys) -> list: each key's value, or None, in order (keys: a sequence of str "
     "or a KeyBatch)."},
    {"contains_many", reinterpret_cast<PyCFunction>(KeyIndex_contains_many), METH_O,
     "contains_many(keys) -> list[bool]: whether each key is there, in order."},
    {"contains_batch", reinterpret_cast<PyCFunction>(KeyIndex_contains_batch), METH_O,
     "contains_batch(batch) -> (bytes, list[str]): the ExistsResponse of a KeyBatch in wire "
     "form (its exists field) and the keys not there."},
    {"get_batch", reinterpret_cast<PyCFunction>(KeyIndex_get_batch), METH_O,
     "get_batch(batch) -> list: get_many of a KeyBatch's keys."},
    {"clear", reinterpret_cast<PyCFunction>(KeyIndex_clear), METH_NOARGS,
     "clear(): forget every key."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot KeyIndex_slots[] = {
    {Py_tp_doc, const_cast<char*>("KeyIndex(follow=None): hash table from str keys to objects "
                                  "with batch lookups (kvstore.master.keytable); follow: "
                                  "Class.slot whose object get_many prefetches.")},
    {Py_tp_new, reinterpret_cast<void*>(KeyIndex_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(KeyIndex_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(KeyIndex_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(KeyIndex_tp_clear)},
    {Py_tp_methods, KeyIndex_methods},
    {Py_sq_length, reinterpret_cast<void*>(KeyIndex_len)},
    {0, nullptr}};

PyType_Spec KeyIndex_spec = {"kvstore.master._keyindex.KeyIndex", sizeof(KeyIndex), 0,
                             Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, KeyIndex_slots};

PyModuleDef keyindex_module = {PyModuleDef_HEAD_INIT, "_keyindex",
                               "The master's key index (see csrc/master/keyindex.cpp).", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace kvstore_keyindex

using namespace kvstore_keyindex;

PyMODINIT_FUNC PyInit__keyindex(void) {
  PyObject* module = PyModule_Create(&keyindex_module);
  if (module == nullptr) return nullptr;
  PyObject* type = PyType_FromSpec(&KeyIndex_spec);
  if (type == nullptr || PyModule_AddObject(module, "KeyIndex", type) < 0) {
    Py_XDECREF(type);
    Py_DECREF(module);
    return nullptr;
  }
  if (add_keybatch(module) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
