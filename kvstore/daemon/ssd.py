"""The SSD tier backend: one preallocated data file, direct I/O, an index that survives restarts.

Parts: the directory's files and the checks at start (``kvstore.daemon.ssd_files``), the
index log (``kvstore.daemon.ssd_index``), block-aligned direct I/O
(``kvstore.daemon.aligned_io``: the master aligns extents to 64 bytes, so a block shared by
two objects is read, patched and written under a lock) and the codec's frames
(``kvstore.daemon.ssd_frames``). This module keeps the objects: which key lies where, what
the index must record, and when it is durable (``sync``).

Codec (``--ssd-codec lz4``): what ``write_from`` receives is cut into "frames" of at most
CHUNK_BYTES (8 MiB), what ``write_stream`` receives (the data plane) into STREAM_CHUNK_BYTES
(1 MiB) frames compressed and written on the I/O threads while the next arrives; each frame
is compressed with lz4 (block format) and, if that saves at least an eighth, stored
compressed at the start of the piece's own range; otherwise raw. A freed object's frames
stay known until a write covers its range (``note_freed``: the master may name the range
again unwritten, inclusive tiers). NOTE: how compressed objects fit the master's extents: the master
allocates raw sizes and never learns of the compression, so a compressed frame simply uses
the head of its raw-size range and the rest stays unused: lz4 saves disk bandwidth (fewer
blocks written and read), not capacity. The frames of an object (offset in the extent, raw
and stored size) are kept in memory and in its index record; reads decompress whole frames
and return raw bytes, so clients and the master never see the codec.

A data file created at this start is pre-written with zeros in the background
(``kvstore.daemon.ssd_prewrite``: puts then write into written extents, no conversion per
write), and a pass a stop cut short is resumed at the next start, after the recovered
objects' extents are claimed; every write claims its range from the pre-writer first, so
no zero lands on a put's bytes.

At start (``open``) the index is replayed, every object's bytes are read back and checked
against the XXH3-64 checksum the client recorded; an object whose extent does not match, lies
outside the file or overlaps another is dropped (logged), never served. The survivors are
``recovered`` (re-registered as the node's inventory) and the index is compacted.

Errors: ConfigError at start for an unusable directory, a size that differs from the one the
directory was created with, or a directory locked by another daemon. I/O errors later raise
OSError to the caller (the data plane ends that connection).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import lz4.block

from kvstore._errors import ConfigError
from kvstore.client.checksum import EMPTY_CHECKSUM, checksum as xxh3
from kvstore.daemon.aligned_io import CHUNK_BYTES, AlignedFile
from kvstore.daemon.backends import Backend
from kvstore.daemon.ssd_files import (DATA_NAME, INDEX_NAME, check_meta, open_data,
                                      read_prewrite_progress, replay_index,
                                      save_prewrite_progress, take_lock)
from kvstore.daemon.ssd_frames import FramedFile, FrameMap
from kvstore.daemon.ssd_index import KIND_ADD, KIND_DROP, IndexEntry, encode_record
from kvstore.daemon.ssd_prewrite import Prewriter
from kvstore.tiers import Tier

CODECS = ("none", "lz4")

log = logging.getLogger("kvstore.daemon.ssd")


class SsdBackend(Backend):
    """An SSD segment in ``directory`` of ``size_bytes`` (see the module docstring)."""

    tier = Tier.SSD

    def __init__(self, segment_id: str, size_bytes: int, *, directory: str, node_id: str,
                 direct_io: bool = True, codec: str = "none"):
        if codec not in CODECS:
            raise ConfigError(f"--ssd-codec must be one of {', '.join(CODECS)}, got {codec!r}")
        self._compress = codec == "lz4"
        self._directory = Path(directory)
        data_path = self._directory / DATA_NAME
        super().__init__(segment_id, size_bytes, path=str(data_path))
        self._lock = threading.Lock()
        self._key_to_entry: dict[str, IndexEntry] = {}
        self._offsets: list[int] = []          # sorted offsets of live entries
        self._offset_to_key: dict[int, str] = {}
        self._pending: list[bytes] = []        # records not yet appended
        # group commit (``sync``): rounds of appended records, the last one synced
        self._appended_round = self._synced_round = 0
        self._syncing = False
        self._synced = threading.Condition(self._lock)
        self._frames = FrameMap()              # guarded by self._lock
        self._lock_fd = self._data_fd = self._index_fd = -1
        self._file: AlignedFile | None = None
        # zeros over a data file created now (ssd_prewrite.py); None: none (any more)
        self.prewriter: Prewriter | None = None
        self._framed: FramedFile | None = None
        self.recovered: list[IndexEntry] = []
        self.num_dropped_at_start = 0
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = take_lock(self._directory)
            check_meta(self._directory, self.size_bytes, node_id)
            self._data_fd, self.direct_io, created = open_data(data_path, self.size_bytes,
                                                               direct_io)
            self._file = AlignedFile(self._data_fd, direct=self.direct_io)
            self._framed = FramedFile(self._file, self._frames, self._lock)
            self._recover()
            self._index_fd = os.open(self._directory / INDEX_NAME,
                                     os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            if self.direct_io:
                self._start_prewriter(created)
        except BaseException:
            self.close()
            raise

    # ---- start ---------------------------------------------------------------------------

    def _start_prewriter(self, created: bool) -> None:
        """Pre-write a data file created now, or resume the unfinished pre-write a previous
        start noted (``ssd_prewrite``), the recovered objects' extents claimed first so no
        zero lands on them."""
        start_bytes = 0 if created else read_prewrite_progress(self._directory)
        if start_bytes is None:
            return
        file_bytes = os.fstat(self._data_fd).st_size
        directory = self._directory
        if created:
            save_prewrite_progress(directory, 0, file_bytes)
        self.prewriter = Prewriter(
            self._file, file_bytes, start_bytes=start_bytes,
            save_progress=lambda next_bytes: save_prewrite_progress(directory, next_bytes,
                                                                    file_bytes))
        for entry in self.recovered:
            self.prewriter.claim(entry.offset, entry.length)
        self.prewriter.start()

    def _recover(self) -> None:
        kept, self.num_dropped_at_start = replay_index(str(self._directory / INDEX_NAME),
                                                       self._check_entry)
        for entry in kept:
            self._insert(entry)
        self.recovered = kept

    def _check_entry(self, entry: IndexEntry, previous_end: int) -> str:
        """"" if ``entry``'s bytes are in the file and match its checksum, else the reason
        to drop it (its frames then forgotten)."""
        if entry.length <= 0 or not self.check_range(entry.offset, entry.length):
            return "outside the data file"
        if entry.offset < previous_end:
            return "overlaps another object"
        if any(relative + raw_bytes > entry.length or stored_bytes > raw_bytes
               for relative, raw_bytes, stored_bytes in entry.frames):
            return "a compressed frame outside the object"
        for relative, raw_bytes, stored_bytes in entry.frames:
            self._frames.add(entry.offset + relative, raw_bytes, stored_bytes)
        data = bytearray(entry.length)
        try:
            self.read_into(entry.offset, memoryview(data))
        except (OSError, lz4.block.LZ4BlockError) as exc:
            self._frames.forget(entry.offset, entry.length)
            return f"unreadable: {exc}"
        actual = xxh3(data)
        if actual != entry.checksum and not (entry.length == 1 and entry.checksum ==
                                             EMPTY_CHECKSUM and data == b"\0"):
            self._frames.forget(entry.offset, entry.length)
            return f"checksum mismatch (extent corrupt or overwritten: {actual:#x} != " \
                   f"{entry.checksum:#x})"
        return ""

    # ---- index ---------------------------------------------------------------------------

    def _insert(self, entry: IndexEntry) -> None:
        for relative, raw_bytes, stored_bytes in entry.frames:
            self._frames.add(entry.offset + relative, raw_bytes, stored_bytes)
        self._key_to_entry[entry.key] = entry
        bisect.insort(self._offsets, entry.offset)
        self._offset_to_key[entry.offset] = entry.key
        self.used_bytes += entry.length

    def _remove(self, entry: IndexEntry, *, forget_frames: bool = True) -> None:
        if forget_frames:
            self._frames.forget(entry.offset, entry.length)
        del self._key_to_entry[entry.key]
        index = bisect.bisect_left(self._offsets, entry.offset)
        if index < len(self._offsets) and self._offsets[index] == entry.offset:
            del self._offsets[index]
        self._offset_to_key.pop(entry.offset, None)
        self.used_bytes = max(0, self.used_bytes - entry.length)

    def note_stored(self, key: str, offset: int, length: int, checksum: int,
                    codec: int) -> None:
        with self._lock:
            entry = IndexEntry(key, offset, length, checksum, codec,
                               self._frames.frames_within(offset, length))
            old = self._key_to_entry.get(key)
            if old is not None:
                self._remove(old)
                self._pending.append(encode_record(KIND_DROP, old))
            self._drop_overlapping(offset, length)
            self._insert(entry)
            self._pending.append(encode_record(KIND_ADD, entry))

    def note_freed(self, key: str, offset: int, length: int) -> None:
        with self._lock:
            entry = self._key_to_entry.get(key)
            if entry is not None and entry.offset == offset:
                # NOTE: the frames stay: the master may keep the range as an inclusive copy
                # of a promoted object and switch back to it (master/tiering.py) with no
                # write; any write over the range forgets them first
                self._remove(entry, forget_frames=False)
                self._pending.append(encode_record(KIND_DROP, entry))

    def note_reset(self) -> None:
        with self._lock:
            for entry in list(self._key_to_entry.values()):
                # NOTE: the frames stay: the master resends the entries that still hold
                self._remove(entry, forget_frames=False)
                self._pending.append(encode_record(KIND_DROP, entry))

    SYNCS = True

    def sync(self) -> None:
        """Make the data and the index records noted so far durable; returns once both are
        (the durability point of an SSD put, see docs/ARCHITECTURE.md, "SSD durability").

        Group commit: the pending records are appended, then one caller at a time (the
        leader) fdatasyncs the data file and the index at once, outside the lock; a caller
        arriving meanwhile waits for that round and, if its records came after the round
        began, leads or joins the next, so concurrent callers share syncs and every
        caller's records are durable when it returns. NOTE: the two fdatasyncs run in
        parallel, not data-then-index: measured 0.5-1.9 ms against 1.9-13.9 ms per put on
        the build machine's ext4 (bench/RESULTS.md, issue 9), likely because one journal
        commit then serves both. An ``add`` record may therefore reach the disk before its
        bytes (a crash inside this call): at start every record's bytes are checked against
        its checksum, so such an object, whose put was never acknowledged, is dropped, never
        served. Errors: OSError of the write or a sync (nothing counts as synced then)."""
        with self._lock:
            if self._pending:
                records, self._pending = b"".join(self._pending), []
                os.write(self._index_fd, records)
                self._appended_round += 1
            target = self._appended_round
            while self._synced_round < target:
                if self._syncing:
                    self._synced.wait()
                    continue
                self._syncing, round_ = True, self._appended_round
                self._lock.release()
                try:
                    data_synced = self._file.datasync_in_background()
                    try:
                        os.fdatasync(self._index_fd)
                    finally:
                        data_synced.result()
                    synced = True
                finally:
                    self._lock.acquire()
                    self._syncing = False
                    self._synced.notify_all()
                if synced:
                    self._synced_round = max(self._synced_round, round_)

    def _append_pending(self) -> None:
        """Append and fdatasync the pending records now (under the lock): the drops that
        must be durable before an overwrite. The adds among them still wait for ``sync``
        to sync their data."""
        records, self._pending = b"".join(self._pending), []
        os.write(self._index_fd, records)
        os.fdatasync(self._index_fd)
        self._appended_round += 1

    def _drop_overlapping(self, offset: int, length: int) -> bool:
        """Drop (under the lock) live entries overlapping [offset, +length); True if any."""
        index = bisect.bisect_left(self._offsets, offset)
        if index > 0:
            index -= 1  # the entry before may reach into the range
        victims = []
        while index < len(self._offsets) and self._offsets[index] < offset + length:
            entry = self._key_to_entry[self._offset_to_key[self._offsets[index]]]
            if entry.offset + entry.length > offset:
                victims.append(entry)
            index += 1
        for entry in victims:
            self._remove(entry)
            self._pending.append(encode_record(KIND_DROP, entry))
        return bool(victims)

    def used_entries(self) -> list[IndexEntry]:
        with self._lock:
            return list(self._key_to_entry.values())

    # ---- I/O -----------------------------------------------------------------------------

    def write_from(self, offset: int, src: memoryview) -> None:
        length = len(src)
        if not length:
            return
        self._claim(offset, length)
        self._drop_before_overwrite(offset, length)
        if not self._compress:
            self._framed.forget_raw(offset, length)
            self._file.write(offset, src)
            return
        # NOTE: frames of at most CHUNK_BYTES, so a read of a piece decompresses little more
        # than the piece, whoever the writer (the data plane's 8 MiB pieces, a whole-object
        # tier move)
        for start in range(0, length, CHUNK_BYTES):
            self._framed.write_frame(offset + start, src[start:start + CHUNK_BYTES])

    def write_stream(self, offset: int, length: int,
                     fill: Callable[[memoryview], None]) -> None:
        """Pipelined: the pieces are filled in place while earlier ones are written
        (``AlignedFile.write_stream``), or, with the codec, compressed and written on the
        file's I/O threads (``FramedFile.write_stream``)."""
        if not length:
            return
        self._claim(offset, length)
        self._drop_before_overwrite(offset, length)
        if self._compress:
            self._framed.write_stream(offset, length, fill)
            return
        self._framed.forget_raw(offset, length)
        self._file.write_stream(offset, length, fill)

    def _claim(self, offset: int, length: int) -> None:
        """Keep the pre-writer's zeros off [offset, +length) (waits while it zeroes a
        region the range touches; the regions of a fresh file are 8 MiB)."""
        if self.prewriter is not None:
            self.prewriter.claim(offset, length)

    def _drop_before_overwrite(self, offset: int, length: int) -> None:
        """Drop, durably, the index records of the objects [offset, +length) overlaps.
        NOTE: the master may hand out an extent again before we hear it was freed; the old
        object's index record must go (durably) before its bytes are overwritten."""
        with self._lock:
            if self._drop_overlapping(offset, length):
                self._append_pending()

    def read_stream(self, offset: int, length: int,
                    drain: Callable[[memoryview], None]) -> None:
        """Pipelined: pieces read ahead while earlier ones are drained
        (``AlignedFile.read_stream``), or, where compressed frames overlap the range, whole
        frames read and decompressed ahead on the I/O threads (``FramedFile.read_stream``)."""
        self._framed.read_stream(offset, length, drain)

    def read_into(self, offset: int, dst: memoryview) -> None:
        self._framed.read_into(offset, dst)

    def close(self) -> None:
        """Sync what is pending and close the files; the files stay (they survive restarts)."""
        if self.prewriter is not None:
            self.prewriter.close()
        if self._index_fd >= 0:
            try:
                self.sync()
            except OSError as exc:
                log.warning("SSD: final index sync failed: %s", exc)
        if self._file is not None:
            self._file.close()
        for name in ("_index_fd", "_data_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
