// kvstore._copy_hash.RangeTable: the write guard's committed ranges (kvstore/daemon/
// write_guard.py): per segment an ordered map offset -> (end, seq, key) and the highest seq
// ever noted there. NOTE: in C++, not a sortedcontainers.SortedDict: the SortedDict insert
// was ~40% of the daemon's per-key commit work (issue 10, 10d2); a std::map insert costs a
// tenth of it, and note_many/claim take a whole change set or record entry in one call.
//
// Not thread-safe on its own: the guard calls it under its lock (every call holds the GIL
// too, and none releases it).
#include "range_table.h"

#include <stdint.h>

#include <map>
#include <new>
#include <deque>
#include <vector>

namespace {

struct Entry {
  uint64_t end;
  uint64_t seq;
  PyObject* key;  // owned
};

struct Segment {
  PyObject* id;  // owned str
  std::map<uint64_t, Entry> ranges;
  uint64_t newest = 0;
};

struct RangeTable {
  PyObject_HEAD
  std::deque<Segment>* segments;
};

void clear_segments(std::deque<Segment>* segments) {
  for (Segment& segment : *segments) {
    for (auto& item : segment.ranges) Py_DECREF(item.second.key);
    Py_DECREF(segment.id);
  }
  segments->clear();
}

// The segment named ``id`` (a str), or nullptr (error set when ``id`` is no str or a
// comparison failed); created when ``create``.
Segment* find(RangeTable* self, PyObject* id, bool create, bool* failed) {
  *failed = false;
  if (!PyUnicode_Check(id)) {
    PyErr_SetString(PyExc_TypeError, "segment id must be a str");
    *failed = true;
    return nullptr;
  }
  for (Segment& segment : *self->segments) {
    if (segment.id == id) return &segment;
  }
  for (Segment& segment : *self->segments) {
    const int equal = PyUnicode_Compare(segment.id, id);
    if (equal == -1 && PyErr_Occurred()) {
      *failed = true;
      return nullptr;
    }
    if (equal == 0) return &segment;
  }
  if (!create) return nullptr;
  Py_INCREF(id);
  self->segments->push_back(Segment{id, {}, 0});
  return &self->segments->back();
}

bool u64(PyObject* value, uint64_t* out) {
  *out = PyLong_AsUnsignedLongLong(value);
  return !(*out == static_cast<uint64_t>(-1) && PyErr_Occurred());
}

bool check_key(PyObject* key) {
  if (PyUnicode_Check(key)) return true;
  PyErr_SetString(PyExc_TypeError, "key must be a str");
  return false;
}

void note(Segment* segment, PyObject* key, uint64_t offset, uint64_t length, uint64_t seq) {
  Py_INCREF(key);
  auto [it, inserted] = segment->ranges.try_emplace(offset, Entry{offset + length, seq, key});
  if (!inserted) {
    Py_DECREF(it->second.key);
    it->second = Entry{offset + length, seq, key};
  }
  if (seq > segment->newest) segment->newest = seq;
}

// The object of ``segment`` overlapping [offset, offset + length) with a seq above
// ``node_seq`` as (key, start, end), or None (new reference; nullptr on error).
// NOTE: the walk of the former Python code: every object starting inside the range, then
// the one starting before ``offset`` (the only earlier one that may reach into it).
PyObject* newer_overlap(const Segment* segment, uint64_t offset, uint64_t length,
                        uint64_t node_seq) {
  if (segment != nullptr) {
    auto it = segment->ranges.lower_bound(offset + length);
    while (it != segment->ranges.begin()) {
      --it;
      const Entry& entry = it->second;
      if (offset < entry.end && entry.seq > node_seq) {
        return Py_BuildValue("(OKK)", entry.key, static_cast<unsigned long long>(it->first),
                             static_cast<unsigned long long>(entry.end));
      }
      if (it->first < offset) break;
    }
  }
  Py_RETURN_NONE;
}

PyObject* table_new(PyTypeObject* type, PyObject*, PyObject*) {
  RangeTable* self = reinterpret_cast<RangeTable*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  self->segments = new (std::nothrow) std::deque<Segment>();
  if (self->segments == nullptr) {
    Py_DECREF(self);
    return PyErr_NoMemory();
  }
  return reinterpret_cast<PyObject*>(self);
}

void table_dealloc(PyObject* object) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  if (self->segments != nullptr) {
    clear_segments(self->segments);
    delete self->segments;
  }
  PyTypeObject* type = Py_TYPE(object);
  type->tp_free(object);
  Py_DECREF(type);  // a heap type (PyType_FromSpec): each instance holds a reference
}

// note(segment_id, key, offset, length, seq)
PyObject* table_note(PyObject* object, PyObject* const* args, Py_ssize_t nargs) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "note takes (segment_id, key, offset, length, seq)");
    return nullptr;
  }
  uint64_t offset, length, seq;
  if (!check_key(args[1]) || !u64(args[2], &offset) || !u64(args[3], &length) ||
      !u64(args[4], &seq))
    return nullptr;
  bool failed;
  Segment* segment = find(self, args[0], true, &failed);
  if (segment == nullptr) return nullptr;
  note(segment, args[1], offset, length, seq);
  Py_RETURN_NONE;
}

// note_many(ranges, seq): note(segment_id, key, offset, length, seq) for each 4-tuple of
// the sequence ``ranges``. Every tuple is checked before any is noted: a bad one (not a
// 4-tuple, a key or segment id that is no str, a negative offset) changes nothing.
PyObject* table_note_many(PyObject* object, PyObject* const* args, Py_ssize_t nargs) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "note_many takes (ranges, seq)");
    return nullptr;
  }
  uint64_t seq;
  if (!u64(args[1], &seq)) return nullptr;
  PyObject* items = PySequence_Fast(args[0], "note_many: ranges must be a sequence");
  if (items == nullptr) return nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  PyObject** entries = PySequence_Fast_ITEMS(items);
  std::vector<uint64_t> numbers(2 * static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* entry = entries[i];
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 4) {
      PyErr_SetString(PyExc_TypeError,
                      "note_many: each range is a (segment_id, key, offset, length) tuple");
      Py_DECREF(items);
      return nullptr;
    }
    if (!PyUnicode_Check(PyTuple_GET_ITEM(entry, 0)) ||
        !check_key(PyTuple_GET_ITEM(entry, 1)) ||
        !u64(PyTuple_GET_ITEM(entry, 2), &numbers[2 * i]) ||
        !u64(PyTuple_GET_ITEM(entry, 3), &numbers[2 * i + 1])) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "segment id must be a str");
      Py_DECREF(items);
      return nullptr;
    }
  }
  Segment* last = nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* entry = entries[i];
    PyObject* id = PyTuple_GET_ITEM(entry, 0);
    if (last == nullptr || last->id != id) {
      bool failed;
      last = find(self, id, true, &failed);
      if (last == nullptr) {
        Py_DECREF(items);
        return nullptr;
      }
    }
    note(last, PyTuple_GET_ITEM(entry, 1), numbers[2 * i], numbers[2 * i + 1], seq);
  }
  Py_DECREF(items);
  Py_RETURN_NONE;
}

// newer_overlap(segment_id, offset, length, node_seq) -> (key, start, end) or None
PyObject* table_newer_overlap(PyObject* object, PyObject* const* args, Py_ssize_t nargs) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError,
                    "newer_overlap takes (segment_id, offset, length, node_seq)");
    return nullptr;
  }
  uint64_t offset, length, node_seq;
  if (!u64(args[1], &offset) || !u64(args[2], &length) || !u64(args[3], &node_seq))
    return nullptr;
  bool failed;
  Segment* segment = find(self, args[0], false, &failed);
  if (failed) return nullptr;
  return newer_overlap(segment, offset, length, node_seq);
}

// claim(segment_id, key, offset, length, node_seq, check) -> None (noted at node_seq + 1)
// or the (key, start, end) of the newer object it overlaps (nothing noted). ``check``
// false: noted without the overlap walk (the caller proved it cannot refuse).
PyObject* table_claim(PyObject* object, PyObject* const* args, Py_ssize_t nargs) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError,
                    "claim takes (segment_id, key, offset, length, node_seq, check)");
    return nullptr;
  }
  uint64_t offset, length, node_seq;
  if (!check_key(args[1]) || !u64(args[2], &offset) || !u64(args[3], &length) ||
      !u64(args[4], &node_seq))
    return nullptr;
  const int check = PyObject_IsTrue(args[5]);
  if (check < 0) return nullptr;
  bool failed;
  Segment* segment = find(self, args[0], true, &failed);
  if (segment == nullptr) return nullptr;
  if (check) {
    PyObject* overlap = newer_overlap(segment, offset, length, node_seq);
    if (overlap != Py_None) return overlap;  // the conflict, or nullptr on error
    Py_DECREF(overlap);
  }
  note(segment, args[1], offset, length, node_seq + 1);
  Py_RETURN_NONE;
}

// freed(segment_id, key, offset): forget the object at ``offset`` if it is still ``key``'s.
PyObject* table_freed(PyObject* object, PyObject* const* args, Py_ssize_t nargs) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "freed takes (segment_id, key, offset)");
    return nullptr;
  }
  uint64_t offset;
  if (!check_key(args[1]) || !u64(args[2], &offset)) return nullptr;
  bool failed;
  Segment* segment = find(self, args[0], false, &failed);
  if (failed) return nullptr;
  if (segment == nullptr) Py_RETURN_NONE;
  auto it = segment->ranges.find(offset);
  if (it == segment->ranges.end()) Py_RETURN_NONE;
  const int same = PyUnicode_Compare(it->second.key, args[1]);
  if (same == -1 && PyErr_Occurred()) return nullptr;
  if (same == 0) {
    Py_DECREF(it->second.key);
    segment->ranges.erase(it);
  }
  Py_RETURN_NONE;
}

// newest() -> {segment_id: the highest seq ever noted there}
PyObject* table_newest(PyObject* object, PyObject*) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  PyObject* result = PyDict_New();
  if (result == nullptr) return nullptr;
  for (const Segment& segment : *self->segments) {
    PyObject* value = PyLong_FromUnsignedLongLong(segment.newest);
    if (value == nullptr || PyDict_SetItem(result, segment.id, value) != 0) {
      Py_XDECREF(value);
      Py_DECREF(result);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return result;
}

// get(segment_id, offset) -> (key, end, seq) of the object noted at ``offset``, or None
PyObject* table_get(PyObject* object, PyObject* const* args, Py_ssize_t nargs) {
  RangeTable* self = reinterpret_cast<RangeTable*>(object);
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "get takes (segment_id, offset)");
    return nullptr;
  }
  uint64_t offset;
  if (!u64(args[1], &offset)) return nullptr;
  bool failed;
  Segment* segment = find(self, args[0], false, &failed);
  if (failed) return nullptr;
  if (segment != nullptr) {
    auto it = segment->ranges.find(offset);
    if (it != segment->ranges.end()) {
      return Py_BuildValue("(OKK)", it->second.key,
                           static_cast<unsigned long long>(it->second.end),
                           static_cast<unsigned long long>(it->second.seq));
    }
  }
  Py_RETURN_NONE;
}

PyObject* table_clear(PyObject* object, PyObject*) {
  clear_segments(reinterpret_cast<RangeTable*>(object)->segments);
  Py_RETURN_NONE;
}

Py_ssize_t table_len(PyObject* object) {
  Py_ssize_t count = 0;
  for (const Segment& segment : *reinterpret_cast<RangeTable*>(object)->segments)
    count += static_cast<Py_ssize_t>(segment.ranges.size());
  return count;
}

#define FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fn))

PyMethodDef table_methods[] = {
    {"note", FASTCALL(table_note), METH_FASTCALL,
     "note(segment_id, key, offset, length, seq): the range is key's object, noted at seq."},
    {"note_many", FASTCALL(table_note_many), METH_FASTCALL,
     "note_many(ranges, seq): note of each (segment_id, key, offset, length) at seq; a bad "
     "tuple raises TypeError before any is noted."},
    {"newer_overlap", FASTCALL(table_newer_overlap), METH_FASTCALL,
     "newer_overlap(segment_id, offset, length, node_seq) -> (key, start, end) of an object "
     "overlapping the range noted at a seq above node_seq, or None."},
    {"claim", FASTCALL(table_claim), METH_FASTCALL,
     "claim(segment_id, key, offset, length, node_seq, check) -> None (noted at node_seq + "
     "1) or the newer overlapping (key, start, end), nothing noted; check false skips the "
     "overlap walk."},
    {"freed", FASTCALL(table_freed), METH_FASTCALL,
     "freed(segment_id, key, offset): forget the object at offset if it is still key's."},
    {"get", FASTCALL(table_get), METH_FASTCALL,
     "get(segment_id, offset) -> (key, end, seq) or None."},
    {"newest", table_newest, METH_NOARGS,
     "newest() -> {segment_id: highest seq ever noted there (a free never lowers it)}."},
    {"clear", table_clear, METH_NOARGS, "clear(): forget every range and every newest seq."},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot table_slots[] = {
    {Py_tp_new, reinterpret_cast<void*>(table_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(table_dealloc)},
    {Py_tp_methods, table_methods},
    {Py_sq_length, reinterpret_cast<void*>(table_len)},
    {Py_tp_doc, const_cast<char*>(
         "The write guard's committed ranges: per segment offset -> (end, seq, key), ordered "
         "(csrc/cpu/range_table.cpp). Not thread-safe: callers hold their own lock.")},
    {0, nullptr}};

PyType_Spec table_spec = {"kvstore._copy_hash.RangeTable", sizeof(RangeTable), 0,
                          Py_TPFLAGS_DEFAULT, table_slots};

}  // namespace

int kvstore_add_range_table(PyObject* module) {
  PyObject* type = PyType_FromSpec(&table_spec);
  if (type == nullptr) return -1;
  if (PyModule_AddObject(module, "RangeTable", type) < 0) {
    Py_DECREF(type);
    return -1;
  }
  return 0;
}
