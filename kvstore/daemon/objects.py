"""The daemon's copy of its own object table, kept current by the master's heartbeat replies.

Why the daemon keeps one: the master's state is soft. After a master restart the daemon
re-registers with this table as its inventory, so the new master adopts every object the
daemon still holds and no stored block is lost.

Rule for a change set (``kvstore.rpc.HeartbeatChanges``): ``full_resync`` first discards the table; then
``added`` entries are inserted (replacing an entry with the same key); then ``removed_keys``
are dropped. The master sends only each key's last change, so a key is in at most one of
the two lists (tested in tests/test_master_heartbeat.py); were it in both, additions first
would err on the safe side: the table would miss an object, never list freed space.

Thread-safe: one lock guards the table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kvstore.rpc import HeartbeatChanges, Inventory

#: Codec (kvstore.v1.Codec) recorded when a change names none: the raw bytes.
CODEC_RAW = 0


@dataclass(frozen=True, slots=True)
class StoredObject:
    """Where one object's bytes lie on this node."""

    segment_id: str
    offset: int
    length: int
    checksum: int
    codec: int


class ObjectTable:
    """key -> StoredObject for the replicas on this node, plus the last applied sequence."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_to_object: dict[str, StoredObject] = {}
        self.acked_seq = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._key_to_object)

    def get(self, key: str) -> StoredObject | None:
        with self._lock:
            return self._key_to_object.get(key)

    def reset_sequence(self) -> None:
        """A (re-)registration starts a new sequence with the master: nothing acked yet."""
        with self._lock:
            self.acked_seq = 0

    def apply(self, response: HeartbeatChanges) -> int:
        """Apply one heartbeat change set; return the number of entries it touched.

        Change sets at or below the acked sequence (a reply to a retried heartbeat) are
        ignored, so applying one twice is harmless.
        """
        if not response.full_resync and response.seq <= self.acked_seq:
            return 0
        added = response.added
        with self._lock:
            if response.full_resync:
                self._key_to_object.clear()
            codecs = added.codecs
            checksums = added.checksums
            for i, key in enumerate(added.keys):
                self._key_to_object[key] = StoredObject(
                    added.segment_ids[i], added.offsets[i], added.lengths[i],
                    checksums[i] if i < len(checksums) else 0,
                    codecs[i] if i < len(codecs) else CODEC_RAW)
            for key in response.removed_keys:
                self._key_to_object.pop(key, None)
            self.acked_seq = response.seq
        return len(added.keys) + len(response.removed_keys)

    def to_inventory(self) -> Inventory:
        """The whole table as an Inventory (parallel lists, one entry per object)."""
        with self._lock:
            items = list(self._key_to_object.items())
        return Inventory(keys=[key for key, _ in items],
                         segment_ids=[obj.segment_id for _, obj in items],
                         offsets=[obj.offset for _, obj in items],
                         lengths=[obj.length for _, obj in items],
                         checksums=[obj.checksum for _, obj in items],
                         codecs=[obj.codec for _, obj in items])
