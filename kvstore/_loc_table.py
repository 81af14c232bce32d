"""The shm location table's shape, shared by its writer (kvstore/daemon/shm_locations.py)
and its readers (kvstore/client/shm_locations.py); the words are read and written in C
(``kvstore._copy_hash.loc_*``, csrc/cpu/shm_locations.h, which holds the layout).

One table per DRAM segment, a POSIX shm object named after it (``table_name``): the segment
``/{prefix}-{host}-{pid}-{hex}`` has the table ``/{prefix}.loc-{host}-{pid}-{hex}``, so a
client that maps a segment finds its table with no master call, and the orphan reaper
(daemon/orphans.py) removes a dead daemon's tables as it removes its segments.
"""

from __future__ import annotations

import xxhash

from kvstore._posix_shm import SHM_NAME_RE

HEADER_BYTES = 64
SLOT_BYTES = 48
MAGIC = 0x31544C434F4C564B   # kLocMagic
WORD_MAGIC, WORD_EPOCH, WORD_LEASE, WORD_SLOTS, WORD_PID = range(5)
TABLE_SUFFIX = ".loc"
#: Slots per table: one per 4 KiB of segment, at least 65,536 (3 MiB of shm, touched only
#: where written), at most 4 Mi (192 MiB, for a 16 GiB segment).
MIN_SLOTS, MAX_SLOTS = 1 << 16, 1 << 22


def num_slots_for(segment_bytes: int) -> int:
    return max(MIN_SLOTS, min(MAX_SLOTS, segment_bytes >> 12))


def table_bytes(num_slots: int) -> int:
    return HEADER_BYTES + SLOT_BYTES * num_slots


def table_name(segment_shm_name: str) -> str | None:
    """The location table of the segment named ``segment_shm_name``; None when the name is
    not one ``unique_shm_name`` makes (no table then)."""
    match = SHM_NAME_RE.match(segment_shm_name.lstrip("/"))
    if match is None or match["prefix"].endswith(TABLE_SUFFIX):
        return None
    prefix = match["prefix"]
    return "/" + prefix + TABLE_SUFFIX + segment_shm_name.lstrip("/")[len(prefix):]


def key_hash(key: str) -> int:
    """What a slot records of its object's key: XXH3-64 of its UTF-8 bytes."""
    return xxhash.xxh3_64_intdigest(key.encode())
