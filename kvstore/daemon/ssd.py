"""The SSD tier backend: one preallocated data file, direct I/O, an index that survives restarts.

Files in the ``--ssd`` directory (stable names, so a restarted daemon finds them; the orphan
reaper only removes names that embed a dead pid, never these):

- ``kvstore-ssd.data``: the extents, at the offsets the master's allocator hands out.
  Preallocated (posix_fallocate) at first start. Opened with O_DIRECT where the filesystem
  allows (tmpfs does not), I/O in whole blocks (``kvstore.daemon.aligned_io``: the master
  aligns extents to 64 bytes, so a block shared by two objects is read, patched and written
  under a lock). Otherwise it falls back to buffered pread/pwrite and says so in the log.
- ``kvstore-ssd.index``: committed objects (``kvstore.daemon.ssd_index``).
- ``kvstore-ssd.json``: format, size and the node id that owns the directory.
- ``kvstore-ssd.lock``: an flock held while a daemon uses the directory (a second daemon on
  the same directory fails at start).

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
import fcntl
import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import lz4.block

from kvstore._errors import ConfigError
from kvstore.client.checksum import EMPTY_CHECKSUM, checksum as xxh3
from kvstore.daemon.aligned_io import (BLOCK_BYTES, CHUNK_BYTES, STREAM_CHUNK_BYTES,
                                       STREAM_DEPTH, AlignedFile, wait_all, open_direct)
from kvstore.daemon.backends import Backend
from kvstore.daemon.ssd_index import (KIND_ADD, KIND_DROP, IndexEntry, encode_record,
                                      load_index, write_compacted)
from kvstore.tiers import Tier

CODECS = ("none", "lz4")
#: a frame is stored compressed only if that saves at least this fraction of its bytes
MIN_SAVING_FRACTION = 1 / 8
MIN_FRAME_BYTES = 4096

log = logging.getLogger("kvstore.daemon.ssd")

DATA_NAME = "kvstore-ssd.data"
INDEX_NAME = "kvstore-ssd.index"
META_NAME = "kvstore-ssd.json"
LOCK_NAME = "kvstore-ssd.lock"
FORMAT_VERSION = 1


def recorded_node_id(directory: str) -> str | None:
    """The node id that owns ``directory`` (from a previous start), or None."""
    try:
        return json.loads((Path(directory) / META_NAME).read_text())["node_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        self._local = threading.local()        # per-thread staging of the codec's stream
        self._key_to_entry: dict[str, IndexEntry] = {}
        self._offsets: list[int] = []          # sorted offsets of live entries
        self._offset_to_key: dict[int, str] = {}
        self._pending: list[bytes] = []        # records not yet appended
        # group commit (``sync``): rounds of appended records, the last one synced
        self._appended_round = self._synced_round = 0
        self._syncing = False
        self._synced = threading.Condition(self._lock)
        self._frame_offsets: list[int] = []    # sorted starts of compressed frames
        self._frames: dict[int, tuple[int, int]] = {}  # start -> (raw bytes, stored bytes)
        self._lock_fd = self._data_fd = self._index_fd = -1
        self._file: AlignedFile | None = None
        self.recovered: list[IndexEntry] = []
        self.num_dropped_at_start = 0
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            self._check_meta(node_id)
            self._open_data(data_path, direct_io)
            self._recover()
            self._index_fd = os.open(self._directory / INDEX_NAME,
                                     os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        except BaseException:
            self.close()
            raise

    # ---- start ---------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self._lock_fd = os.open(self._directory / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(f"--ssd: directory {str(self._directory)!r} is in use by another "
                              f"daemon") from exc

    def _check_meta(self, node_id: str) -> None:
        meta_path = self._directory / META_NAME
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError as exc:
                raise ConfigError(f"--ssd: unreadable {meta_path}: {exc}") from exc
            if meta.get("format") != FORMAT_VERSION or meta.get("size_bytes") != self.size_bytes:
                raise ConfigError(
                    f"--ssd: {str(self._directory)!r} holds a store of {meta.get('size_bytes')} "
                    f"bytes (format {meta.get('format')}); start with that size or an empty "
                    f"directory")
            if meta.get("node_id") != node_id:
                log.warning("SSD directory %s belonged to node %s; node %s adopts its objects",
                            self._directory, meta.get("node_id"), node_id)
        meta = {"format": FORMAT_VERSION, "size_bytes": self.size_bytes, "node_id": node_id}
        temporary = meta_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(meta))
        os.chmod(temporary, 0o600)
        os.replace(temporary, meta_path)

    def _open_data(self, data_path: Path, direct_io: bool) -> None:
        file_bytes = -(-self.size_bytes // BLOCK_BYTES) * BLOCK_BYTES
        fd = os.open(data_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if os.fstat(fd).st_size < file_bytes:
                os.ftruncate(fd, file_bytes)
                try:
                    os.posix_fallocate(fd, 0, file_bytes)
                except OSError as exc:
                    raise ConfigError(f"--ssd: cannot allocate {file_bytes} bytes in "
                                      f"{data_path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if direct_io:
            self._data_fd, self.direct_io = open_direct(str(data_path), os.O_RDWR)
        else:
            self._data_fd, self.direct_io = os.open(data_path, os.O_RDWR), False
        if direct_io and not self.direct_io:
            log.warning("SSD %s: O_DIRECT refused by the filesystem; using buffered I/O "
                        "through the page cache", data_path)
        self._file = AlignedFile(self._data_fd, direct=self.direct_io)
        log.info("SSD %s: %d bytes, %s I/O", data_path, self.size_bytes,
                 "direct" if self.direct_io else "buffered")

    def _recover(self) -> None:
        index_path = str(self._directory / INDEX_NAME)
        key_to_entry, num_bad = load_index(index_path)
        if num_bad:
            log.warning("SSD index %s: %d corrupt or torn record(s) skipped", index_path,
                        num_bad)
        kept: list[IndexEntry] = []
        end = 0
        for entry in sorted(key_to_entry.values(), key=lambda e: e.offset):
            reason = self._check_entry(entry, end)
            if reason:
                self.num_dropped_at_start += 1
                log.warning("SSD: dropping object %r at [%d, +%d): %s", entry.key,
                            entry.offset, entry.length, reason)
                continue
            kept.append(entry)
            end = entry.offset + entry.length
        write_compacted(index_path, kept)
        for entry in kept:
            self._insert(entry)
        self.recovered = kept
        if key_to_entry:
            log.info("SSD: recovered %d object(s), dropped %d", len(kept),
                     self.num_dropped_at_start + num_bad)

    def _check_entry(self, entry: IndexEntry, previous_end: int) -> str:
        if entry.length <= 0 or not self.check_range(entry.offset, entry.length):
            return "outside the data file"
        if entry.offset < previous_end:
            return "overlaps another object"
        if any(relative + raw_bytes > entry.length or stored_bytes > raw_bytes
               for relative, raw_bytes, stored_bytes in entry.frames):
            return "a compressed frame outside the object"
        for relative, raw_bytes, stored_bytes in entry.frames:
            self._add_frame(entry.offset + relative, raw_bytes, stored_bytes)
        data = bytearray(entry.length)
        try:
            self.read_into(entry.offset, memoryview(data))
        except (OSError, lz4.block.LZ4BlockError) as exc:
            self._forget_frames(entry.offset, entry.length)
            return f"unreadable: {exc}"
        actual = xxh3(data)
        if actual != entry.checksum and not (entry.length == 1 and entry.checksum ==
                                             EMPTY_CHECKSUM and data == b"\0"):
            self._forget_frames(entry.offset, entry.length)
            return f"checksum mismatch (extent corrupt or overwritten: {actual:#x} != " \
                   f"{entry.checksum:#x})"
        return ""

    # ---- index ---------------------------------------------------------------------------

    def _frames_in(self, offset: int, length: int) -> list[int]:
        """Starts of the compressed frames that overlap [offset, +length) (under the lock)."""
        index = bisect.bisect_left(self._frame_offsets, offset)
        if index > 0 and self._frame_offsets[index - 1] + \
                self._frames[self._frame_offsets[index - 1]][0] > offset:
            index -= 1
        starts = []
        while index < len(self._frame_offsets) and self._frame_offsets[index] < offset + length:
            starts.append(self._frame_offsets[index])
            index += 1
        return starts

    def _forget_frames(self, offset: int, length: int) -> None:
        for start in self._frames_in(offset, length):
            del self._frames[start]
            self._frame_offsets.remove(start)

    def _add_frame(self, start: int, raw_bytes: int, stored_bytes: int) -> None:
        self._forget_frames(start, raw_bytes)
        self._frames[start] = (raw_bytes, stored_bytes)
        bisect.insort(self._frame_offsets, start)

    def _insert(self, entry: IndexEntry) -> None:
        for relative, raw_bytes, stored_bytes in entry.frames:
            self._add_frame(entry.offset + relative, raw_bytes, stored_bytes)
        self._key_to_entry[entry.key] = entry
        bisect.insort(self._offsets, entry.offset)
        self._offset_to_key[entry.offset] = entry.key
        self.used_bytes += entry.length

    def _remove(self, entry: IndexEntry, *, forget_frames: bool = True) -> None:
        if forget_frames:
            self._forget_frames(entry.offset, entry.length)
        del self._key_to_entry[entry.key]
        index = bisect.bisect_left(self._offsets, entry.offset)
        if index < len(self._offsets) and self._offsets[index] == entry.offset:
            del self._offsets[index]
        self._offset_to_key.pop(entry.offset, None)
        self.used_bytes = max(0, self.used_bytes - entry.length)

    def note_stored(self, key: str, offset: int, length: int, checksum: int,
                    codec: int) -> None:
        with self._lock:
            frames = tuple((start - offset, *self._frames[start])
                           for start in self._frames_in(offset, length)
                           if start >= offset and start + self._frames[start][0] <= offset + length)
            entry = IndexEntry(key, offset, length, checksum, codec, frames)
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
        with self._lock:
            # NOTE: the master may hand out an extent again before we hear it was freed; the
            # old object's index record must go (durably) before its bytes are overwritten
            if self._drop_overlapping(offset, length):
                self._append_pending()
        if not self._compress:
            self._forget_frames_of(offset, length)
            self._file.write(offset, src)
            return
        # NOTE: frames of at most CHUNK_BYTES, so a read of a piece decompresses little more
        # than the piece, whoever the writer (the data plane's 8 MiB pieces, a whole-object
        # tier move)
        for start in range(0, length, CHUNK_BYTES):
            self._write_frame(offset + start, src[start:start + CHUNK_BYTES])

    def write_stream(self, offset: int, length: int,
                     fill: Callable[[memoryview], None]) -> None:
        """Pipelined: the pieces are filled in place while earlier ones are written
        (``AlignedFile.write_stream``), or, with the codec, compressed and written on the
        file's I/O threads (``_write_frames_stream``)."""
        if not length:
            return
        if self._compress:
            self._write_frames_stream(offset, length, fill)
            return
        with self._lock:
            if self._drop_overlapping(offset, length):  # see write_from
                self._append_pending()
        self._forget_frames_of(offset, length)
        self._file.write_stream(offset, length, fill)

    def _forget_frames_of(self, offset: int, length: int) -> None:
        """Forget compressed frames in a range about to be written raw (frames of freed
        objects stay until then, see ``note_freed``)."""
        if self._frames:
            with self._lock:
                self._forget_frames(offset, length)

    def read_stream(self, offset: int, length: int,
                    drain: Callable[[memoryview], None]) -> None:
        """Pipelined: pieces read ahead while earlier ones are drained
        (``AlignedFile.read_stream``), or, where compressed frames overlap the range, whole
        frames read and decompressed ahead on the I/O threads (``_read_frames_stream``)."""
        if self._frames:
            with self._lock:
                frames = [(start, self._frames[start][0])
                          for start in self._frames_in(offset, length)]
            if frames:
                self._read_frames_stream(offset, length, frames, drain)
                return
        self._file.read_stream(offset, length, drain)

    def _read_frames_stream(self, offset: int, length: int, frames: list[tuple[int, int]],
                            drain: Callable[[memoryview], None]) -> None:
        """The codec's pipelined read: the range is cut at frame edges (a frame's part is
        one piece, so each frame is decompressed once; raw stretches in STREAM_CHUNK_BYTES
        pieces), and up to STREAM_DEPTH pieces are read (``read_into``) ahead on the I/O
        threads while earlier ones are drained, in order."""
        end = offset + length
        pieces = []
        position = offset
        for start, raw_bytes in frames + [(end, 0)]:
            lo, hi = max(start, offset), min(start + raw_bytes, end)
            for gap in range(position, lo, STREAM_CHUNK_BYTES):   # raw bytes before it
                pieces.append((gap, min(STREAM_CHUNK_BYTES, lo - gap)))
            if hi > lo:
                pieces.append((lo, hi - lo))
            position = max(position, hi)
        largest = max(num_bytes for _, num_bytes in pieces)
        ring = getattr(self._local, "read_ring", None)
        if ring is None or len(ring[0]) < largest:
            ring = self._local.read_ring = [memoryview(bytearray(largest))
                                            for _ in range(STREAM_DEPTH + 1)]
        in_flight: deque[tuple[Future, memoryview]] = deque()
        try:
            for i, (at, num_bytes) in enumerate(pieces):
                view = ring[i % len(ring)][:num_bytes]
                in_flight.append((self._file.submit(self.read_into, at, view), view))
                if len(in_flight) > STREAM_DEPTH:
                    future, done = in_flight.popleft()
                    future.result()
                    drain(done)
            while in_flight:
                future, done = in_flight.popleft()
                future.result()
                drain(done)
        finally:
            wait_all(future for future, _ in in_flight)

    def _write_frames_stream(self, offset: int, length: int,
                             fill: Callable[[memoryview], None]) -> None:
        """The codec's pipelined write: STREAM_CHUNK_BYTES frames, each filled into one of
        STREAM_DEPTH + 1 staging buffers, then compressed and written (``_write_frame``) on
        an I/O thread while the next is filled. NOTE: frames of 1 MiB, not CHUNK_BYTES, so a
        4 MiB object overlaps its receive with its compression; lz4 releases the GIL, so
        the compression runs beside the socket. Returns after every frame is written."""
        with self._lock:
            if self._drop_overlapping(offset, length):  # see write_from
                self._append_pending()
        ring = getattr(self._local, "ring", None)
        if ring is None:
            ring = self._local.ring = [memoryview(bytearray(STREAM_CHUNK_BYTES))
                                       for _ in range(STREAM_DEPTH + 1)]
        in_flight: deque[Future] = deque()
        try:
            for i, start in enumerate(range(0, length, STREAM_CHUNK_BYTES)):
                if len(in_flight) == STREAM_DEPTH:
                    in_flight.popleft().result()
                piece = ring[i % len(ring)][:min(STREAM_CHUNK_BYTES, length - start)]
                fill(piece)
                in_flight.append(self._file.submit(self._write_frame, offset + start, piece))
        finally:
            wait_all(in_flight)

    def _write_frame(self, offset: int, piece: memoryview) -> None:
        length = len(piece)
        if length >= MIN_FRAME_BYTES:
            compressed = lz4.block.compress(piece, store_size=False)
            if len(compressed) <= length - length * MIN_SAVING_FRACTION:
                self._file.write(offset, memoryview(compressed))
                with self._lock:
                    self._add_frame(offset, length, len(compressed))
                return
        with self._lock:
            self._forget_frames(offset, length)
        self._file.write(offset, piece)

    def read_into(self, offset: int, dst: memoryview) -> None:
        if not self._frames:
            self._file.read(offset, dst)
            return
        length = len(dst)
        with self._lock:
            frames = [(start, *self._frames[start]) for start in self._frames_in(offset, length)]
        position = offset
        for start, raw_bytes, stored_bytes in frames:
            if start > position:
                self._file.read(position, dst[position - offset:start - offset])
            stored = bytearray(stored_bytes)
            self._file.read(start, memoryview(stored))
            raw = lz4.block.decompress(stored, uncompressed_size=raw_bytes)
            lo, hi = max(position, start), min(offset + length, start + raw_bytes)
            dst[lo - offset:hi - offset] = raw[lo - start:hi - start]
            position = hi
        if position < offset + length:
            self._file.read(position, dst[position - offset:])

    def close(self) -> None:
        """Sync what is pending and close the files; the files stay (they survive restarts)."""
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
