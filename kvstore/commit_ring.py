"""The commit ring: a daemon-owned shared-memory object where same-host writers append the
commits of their shm puts (durable commit without waking the daemon; issue 10).

Why: a CLIENT_COMMIT frame makes the daemon process run before the put returns, and on a
loaded host that wake-up costs a few hundred microseconds. A record appended here is durable
the moment it is written: it lies in the daemon's own shared memory, which outlives the
writer and the master (if the daemon dies, its DRAM bytes are gone anyway). The daemon
drains the ring (``RingReader.drain``) and applies every record with exactly the checks of a
CLIENT_COMMIT (``kvstore/daemon/client_commits.py``).

Layout (little-endian; ``REGIONS`` regions of ``REGION_BYTES`` each)::

    header (64 B): magic "KVRING01" | num_regions u32 | region_bytes u32
    write_pos[num_regions] u64        (at 64; written by each region's writer only)
    read_pos[num_regions] u64         (after it; written by the daemon only)
    data regions                      (page-aligned; region i at DATA_OFFSET + i * region_bytes)

Writers: a process claims one region for its life with an exclusive POSIX record lock on
byte ``LOCK_BASE + i`` of the object (``fcntl.lockf``, non-blocking); the kernel drops the
lock when the process dies, so a region is never shared by two live writers and a dead
writer's region is taken over where its ``write_pos`` stands. Threads of one process
serialize on a lock. A region is a single-producer single-consumer ring: positions only
grow, a byte's place is ``pos % region_bytes``.

Record: ``length u32 | crc32 u32 | writer_len u16 | writer | ClientCommit body``, padded to
8 bytes; ``length`` counts from ``writer_len``, the CRC covers the same bytes. The writer
copies the record, then publishes the new ``write_pos`` with one aligned 8-byte store, so a
writer killed mid-append leaves a record past ``write_pos`` that no reader sees (the next
owner overwrites it). NOTE: x86-64 keeps stores in program order (TSO), and CPython performs
these stores in order; on a weaker memory model a fence would be needed before publishing,
so a daemon on another machine type creates no ring (``server.RING_MACHINES``).
A record whose length or CRC does not check (torn or scribbled) is dropped with the rest of
its region's published bytes (its framing cannot be trusted) and counted; never applied.

Trust: the object is mode 0600 like the segments, so only the daemon's user maps it; each
entry still needs the put's write capability, verified by the daemon with its secret.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from typing import Callable

from kvstore._posix_shm import SharedSegment, create_shm, open_shm

MAGIC = b"KVRING01"
HEADER = struct.Struct("<8sII")
RECORD = struct.Struct("<IIH")          # length, crc32, writer length
#: Regions (concurrent writer processes) per ring, and bytes per region. NOTE: a batch of
#: 128 keys is a ~25 KiB record and the daemon drains every DRAIN_INTERVAL_S, so 1 MiB
#: holds what a writer appends in far more than one interval; 32 writers cover one host's
#: engine workers. A writer that finds no free region or no room falls back to CLIENT_COMMIT.
REGIONS = 32
REGION_BYTES = 1 << 20
#: Where the writer locks live (bytes of the header page no one writes): region i's lock is
#: byte LOCK_BASE - i, above the positions of at most MAX_REGIONS regions.
LOCK_BASE = 4096 - 64
MAX_REGIONS = 128
POS_OFFSET = 64
SHM_DIR = "/dev/shm"


def _data_offset(num_regions: int) -> int:
    end = POS_OFFSET + 16 * num_regions
    return max(4096, (end + 4095) // 4096 * 4096)


def ring_bytes(num_regions: int = REGIONS, region_bytes: int = REGION_BYTES) -> int:
    return _data_offset(num_regions) + num_regions * region_bytes


class RingLayout:
    """Views of a mapped ring's positions and regions (either side)."""

    def __init__(self, segment: SharedSegment):
        view = segment.view
        magic, num_regions, region_bytes = HEADER.unpack_from(view, 0)
        if magic != MAGIC or not 0 < num_regions <= MAX_REGIONS or region_bytes % 8 or \
                len(view) < ring_bytes(num_regions, region_bytes):
            raise ValueError(f"{segment.name} is not a commit ring")
        self.segment = segment
        self.num_regions = num_regions
        self.region_bytes = region_bytes
        positions = view[POS_OFFSET:POS_OFFSET + 16 * num_regions]
        self.write_bytes = positions[:8 * num_regions]   # raw, for a cheap "any news?"
        self.read_bytes = positions[8 * num_regions:]
        positions = positions.cast("Q")
        self.write_pos = positions[:num_regions]
        self.read_pos = positions[num_regions:]
        self.data_offset = _data_offset(num_regions)
        self.view = view

    def region(self, index: int) -> memoryview:
        start = self.data_offset + index * self.region_bytes
        return self.view[start:start + self.region_bytes]


def _copy_in(region: memoryview, pos: int, data: bytes) -> None:
    size = len(region)
    at = pos % size
    first = min(len(data), size - at)
    region[at:at + first] = data[:first]
    if first < len(data):
        region[:len(data) - first] = data[first:]


def _copy_out(region: memoryview, pos: int, length: int) -> bytes:
    size = len(region)
    at = pos % size
    first = min(length, size - at)
    if first == length:
        return bytes(region[at:at + length])
    return bytes(region[at:]) + bytes(region[:length - first])


def encode_record(writer: str, body: bytes) -> bytes:
    """One record (padded to 8 bytes) carrying ``body`` (a serialized ClientCommit)."""
    name = writer.encode()
    payload = struct.pack("<H", len(name)) + name + body
    record = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    return record + b"\0" * (-len(record) % 8)


# ---- the daemon's side --------------------------------------------------------------------

class RingReader:
    """The daemon's ring: created at start (mode 0600, ``O_EXCL``), unlinked at ``close``.

    ``drain(apply)`` hands each intact record to ``apply(writer, body)`` in append order
    per region and frees its space; torn records are counted in ``num_torn``. Thread-safe:
    one drain at a time."""

    def __init__(self, name: str, *, num_regions: int = REGIONS,
                 region_bytes: int = REGION_BYTES):
        self._segment = create_shm(name, ring_bytes(num_regions, region_bytes),
                                   prefault=False)
        HEADER.pack_into(self._segment.view, 0, MAGIC, num_regions, region_bytes)
        self.layout = RingLayout(self._segment)
        self.name = self._segment.name
        self._lock = threading.Lock()
        self.num_records = 0
        self.num_torn = 0

    def pending(self) -> bool:
        """True if some writer published a record not drained yet (cheap: no lock).
        NOTE: two byte copies compared (~0.7 us for 32 regions) rather than the positions
        one by one (~10 us): the data plane asks before every checked WRITE."""
        layout = self.layout
        return bytes(layout.write_bytes) != bytes(layout.read_bytes)

    def drain(self, apply: Callable[[str, bytes], None]) -> int:
        """Apply every published record; return how many were applied."""
        layout = self.layout
        applied = 0
        with self._lock:
            write_pos, read_pos = layout.write_pos, layout.read_pos
            for i in range(layout.num_regions):
                end, pos = write_pos[i], read_pos[i]
                if end == pos:
                    continue
                region = layout.region(i)
                records = []
                if not 0 < end - pos <= layout.region_bytes:
                    self.num_torn += 1
                else:
                    records = self._parse(region, pos, end)
                # NOTE: freed before applying: the records are copied out, and a writer may
                # reuse the space while the table applies them
                read_pos[i] = end
                for writer, body in records:
                    apply(writer, body)
                    applied += 1
            self.num_records += applied
        return applied

    def _parse(self, region: memoryview, pos: int, end: int) -> list[tuple[str, bytes]]:
        records = []
        while pos < end:
            if end - pos < RECORD.size:
                self.num_torn += 1
                break
            length, crc = struct.unpack("<II", _copy_out(region, pos, 8))
            total = 8 + length + (-(8 + length) % 8)
            if length < 2 or pos + total > end:
                self.num_torn += 1
                break
            payload = _copy_out(region, pos + 8, length)
            if zlib.crc32(payload) != crc:
                self.num_torn += 1
                break
            (name_len,) = struct.unpack_from("<H", payload)
            if 2 + name_len > length:
                self.num_torn += 1
                break
            records.append((payload[2:2 + name_len].decode(errors="replace"),
                            payload[2 + name_len:]))
            pos += total
        return records

    def close(self) -> None:
        """Unlink the name and unmap (idempotent)."""
        segment, self._segment = self._segment, None
        if segment is not None:
            self.layout = None
            segment.unlink()
            segment.close()


# ---- a writer's side ----------------------------------------------------------------------

_writers_lock = threading.Lock()
_name_to_writer: dict[str, "RingWriter"] = {}


def writer_for(name: str) -> "RingWriter":
    """This process's one writer of ring ``name`` (opened on first use; kept for the
    process's life, or until the name is unlinked). NOTE: one per process, not one per
    store: POSIX record locks belong to the process, so two handles in one process would
    both "claim" the same region, and closing either would release the other's lock."""
    with _writers_lock:
        writer = _name_to_writer.get(name)
        if writer is None:
            for gone in [n for n, w in _name_to_writer.items() if w.unlinked()]:
                del _name_to_writer[gone]    # NOTE: its file stays open: see close()
            writer = _name_to_writer[name] = RingWriter(name)
        return writer


class RingWriter:
    """A writer process's handle on one daemon's ring (see the module docstring); get it
    with ``writer_for``.

    ``append`` returns False, changing nothing a reader sees, when the record cannot go in
    (no free region, no room, the ring's name gone: its daemon stopped); the caller then
    sends CLIENT_COMMIT. Errors mapping the ring raise OSError / ValueError from ``open``.
    Thread-safe."""

    def __init__(self, name: str):
        self.name = name
        self._file = open(f"{SHM_DIR}{name}", "r+b", buffering=0)
        try:
            self.layout = RingLayout(open_shm(name))
        except BaseException:
            self._file.close()
            raise
        self._lock = threading.Lock()
        self._region = -1
        self._pid = -1

    def unlinked(self) -> bool:
        return os.fstat(self._file.fileno()).st_nlink == 0

    # NOTE: a process must not open and close another descriptor of the ring's file while
    # it writes (POSIX drops all of a process's record locks on that file at any close);
    # this class keeps the only one (``open_shm`` closes its descriptor before the claim).
    def _claim(self) -> bool:
        # NOTE: a forked child holds none of its parent's locks: claim again
        self._region, self._pid = -1, os.getpid()
        for i in range(self.layout.num_regions):
            try:
                fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1,
                            LOCK_BASE - i, os.SEEK_SET)
            except OSError:
                continue
            self._region = i
            return True
        return False

    def append(self, record: bytes) -> bool:
        """Append one ``encode_record`` result; True once it is published."""
        with self._lock:
            # NOTE: claimed again when none was free before (a writer may have exited since)
            if (self._pid != os.getpid() or self._region < 0) and not self._claim():
                return False
            if self.unlinked():
                return False
            layout, i = self.layout, self._region
            pos = layout.write_pos[i]
            if len(record) > layout.region_bytes - (pos - layout.read_pos[i]):
                return False
            _copy_in(layout.region(i), pos, record)
            layout.write_pos[i] = pos + len(record)
            return True

    # NOTE: no close(): the file is closed (and the region's lock released) when the last
    # reference goes, after any append that holds it.
