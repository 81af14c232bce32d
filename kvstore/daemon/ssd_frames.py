"""The SSD codec's frames: which ranges of the data file hold lz4-compressed bytes, and the
reads and writes that go through them.

A frame is a piece of an object written compressed (lz4 block format) at the start of the
piece's own range of the data file: ``start -> (raw bytes, stored bytes)``, stored < raw.
Bytes outside every frame are raw. ``FrameMap`` is that map (sorted starts, so the frames
overlapping a range are found by bisection); ``FramedFile`` is the data file seen through
it: its reads return raw bytes wherever frames lie (whole frames are read and
decompressed), its codec writes compress each frame and store it compressed if that saves
at least MIN_SAVING_FRACTION of it, raw otherwise.

Guarantees:
- A write over a range forgets every frame it overlaps before (raw writes,
  ``forget_raw``) or as (``write_frame``) its bytes land, so a read never decompresses
  bytes a later write replaced. Beyond that, the map's owner decides what it forgets
  (``kvstore.daemon.ssd`` keeps a freed object's frames: the master may switch back to
  that copy unwritten).
- ``read_into`` and ``read_stream`` return the same raw bytes, compressed or not.
- ``write_stream`` returns only after every frame it started is written (or raised).

Thread-safety: ``FrameMap`` has none; ``FramedFile`` takes the lock it is given (the
backend's) around every use of the map and never holds it across I/O, and the map's owner
takes the same lock. Errors: OSError of the file, lz4.block.LZ4BlockError for a frame that
does not decompress.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

import lz4.block

from kvstore.daemon.aligned_io import STREAM_CHUNK_BYTES, STREAM_DEPTH, AlignedFile, wait_all

#: a frame is stored compressed only if that saves at least this fraction of its bytes
MIN_SAVING_FRACTION = 1 / 8
MIN_FRAME_BYTES = 4096


class FrameMap:
    """The compressed frames of the data file (see the module docstring); not thread-safe."""

    def __init__(self) -> None:
        self._starts: list[int] = []                    # sorted starts of compressed frames
        self._frames: dict[int, tuple[int, int]] = {}   # start -> (raw bytes, stored bytes)

    def __bool__(self) -> bool:
        return bool(self._frames)

    def starts_in(self, offset: int, length: int) -> list[int]:
        """Starts of the frames that overlap [offset, +length), in order."""
        index = bisect.bisect_left(self._starts, offset)
        if index > 0 and self._starts[index - 1] + self._frames[self._starts[index - 1]][0] \
                > offset:
            index -= 1
        starts = []
        while index < len(self._starts) and self._starts[index] < offset + length:
            starts.append(self._starts[index])
            index += 1
        return starts

    def frames_in(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(start, raw bytes, stored bytes) of the frames that overlap [offset, +length)."""
        return [(start, *self._frames[start]) for start in self.starts_in(offset, length)]

    def frames_within(self, offset: int, length: int) -> tuple[tuple[int, int, int], ...]:
        """(start relative to ``offset``, raw, stored) of the frames wholly inside
        [offset, +length): an object's frames as its index record keeps them."""
        return tuple((start - offset, *self._frames[start])
                     for start in self.starts_in(offset, length)
                     if start >= offset and start + self._frames[start][0] <= offset + length)

    def forget(self, offset: int, length: int) -> None:
        """Forget the frames that overlap [offset, +length)."""
        for start in self.starts_in(offset, length):
            del self._frames[start]
            self._starts.remove(start)

    def add(self, start: int, raw_bytes: int, stored_bytes: int) -> None:
        """Record a frame, forgetting the ones it overlaps."""
        self.forget(start, raw_bytes)
        self._frames[start] = (raw_bytes, stored_bytes)
        bisect.insort(self._starts, start)


class FramedFile:
    """``file`` read and written through ``frames`` (see the module docstring); ``lock``
    guards ``frames`` and is shared with their owner."""

    def __init__(self, file: AlignedFile, frames: FrameMap, lock: threading.Lock):
        self._file = file
        self._frames = frames
        self._lock = lock
        self._local = threading.local()        # per-thread staging of the codec's streams

    def forget_raw(self, offset: int, length: int) -> None:
        """Forget the frames in a range about to be written raw."""
        if self._frames:
            with self._lock:
                self._frames.forget(offset, length)

    def write_frame(self, offset: int, piece: memoryview) -> None:
        """Write ``piece`` at ``offset`` as one frame: compressed if that saves enough (and
        the piece has at least MIN_FRAME_BYTES), else raw."""
        length = len(piece)
        if length >= MIN_FRAME_BYTES:
            compressed = lz4.block.compress(piece, store_size=False)
            if len(compressed) <= length - length * MIN_SAVING_FRACTION:
                self._file.write(offset, memoryview(compressed))
                with self._lock:
                    self._frames.add(offset, length, len(compressed))
                return
        with self._lock:
            self._frames.forget(offset, length)
        self._file.write(offset, piece)

    def write_stream(self, offset: int, length: int,
                     fill: Callable[[memoryview], None]) -> None:
        """The codec's pipelined write: STREAM_CHUNK_BYTES frames, each filled into one of
        STREAM_DEPTH + 1 staging buffers, then compressed and written (``write_frame``) on
        an I/O thread while the next is filled. NOTE: frames of 1 MiB, not CHUNK_BYTES, so a
        4 MiB object overlaps its receive with its compression; lz4 releases the GIL, so
        the compression runs beside the socket. Returns after every frame is written."""
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
                in_flight.append(self._file.submit(self.write_frame, offset + start, piece))
        finally:
            wait_all(in_flight)

    def read_into(self, offset: int, dst: memoryview) -> None:
        """Read [offset, +len(dst)) into ``dst`` as raw bytes, decompressing the frames
        that overlap it (each read whole)."""
        if not self._frames:
            self._file.read(offset, dst)
            return
        length = len(dst)
        with self._lock:
            frames = self._frames.frames_in(offset, length)
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

    def read_stream(self, offset: int, length: int,
                    drain: Callable[[memoryview], None]) -> None:
        """Pipelined: pieces read ahead while earlier ones are drained
        (``AlignedFile.read_stream``), or, where frames overlap the range, whole frames
        read and decompressed ahead on the I/O threads (``_read_frames_stream``)."""
        if self._frames:
            with self._lock:
                frames = [(start, raw_bytes) for start, raw_bytes, _
                          in self._frames.frames_in(offset, length)]
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
