"""``ShmLocationTable``: a DRAM segment's objects published in shared memory, so a same-host
client can serve a repeated get from the mapped segment without the master (issue 15, 15s).

Why: a same-host get is GetReplicas plus one memcpy; the master hop was 29% of a 4 MiB
``get_into``. With no daemon in a shm read's path, the daemon leaves the client what the
location lease of ``location_reads.py`` decides for a CHECKED_READ, in a table the client
maps beside the segment (layout: csrc/cpu/shm_locations.h; name: kvstore/_loc_table.py):

- per object a slot (a hash of its offset) with a seqlock word, the table's epoch, the
  key's hash, the range and the checksum. The backend's ``note_stored`` publishes it and
  ``note_freed`` empties it, both called by ``ObjectTable`` under its lock while it applies
  the change (a remove, an eviction, a replace, a move to another tier), so before the daemon
  confirms the change to the master. ``note_reset`` (a full resync) bumps the epoch, which
  voids every slot at once.
- the lease: ``set_lease`` with the instant (CLOCK_MONOTONIC, one clock on one host) up to
  which ``LocationReads`` would serve a CHECKED_READ; 0 whenever it would refuse them all
  (a registration, --commit-timeout 0, a master that grants none).

Guarantee (the client's half: client/shm_locations.py): a client that cached a slot's
sequence while it named the key's object at that range, and finds the sequence unchanged,
the epoch unchanged and the lease running before and after its copy, copied bytes of an
object that this daemon's table still held when the copy began, with every removal the
master may have completed already applied. Errors: OSError from ``create`` (no room in
/dev/shm); nothing else raises. ``close`` zeroes the lease before unlinking the name, so a
client that still maps the table refuses from then on; ``retire_dead_tables`` does the
same for the tables of daemons that died without closing (called at start, before the
segments and the registration). Single writer: every call but ``set_lease`` runs under the
object table's lock; ``set_lease`` writes one word.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from kvstore import _copy_hash as _c
from kvstore import _loc_table as lt
from kvstore._posix_shm import SHM_NAME_RE, create_shm, host_tag, open_shm

log = logging.getLogger("kvstore.daemon.shm_locations")

class ShmLocationTable:
    """The published slots and the lease of one DRAM segment (see the module)."""

    def __init__(self, segment_shm_name: str, segment_bytes: int):
        name = lt.table_name(segment_shm_name)
        if name is None:
            raise ValueError(f"{segment_shm_name!r} is not a name unique_shm_name makes")
        num_slots = lt.num_slots_for(segment_bytes)
        # NOTE: prefault=True for its free-space check (an OSError naming /dev/shm): every
        # page is touched below, and a page tmpfs cannot supply would be a SIGBUS
        self._shm = create_shm(name, lt.table_bytes(num_slots), prefault=True)
        self.name = name
        self._address = int(np.frombuffer(self._shm.view, dtype=np.uint8).ctypes.data)
        self._epoch = 1
        _c.loc_set(self._address, lt.WORD_SLOTS, num_slots)
        _c.loc_set(self._address, lt.WORD_PID, os.getpid())
        _c.loc_set(self._address, lt.WORD_EPOCH, self._epoch)
        # NOTE: every page touched now, not by the first publish into it: a slot is a hash
        # of its object's offset, so nearly every new object's publish touched a page no
        # one had written, and that first-touch fault (a tmpfs page allocated and zeroed,
        # ~4 us of CPU, 26-35 us of wall time at load 21) was 20-30% of a ring drain and on
        # every WRITE_COMMIT's reply (issue 10, 10d2; issue 15, 15u: the daemon's share of
        # the tcp put regression; bench/RESULTS.md, "TCP 64 KiB put in two round trips").
        # At start, before the daemon listens: a 16 GiB segment's table is 192 MiB.
        _c.loc_prefault(self._address, lt.table_bytes(num_slots))
        _c.loc_set(self._address, lt.WORD_MAGIC, lt.MAGIC)   # NOTE: last: the table is whole

    def stored(self, key: str, offset: int, length: int, checksum: int) -> None:
        if self._address:
            _c.loc_publish(self._address, offset, self._epoch, lt.key_hash(key), length,
                           checksum)

    def stored_many(self, keys: list[str], offsets: list[int], lengths: list[int],
                    checksums: list[int]) -> None:
        """``stored`` of each object (parallel lists), in one call."""
        if self._address:
            _c.loc_publish_many(self._address, self._epoch, keys, offsets, lengths, checksums)

    def freed(self, offset: int) -> None:
        if self._address:
            _c.loc_clear(self._address, offset)

    def reset(self) -> None:
        """Every object forgotten (a full resync): a new epoch voids every slot."""
        if self._address:
            self._epoch += 1
            _c.loc_set(self._address, lt.WORD_EPOCH, self._epoch)

    def set_lease(self, until_ns: int) -> None:
        """Clients may serve cached reads until ``until_ns`` (CLOCK_MONOTONIC); 0: none."""
        if self._address:
            _c.loc_set(self._address, lt.WORD_LEASE, max(0, until_ns))

    def close(self) -> None:
        """Zero the lease, unlink the name, unmap. Idempotent."""
        if not self._address:
            return
        _c.loc_set(self._address, lt.WORD_LEASE, 0)
        self._address = 0
        self._shm.unlink()
        self._shm.close()


def retire_dead_tables(shm_dir: str = "/dev/shm") -> list[str]:
    """Zero the lease of every location table on this machine whose creator is dead (a
    daemon killed without ``close``); return their names. NOTE: before this daemon creates
    its segments and registers: its registration drops the objects the dead one held, and a
    client still mapping the dead one's segment must refuse it by then, reaping or not.
    Never raises."""
    retired = []
    try:
        entries = list(Path(shm_dir).iterdir())
    except OSError:
        return retired
    for path in entries:
        match = SHM_NAME_RE.match(path.name)
        if (match is None or not match["prefix"].endswith(lt.TABLE_SUFFIX)
                or match["host"] != host_tag() or _alive(int(match["pid"]))):
            continue
        try:
            shm = open_shm("/" + path.name)
        except OSError:
            continue
        try:
            if len(shm.view) >= lt.HEADER_BYTES:
                shm.view[8 * lt.WORD_LEASE:8 * lt.WORD_LEASE + 8] = bytes(8)
                retired.append(path.name)
        finally:
            shm.close()
    return retired


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
