"""``KeyTable``: the master's table of COMPLETE objects, a dict with a native batch index.

The table is an ordinary ``dict`` of key -> ObjectMeta (every read the state does one key at a
time, iteration, ``len``, ``in`` are the dict's own), whose every entry is mirrored in
``index``, a ``kvstore.master._keyindex.KeyIndex`` (C++, csrc/master/keyindex.cpp): a hash
table answering a whole batch in one call, ``index.get_many(keys)`` (each key's object or
None) and ``index.contains_many(keys)`` (each key's presence), with the cache misses of the
batch's keys overlapped (prefetched) instead of taken one after another. ``get_many`` also
prefetches what the GetReplicas encoder reads next: each object, its ``reply_row`` tuple
(``replies.ReplicaRows``) and that tuple's items.

NOTE: why: a batch read of 1,024 keys out of 200,000 was bound by memory latency, not by
computation (about three dependent cache misses per key for a dict lookup): the same batch
looked up again took a fifth of the time of a fresh one. ``KeyIndex`` cut the lookups of a
fresh 1,024-key batch 4-5x (bench/RESULTS.md, "Master key index").

Guarantees: after any mutation through the dict's API (``[key] = obj``, ``del``, ``pop``,
``popitem``, ``setdefault``, ``update``, ``|=``, ``clear``) or ``store(key, obj)`` (the same as
``[key] = obj``, cheaper) the index holds exactly the dict's entries. Keys must be ``str``
(TypeError otherwise, with neither table changed). Not thread-safe: the state is used under
the service lock. Memory: 24 bytes per slot, at most half of the slots used (so 48-96 bytes
per object beside the dict's own).
"""

from __future__ import annotations

import functools

from kvstore.master._keyindex import KeyIndex
from kvstore.master.objects import ObjectMeta

_MISSING = object()


class KeyTable(dict):
    """A ``dict`` of key -> ObjectMeta mirrored in ``index`` (see the module docstring)."""

    __slots__ = ("index", "store")

    def __init__(self, *args, **kwargs):
        super().__init__()
        # NOTE: follow the cached reply row: GetReplicas reads each object's row and the
        # row's fields right after the lookup, two more misses a key otherwise
        self.index = KeyIndex(follow=ObjectMeta.reply_row)
        # NOTE: ``store(key, obj)``: ``self[key] = obj`` in one C call, for put_end's loop
        # (the Python __setitem__ frame cost ~0.4 us a key, a third of PutEnd's added cost)
        self.store = functools.partial(self.index.store, self)
        self.update(*args, **kwargs)

    def __setitem__(self, key: str, obj) -> None:
        self.index.set(key, obj)     # first: it refuses a non-str key before the dict changes
        # NOTE: dict.__setitem__, not super(): put_end stores every committed key through here
        dict.__setitem__(self, key, obj)

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        self.index.discard(key)

    def pop(self, key: str, default=_MISSING):
        if default is _MISSING:
            obj = super().pop(key)
        else:
            obj = super().pop(key, _MISSING)
            if obj is _MISSING:
                return default
        self.index.discard(key)
        return obj

    def popitem(self):
        key, obj = super().popitem()
        self.index.discard(key)
        return key, obj

    def setdefault(self, key: str, default=None):
        obj = self.get(key, _MISSING)
        if obj is _MISSING:
            self[key] = obj = default
        return obj

    def update(self, *args, **kwargs) -> None:
        for key, obj in dict(*args, **kwargs).items():
            self[key] = obj

    def __ior__(self, other):
        self.update(other)
        return self

    def clear(self) -> None:
        super().clear()
        self.index.clear()
