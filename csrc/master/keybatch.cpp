// KeyBatch: the keys of one ExistsRequest or GetReplicasRequest decoded from protobuf wire
// form straight into one buffer, and the KeyIndex lookups that take one
// (``contains_batch``: the ExistsResponse in wire form; ``get_batch``: like ``get_many``).
//
// Why: a 1,024-key Exists spent more of the master's time turning the request into Python
// objects (the protobuf parse, then one str per key when the handler read the keys, then a
// bool per key into the reply message) than looking the keys up (bench/RESULTS.md, "Master
// fast path, wire form"). Here no per-key Python object is made unless a key is missing
// (the caller checks those keys' validity).
//
// Parsing: ``parse_request(body)`` reads fields 1 (keys), 2 (lease_ttl_ms), 3
// (client_host_id), 120 (epoch) and 160 (shm_reads) of master.proto's ExistsRequest /
// GetReplicasRequest and skips every other field, as protobuf does. It returns None, so that
// the caller parses the body with protobuf instead (same result, slower), whenever the body
// is anything but the plain case: a key or client_host_id that is not ASCII, a group, or a
// malformed body (protobuf then reports it). A key's hash is its str hash: for ASCII text,
// CPython hashes a str's bytes exactly as ``_Py_HashBytes`` hashes them.
//
// Guarantees: a KeyBatch is immutable; as a sequence it yields each key as a new str.
// Lookups need the index's lock (the master's service lock), like every KeyIndex method.
#include "keyindex.h"

#include <structmember.h>

namespace kvstore_keyindex {

PyTypeObject* KeyBatch_type = nullptr;

namespace {

constexpr uint32_t kKeysField = 1, kLeaseTtlField = 2, kHostField = 3, kEpochField = 120,
                   kShmReadsField = 160;

// Reads a varint at p (advancing it); false when truncated or longer than 10 bytes.
inline bool read_varint(const uint8_t*& p, const uint8_t* end, uint64_t& out) {
  uint64_t value = 0;
  for (int shift = 0; shift < 70 && p < end; shift += 7) {
    uint8_t byte = *p++;
    if (shift < 64) value |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if (!(byte & 0x80)) {
      out = value;
      return true;
    }
  }
  return false;
}

inline bool is_ascii(const uint8_t* data, size_t len) {
  uint8_t any = 0;
  for (size_t i = 0; i < len; ++i) any |= data[i];
  return !(any & 0x80);
}

void KeyBatch_dealloc(KeyBatch* self) {
  PyTypeObject* type = Py_TYPE(self);
  delete self->text;
  delete self->ends;
  delete self->hashes;
  Py_XDECREF(self->client_host_id);
  type->tp_free(reinterpret_cast<PyObject*>(self));
  Py_DECREF(type);
}

// Parses ``data[0:len]`` into ``batch``; false: not the plain case (see the file comment).
bool parse_into(KeyBatch* batch, const uint8_t* p, const uint8_t* end) {
  while (p < end) {
    uint64_t tag;
    if (!read_varint(p, end, tag)) return false;
    uint64_t field = tag >> 3;
    if (field == 0) return false;
    uint64_t value;
    switch (tag & 7) {
      case 0:
        if (!read_varint(p, end, value)) return false;
        if (field == kEpochField) batch->epoch = value;
        else if (field == kLeaseTtlField) batch->lease_ttl_ms = value;
        else if (field == kShmReadsField) batch->shm_reads = value != 0;
        break;
      case 1:
        if (end - p < 8) return false;
        p += 8;
        break;
      case 2: {
        if (!read_varint(p, end, value) || value > static_cast<uint64_t>(end - p)) return false;
        size_t len = static_cast<size_t>(value);
        if (field == kKeysField) {
          if (!is_ascii(p, len)) return false;
          batch->text->append(reinterpret_cast<const char*>(p), len);
          batch->ends->push_back(batch->text->size());
          batch->hashes->push_back(_Py_HashBytes(p, static_cast<Py_ssize_t>(len)));
        } else if (field == kHostField) {
          if (!is_ascii(p, len)) return false;
          PyObject* host = PyUnicode_FromStringAndSize(reinterpret_cast<const char*>(p),
                                                       static_cast<Py_ssize_t>(len));
          if (host == nullptr) return false;
          Py_XSETREF(batch->client_host_id, host);
        }
        p += len;
        break;
      }
      case 5:
        if (end - p < 4) return false;
        p += 4;
        break;
      default:   // groups (3, 4) and invalid wire types: left to protobuf
        return false;
    }
  }
  return true;
}

PyObject* parse_request(PyObject*, PyObject* body) {
  Py_buffer view;
  if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0) return nullptr;
  KeyBatch* batch = PyObject_New(KeyBatch, KeyBatch_type);
  if (batch == nullptr) {
    PyBuffer_Release(&view);
    return nullptr;
  }
  batch->text = nullptr;
  batch->ends = nullptr;
  batch->hashes = nullptr;
  batch->epoch = batch->lease_ttl_ms = 0;
  batch->shm_reads = 0;
  batch->client_host_id = nullptr;
  bool parsed = false;
  try {
    batch->text = new std::string();
    batch->ends = new std::vector<size_t>();
    batch->hashes = new std::vector<Py_hash_t>();
    batch->text->reserve(static_cast<size_t>(view.len));
    const uint8_t* data = static_cast<const uint8_t*>(view.buf);
    parsed = parse_into(batch, data, data + view.len);
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  }
  PyBuffer_Release(&view);
  if (PyErr_Occurred()) {
    Py_DECREF(batch);
    return nullptr;
  }
  if (!parsed) {
    Py_DECREF(batch);
    Py_RETURN_NONE;
  }
  if (batch->client_host_id == nullptr) {
    batch->client_host_id = PyUnicode_FromStringAndSize("", 0);
    if (batch->client_host_id == nullptr) {
      Py_DECREF(batch);
      return nullptr;
    }
  }
  return reinterpret_cast<PyObject*>(batch);
}

inline const char* key_data(const KeyBatch* b, size_t k) {
  return b->text->data() + (k ? (*b->ends)[k - 1] : 0);
}

inline Py_ssize_t key_len(const KeyBatch* b, size_t k) {
  return static_cast<Py_ssize_t>((*b->ends)[k] - (k ? (*b->ends)[k - 1] : 0));
}

inline PyObject* key_str(const KeyBatch* b, size_t k) {
  return PyUnicode_DecodeASCII(key_data(b, k), key_len(b, k), nullptr);
}

Py_ssize_t KeyBatch_len(KeyBatch* self) { return static_cast<Py_ssize_t>(self->ends->size()); }

PyObject* KeyBatch_item(KeyBatch* self, Py_ssize_t i) {
  if (i < 0 || static_cast<size_t>(i) >= self->ends->size()) {
    PyErr_SetString(PyExc_IndexError, "KeyBatch index out of range");
    return nullptr;
  }
  return key_str(self, static_cast<size_t>(i));
}

PyObject* KeyBatch_keys(KeyBatch* self, void*) {
  Py_INCREF(self);
  return reinterpret_cast<PyObject*>(self);
}

PyMemberDef KeyBatch_members[] = {
    {"epoch", T_ULONGLONG, offsetof(KeyBatch, epoch), READONLY, "field 120 (0 if absent)"},
    {"lease_ttl_ms", T_ULONGLONG, offsetof(KeyBatch, lease_ttl_ms), READONLY,
     "field 2 of GetReplicasRequest (0 if absent)"},
    {"client_host_id", T_OBJECT_EX, offsetof(KeyBatch, client_host_id), READONLY,
     "field 3 of GetReplicasRequest ('' if absent)"},
    {"shm_reads", T_BOOL, offsetof(KeyBatch, shm_reads), READONLY,
     "field 160 of GetReplicasRequest"},
    {nullptr, 0, 0, 0, nullptr}};

PyGetSetDef KeyBatch_getset[] = {
    {"keys", reinterpret_cast<getter>(KeyBatch_keys), nullptr,
     "the batch itself (so a KeyBatch reads like the request message)", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyType_Slot KeyBatch_slots[] = {
    {Py_tp_doc, const_cast<char*>("A request's keys and scalar fields decoded from wire form "
                                  "(parse_request); a sequence of its keys (str).")},
    {Py_tp_dealloc, reinterpret_cast<void*>(KeyBatch_dealloc)},
    {Py_tp_members, KeyBatch_members},
    {Py_tp_getset, KeyBatch_getset},
    {Py_sq_length, reinterpret_cast<void*>(KeyBatch_len)},
    {Py_sq_item, reinterpret_cast<void*>(KeyBatch_item)},
    {0, nullptr}};

PyType_Spec KeyBatch_spec = {"kvstore.master._keyindex.KeyBatch", sizeof(KeyBatch), 0,
                             Py_TPFLAGS_DEFAULT, KeyBatch_slots};

PyMethodDef module_methods[] = {
    {"parse_request", parse_request, METH_O,
     "parse_request(body) -> KeyBatch | None: an ExistsRequest's or GetReplicasRequest's "
     "fields from its wire form; None: parse it with protobuf instead."},
    {"encode_get_replicas",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(encode_get_replicas)),
     METH_FASTCALL,
     "encode_get_replicas(sizes, checksums, codecs, segments, offsets, tables, "
     "lease_expires_in_s, lease_id) -> bytes: the GetReplicasResponse of a batch whose keys "
     "were all found with one replica each (csrc/master/replywire.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

// How many keys ahead of its compare the lookup fetches a key's home slot, and how many
// ahead the stored key (and value) that slot names. NOTE: why a pipeline and not three
// passes over the batch (every slot, then every stored key, then the compares, as
// keyindex.cpp's lookup_many does for strs): for 1,024 keys the passes issue thousands of
// prefetches back to back, more than the core keeps in flight, and the compares then
// found a stored key's header line missing again (perf: 47% of contains_batch's samples on
// that one load). Ahead by a fixed distance, a bounded number of misses is in flight and
// each line is read soon after it arrives: contains_batch x1024 over 200,000 keys 68.1-72.0
// us (min of 9) against 67.9-108.9 us, 5 alternating pairs at load 5.4 (bench/RESULTS.md,
// "batch_exists from one client").
constexpr size_t kSlotsAhead = 24, kKeysAhead = 12;

// Looks each key of ``batch`` up with its misses overlapped; calls emit(k, slot or nullptr)
// in order.
template <typename Emit>
void lookup_batch(KeyIndex* self, const KeyBatch* batch, bool prefetch_values, Emit emit) {
  const Py_hash_t* hashes = batch->hashes->data();
  const size_t n = batch->hashes->size();
  const Slot* slots = self->slots;
  const size_t mask = self->mask;
  auto fetch_slot = [&](size_t k) {
    const char* slot =
        reinterpret_cast<const char*>(&slots[static_cast<size_t>(hashes[k]) & mask]);
    __builtin_prefetch(slot);
    __builtin_prefetch(slot + sizeof(Slot) - 1);   // a slot may straddle two lines
  };
  auto fetch_key = [&](size_t k) {
    const Slot& s = slots[static_cast<size_t>(hashes[k]) & mask];
    if (s.key != nullptr && s.hash == hashes[k]) {
      // NOTE: both lines of the stored key: a str's text starts 40-48 bytes in
      __builtin_prefetch(s.key);
      __builtin_prefetch(reinterpret_cast<const char*>(s.key) + 64);
      if (prefetch_values) __builtin_prefetch(s.value);
    }
  };
  for (size_t k = 0; k < n && k < kSlotsAhead; ++k) fetch_slot(k);
  for (size_t k = 0; k < n && k < kKeysAhead; ++k) fetch_key(k);
  for (size_t k = 0; k < n; ++k) {
    if (k + kSlotsAhead < n) fetch_slot(k + kSlotsAhead);
    if (k + kKeysAhead < n) fetch_key(k + kKeysAhead);
    const Slot& s = slots[find_slot_ascii(self, key_data(batch, k), key_len(batch, k),
                                          hashes[k])];
    emit(k, s.key != nullptr ? &s : nullptr);
  }
}

bool check_batch(PyObject* batch) {
  if (Py_TYPE(batch) != KeyBatch_type) {
    PyErr_Format(PyExc_TypeError, "expected a KeyBatch, got %.100s", Py_TYPE(batch)->tp_name);
    return false;
  }
  return true;
}

}  // namespace

PyObject* KeyIndex_contains_batch(KeyIndex* self, PyObject* arg) {
  if (!check_batch(arg) || !ensure_table(self)) return nullptr;
  const KeyBatch* batch = reinterpret_cast<const KeyBatch*>(arg);
  size_t n = batch->ends->size();
  // the reply: field 1 (exists), packed: tag, varint length, one byte (0 or 1) a key
  uint8_t head[11];
  size_t head_len = 0;
  if (n) {
    head[head_len++] = 0x0A;
    for (size_t v = n; ; v >>= 7) {
      head[head_len++] = static_cast<uint8_t>((v & 0x7F) | (v > 0x7F ? 0x80 : 0));
      if (v <= 0x7F) break;
    }
  }
  PyObject* payload = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(head_len + n));
  PyObject* missing = PyList_New(0);
  if (payload == nullptr || missing == nullptr) {
    Py_XDECREF(payload);
    Py_XDECREF(missing);
    return nullptr;
  }
  char* out = PyBytes_AS_STRING(payload);
  std::memcpy(out, head, head_len);
  out += head_len;
  std::vector<size_t> absent;
  lookup_batch(self, batch, false, [&](size_t k, const Slot* s) {
    out[k] = s != nullptr;
    if (s == nullptr) absent.push_back(k);
  });
  // NOTE: the strs after the lookups: creating one may run the GC, which may change the table
  for (size_t k : absent) {
    PyObject* key = key_str(batch, k);
    if (key == nullptr || PyList_Append(missing, key) < 0) {
      Py_XDECREF(key);
      Py_DECREF(payload);
      Py_DECREF(missing);
      return nullptr;
    }
    Py_DECREF(key);
  }
  PyObject* result = PyTuple_Pack(2, payload, missing);
  Py_DECREF(payload);
  Py_DECREF(missing);
  return result;
}

PyObject* KeyIndex_get_batch(KeyIndex* self, PyObject* arg) {
  if (!check_batch(arg) || !ensure_table(self)) return nullptr;
  const KeyBatch* batch = reinterpret_cast<const KeyBatch*>(arg);
  std::vector<PyObject*> found;   // new references: PyList_New may run the GC
  found.reserve(batch->ends->size());
  lookup_batch(self, batch, true, [&](size_t, const Slot* s) {
    PyObject* value = s != nullptr ? s->value : Py_None;
    if (s != nullptr) {
      const char* base = reinterpret_cast<const char*>(value);
      Py_ssize_t num_bytes = Py_TYPE(value)->tp_basicsize;
      for (Py_ssize_t offset = 64; offset < num_bytes; offset += 64)
        __builtin_prefetch(base + offset);
    }
    Py_INCREF(value);
    found.push_back(value);
  });
  if (self->follow_type != nullptr) prefetch_followed(self, found);
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(found.size()));
  if (out == nullptr) {
    for (PyObject* value : found) Py_DECREF(value);
    return nullptr;
  }
  for (size_t k = 0; k < found.size(); ++k)
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(k), found[k]);
  return out;
}

int add_keybatch(PyObject* module) {
  PyObject* type = PyType_FromSpec(&KeyBatch_spec);
  if (type == nullptr) return -1;
  KeyBatch_type = reinterpret_cast<PyTypeObject*>(type);
  Py_INCREF(type);   // the module's reference; KeyBatch_type keeps the other
  if (PyModule_AddObject(module, "KeyBatch", type) < 0) {
    Py_DECREF(type);
    return -1;
  }
  return PyModule_AddFunctions(module, module_methods);
}

}  // namespace kvstore_keyindex
