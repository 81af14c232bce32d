"""Cached same-host reads: a repeated get of a key this client read from a shm segment is
copied straight from the mapped segment, with no master call, while the daemon's location
table (daemon/shm_locations.py) proves the object current (issue 15, 15s).

Rule (docs/ARCHITECTURE.md, Location cache): after a verified shm read of ``key`` at a
range, ``remember`` reads the range's slot in its segment's table and caches (segment,
range, checksum, slot sequence, epoch) only when the slot names this key's hash, that range
and checksum, its epoch is the table's, and the table's lease runs. ``read_cached`` hands
the cached keys of a call to ``kvstore._copy_hash.read_ranges`` with guards: per key it
checks the lease, the epoch and the sequence before the copy, copies and hashes, compares
the checksum, and checks the epoch and sequence again after; a key failing any of them is
returned unserved (the caller drops its entry and asks the master).

Why that is enough without a read lease at the master: the sequence changes whenever the
daemon's table drops or replaces the object (before it confirms that change to the
master), the epoch on a full resync, and the lease ends before any removal the daemon has
not applied can complete (location_reads.py). The master may free and reuse the range
before the daemon applies the removal; bytes copied from a range rewritten meanwhile do
not hash to the cached checksum (the hash is of the bytes copied), so they are refused.
Thread-safe: the tables' map under one lock; reads take none.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, NamedTuple, Sequence

from kvstore import _loc_table as lt
from kvstore._copy_hash import loc_read, loc_vouch, read_ranges
from kvstore._posix_shm import POPULATE_CHUNK_BYTES, SharedSegment, open_shm
from kvstore.client.checksum import EMPTY_CHECKSUM
from kvstore.transport.base import Target
from kvstore.transport.shm import SHM_DIR


class CachedShm(NamedTuple):
    """A key's range in a same-host segment and the slot state that vouched for it.
    ``segment``: the segment's Target (offset and length 0), shared by its keys' entries."""

    segment: Target
    offset: int
    size_bytes: int
    checksum: int
    seq: int
    epoch: int


class _Table(NamedTuple):
    segment: SharedSegment
    array: Any
    address: int
    inode: int      # of the table's name when mapped: a table whose name is gone is dropped


class ShmTables:
    """The location tables of the segments this client read, mapped once each.

    Tables of daemons that are gone are unmapped: each time a table is mapped (a restarted
    daemon's segments have new names, so this comes with every new incarnation), the tables
    whose name was unlinked or now names another object are dropped, so a client of a
    daemon restarted N times holds the tables of its live incarnation only, not N. A table
    is unmapped when its last reference goes: callers hold ``table()``'s result while they
    read through its address (a sweep on another thread never unmaps under them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_segment: dict[str, _Table | None] = {}

    def table(self, segment_shm_name: str) -> _Table | None:
        """The mapped table of that segment's name, None when it has none (an older daemon,
        a name not ours, a table that cannot be mapped). Hold it while reading through its
        ``address``."""
        table = self._by_segment.get(segment_shm_name, False)
        if table is False:
            table = self._map(segment_shm_name)
        return table

    def _map(self, segment_shm_name: str) -> _Table | None:
        import numpy as np

        with self._lock:
            if segment_shm_name in self._by_segment:
                return self._by_segment[segment_shm_name]
            gone = self._pop_gone()
            table = None
            name = lt.table_name(segment_shm_name)
            try:
                segment = open_shm(name) if name is not None else None
                inode = os.stat(f"{SHM_DIR}{name}").st_ino if segment is not None else 0
            except (OSError, ValueError):
                segment = None
            if segment is not None and segment.size_bytes >= lt.HEADER_BYTES:
                array = np.frombuffer(segment.view, dtype=np.uint64)
                if (int(array[lt.WORD_MAGIC]) == lt.MAGIC and segment.size_bytes
                        >= lt.table_bytes(int(array[lt.WORD_SLOTS]))):
                    table = _Table(segment, array, int(array.ctypes.data), inode)
            self._by_segment[segment_shm_name] = table
        del gone   # NOTE: outside the lock; unmapped here unless a reader still holds one
        return table

    def _pop_gone(self) -> list[_Table]:
        """Remove (under the lock) the tables whose name no longer names what we mapped, and
        the names that had no table (a restarted daemon's old segments are not read again)."""
        gone = []
        for segment_shm_name, table in list(self._by_segment.items()):
            if table is None:
                if not os.path.exists(f"{SHM_DIR}{segment_shm_name}"):
                    del self._by_segment[segment_shm_name]
                continue
            try:
                alive = os.stat(f"{SHM_DIR}{table.segment.name}").st_ino == table.inode
            except OSError:
                alive = False
            if not alive:
                gone.append(self._by_segment.pop(segment_shm_name))
        return gone

    def forget(self, segment_shm_name: str) -> None:
        with self._lock:
            self._by_segment.pop(segment_shm_name, None)

    def close(self) -> None:
        with self._lock:
            self._by_segment.clear()   # NOTE: unmapped when the last reference goes


def entry_for(tables: ShmTables, key: str, target: Target, size_bytes: int,
              checksum: int) -> CachedShm | None:
    """What to cache after a verified read of ``key`` from ``target`` (a shm replica), or
    None when its table does not vouch for it now (see the module)."""
    table = tables.table(target.shm_name)
    if table is None:
        return None
    slot = loc_read(table.address, target.offset)
    del table
    if slot is None:
        return None
    seq, epoch, key_hash, length, stored_checksum, table_epoch, lease_until_ns = slot
    if (epoch != table_epoch or length != size_bytes or stored_checksum != checksum
            or lease_until_ns <= time.monotonic_ns() or key_hash != lt.key_hash(key)):
        return None
    return CachedShm(target._replace(offset=0, length=0, capability=b""), target.offset,
                     size_bytes, checksum, seq, epoch)


def vouched_entries(tables: ShmTables, keys: list[str], written: list, sizes: list[int],
                    checksums: list[int], starts: list[int], counts: list[int],
                    replica_segment: list[int], replica_offset: list[int],
                    segments: list[Target], mappings: list) -> list[tuple[str, CachedShm]]:
    """``(key, entry)`` as ``entry_for`` would give, for every key a GetReplicas batch's
    ``read_ranges`` served (client/shm_batch.py): the checks and the entries in one C call
    (``loc_vouch``)."""
    held = [tables.table(t.shm_name) if m is not None else None
            for t, m in zip(segments, mappings)]
    table_addresses = [t.address if t is not None else 0 for t in held]
    if not any(table_addresses):
        return []
    return loc_vouch(keys, written, sizes, checksums, starts, counts, replica_segment,
                     replica_offset, [m.address if m is not None else 0 for m in mappings],
                     table_addresses, [t._replace(capability=b"") for t in segments],
                     CachedShm)


def read_cached(shm, tables: ShmTables, entries: Sequence[CachedShm],
                dsts: Sequence[Any]) -> list[int | None]:
    """Copy each entry's range into the start of its destination (a writable buffer or CPU
    tensor, at least its size) through ``shm``'s mappings (ShmTransport: one link check per
    segment) while the guards hold; per entry the bytes written (verified), or None where
    the caller must ask the master (guards, destination, digest: read_ranges says no)."""
    segment_index: dict[str, int] = {}
    segments: list[Target] = []
    replica_segment: list[int] = []
    for entry in entries:
        name = entry.segment.shm_name
        index = segment_index.get(name)
        if index is None:
            index = segment_index[name] = len(segments)
            segments.append(entry.segment)
        replica_segment.append(index)
    mappings = shm.segment_mappings(segments)
    held = [tables.table(t.shm_name) if m is not None else None
            for t, m in zip(segments, mappings)]
    num = len(entries)
    torch = sys.modules.get("torch")
    written, _ = read_ranges(
        dsts if type(dsts) is list else list(dsts), [e.size_bytes for e in entries],
        [e.checksum for e in entries], list(range(num)), [1] * num, replica_segment,
        [e.offset for e in entries],
        [m.address if m is not None else 0 for m in mappings],
        [m.size_bytes if m is not None else 0 for m in mappings],
        True, EMPTY_CHECKSUM,
        [m.populator.chunk_flags if m is not None else None for m in mappings],
        POPULATE_CHUNK_BYTES, None if torch is None else torch.Tensor,
        [t.address if t is not None else 0 for t in held],
        [e.seq for e in entries], [e.epoch for e in entries])
    # NOTE: held until the copies are done: they keep the segments and tables mapped
    del mappings, held
    return written
