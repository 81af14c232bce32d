"""Positional I/O on one file in whole blocks, with O_DIRECT where the filesystem allows.

``AlignedFile.write``/``read`` take any offset and length: with O_DIRECT every call moves
whole BLOCK_BYTES blocks through a page-aligned per-thread bounce buffer (at most
CHUNK_BYTES per system call); a block shared with a neighbouring range (a partial first or
last block) is read, patched and written under one of 64 striped block locks, so two
threads writing neighbours that share a block never lose each other's bytes. Without
O_DIRECT the calls go straight to pread/pwrite (the page cache).

``write_stream``/``read_stream`` are the pipelined forms for a caller that produces or
consumes the bytes piece by piece (the data plane's socket, a tier move's memcpy): the range
is cut into STREAM_CHUNK_BYTES pieces (block-aligned after the first; the first ones
smaller: MIN_STREAM_PIECE_BYTES, then twice that, so a write's disk writes start early and
a read's first piece is drained while the rest are still read),
the caller fills or drains each piece in place in a page-aligned ring buffer (no bounce
copy), and up to
STREAM_DEPTH pieces are written or read ahead on the file's I/O threads meanwhile, so the
caller's work and the disk overlap and the disk sees several requests in flight. Guarantee:
``write_stream`` returns only after every piece is written (or raises, the range then
possibly partly written); ``read_stream`` hands the pieces to ``drain`` in order.

Errors: OSError from the system calls; a read past the end of the file raises OSError; an
exception raised by ``fill``/``drain`` propagates after the pieces in flight finished.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

BLOCK_BYTES = 4096
CHUNK_BYTES = 8 << 20          # one I/O call moves at most this much
# NOTE: 1 MiB pieces, 4 in flight: measured on the build machine's disk (ext4 on virtio) as
# fast as or faster than 8 MiB one at a time, and a 4 MiB object then overlaps its
# transfer with its disk I/O instead of waiting for one 8 MiB piece (bench/RESULTS.md)
STREAM_CHUNK_BYTES = 1 << 20
STREAM_DEPTH = 4
# NOTE: a write stream's pieces ramp up from this (256 KiB, 512 KiB, then 1 MiB), so the
# disk starts after 256 KiB arrived instead of 1 MiB; a socket receives a 1 MiB piece in
# ~1 ms on the loaded build machine, which the disk then waited for at the head of every
# put (and a tcp batch's 1 MiB stripe, one piece, was received whole before its first byte
# went to the disk). Pieces end on multiples of this, so each after the first starts on a
# block (bench/RESULTS.md, "SSD puts (9p)"). Reads ramp the same way: their first
# STREAM_DEPTH pieces are read at once and share the disk, so the send, which waits for the
# first, started after 1.8-2.9 ms with four 1 MiB pieces and after 1.1-1.5 ms with a 256 KiB
# first piece (p50s, loaded build machine; bench/RESULTS.md, "SSD puts (9s2)").
MIN_STREAM_PIECE_BYTES = 256 << 10
IO_THREADS = 8                 # per file: a few streams' pieces in flight at once
_NUM_BLOCK_LOCKS = 64

log = logging.getLogger("kvstore.daemon.aligned_io")


def open_direct(path: str, flags: int, mode: int = 0o600) -> tuple[int, bool]:
    """``os.open(path, flags | O_DIRECT)``, or without O_DIRECT where the filesystem
    refuses it (logged with the reason): ``(fd, direct)``. Raises OSError when even the
    plain open fails."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode), True
    except OSError as exc:
        log.info("%s: O_DIRECT refused by the filesystem (%s)", path, exc.strerror)
        return os.open(path, flags, mode), False


class AlignedFile:
    """One open file (``direct``: opened with O_DIRECT). Thread-safe."""

    def __init__(self, fd: int, *, direct: bool):
        self.fd = fd
        self.direct_io = direct
        self._block_locks = [threading.Lock() for _ in range(_NUM_BLOCK_LOCKS)]
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="kvstore-file-io")

    def datasync_in_background(self) -> Future:
        """``os.fdatasync`` of the file on an I/O thread; its future."""
        return self._pool.submit(os.fdatasync, self.fd)

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on one of the file's I/O threads; its future. ``fn`` must not
        wait for other work on these threads (they are few)."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Stop the I/O threads (the fd stays the caller's to close). Idempotent."""
        self._pool.shutdown(wait=True)

    def _bounce(self) -> memoryview:
        bounce = getattr(self._local, "bounce", None)
        if bounce is None:
            # NOTE: anonymous mmap memory is page-aligned, as O_DIRECT requires
            self._local.mapping = mmap.mmap(-1, CHUNK_BYTES + 2 * BLOCK_BYTES)
            bounce = self._local.bounce = memoryview(self._local.mapping)
        return bounce

    def write(self, offset: int, src: memoryview) -> None:
        length = len(src)
        if not self.direct_io:
            _pwrite_all(self.fd, src, offset)
            return
        done = 0
        while done < length:
            position = offset + done
            pad = position % BLOCK_BYTES
            num_bytes = min(CHUNK_BYTES - pad, length - done)
            self._write_blocks(position, src[done:done + num_bytes])
            done += num_bytes

    def _write_blocks(self, position: int, data: memoryview) -> None:
        start = position - position % BLOCK_BYTES
        end = position + len(data)
        aligned_end = -(-end // BLOCK_BYTES) * BLOCK_BYTES
        bounce = self._bounce()[:aligned_end - start]
        with self._edge_locks(start, position, end, aligned_end) as edges:
            for block in edges:  # read-modify-write of blocks shared with neighbours
                at = block * BLOCK_BYTES - start
                _pread_all(self.fd, bounce[at:at + BLOCK_BYTES], block * BLOCK_BYTES)
            bounce[position - start:end - start] = data
            _pwrite_all(self.fd, bounce, start)

    def _edge_locks(self, start: int, position: int, end: int, aligned_end: int) -> "_EdgeLocks":
        """The partial first/last blocks of [position, end) (within [start, aligned_end)),
        their striped locks held while the context is open."""
        edges = sorted({b for b, partial in ((start // BLOCK_BYTES, position != start),
                                             (aligned_end // BLOCK_BYTES - 1, end != aligned_end))
                        if partial})
        locks = sorted({id(self._block_locks[b % _NUM_BLOCK_LOCKS]):
                        self._block_locks[b % _NUM_BLOCK_LOCKS] for b in edges}.items())
        return _EdgeLocks(edges, [lock for _, lock in locks])

    # ---- pipelined streams -------------------------------------------------------------

    def _ring(self) -> list[memoryview]:
        """This thread's STREAM_DEPTH + 1 page-aligned piece buffers (one being filled
        while STREAM_DEPTH are in flight)."""
        ring = getattr(self._local, "ring", None)
        if ring is None:
            self._local.ring_mapping = mmap.mmap(
                -1, (STREAM_DEPTH + 1) * (STREAM_CHUNK_BYTES + BLOCK_BYTES))
            whole = memoryview(self._local.ring_mapping)
            step = STREAM_CHUNK_BYTES + BLOCK_BYTES
            ring = self._local.ring = [whole[i * step:(i + 1) * step]
                                       for i in range(STREAM_DEPTH + 1)]
        return ring

    def _pieces(self, offset: int, length: int):
        """(position, num_bytes, pad) of each piece of a stream over [offset, +length): at
        most MIN_STREAM_PIECE_BYTES, then twice that, then STREAM_CHUNK_BYTES, each ending on
        a multiple of MIN_STREAM_PIECE_BYTES (so every piece after the first starts on a
        block)."""
        done, target = 0, MIN_STREAM_PIECE_BYTES
        while done < length:
            position = offset + done
            pad = position % BLOCK_BYTES if self.direct_io else 0
            num_bytes = min(target - position % MIN_STREAM_PIECE_BYTES, length - done)
            yield position, num_bytes, pad
            done += num_bytes
            target = min(2 * target, STREAM_CHUNK_BYTES)

    def write_stream(self, offset: int, length: int,
                     fill: Callable[[memoryview], None]) -> None:
        """Write [offset, +length) from pieces that ``fill(view)`` fills completely, in
        order (see the module docstring)."""
        ring = self._ring()
        in_flight: deque[Future] = deque()
        try:
            for i, (position, num_bytes, pad) in enumerate(self._pieces(offset, length)):
                if len(in_flight) == STREAM_DEPTH:
                    in_flight.popleft().result()
                buffer = ring[i % len(ring)]
                fill(buffer[pad:pad + num_bytes])
                in_flight.append(self._pool.submit(self._write_piece, buffer, position,
                                                   num_bytes, pad))
        finally:
            wait_all(in_flight)

    def _write_piece(self, buffer: memoryview, position: int, num_bytes: int,
                     pad: int) -> None:
        if not self.direct_io:
            _pwrite_all(self.fd, buffer[:num_bytes], position)
            return
        start, end = position - pad, position + num_bytes
        aligned_end = -(-end // BLOCK_BYTES) * BLOCK_BYTES
        with self._edge_locks(start, position, end, aligned_end) as edges:
            if edges:
                scratch = self._bounce()[:BLOCK_BYTES]
                for block in edges:  # patch in the neighbours' bytes of a shared block
                    at = block * BLOCK_BYTES
                    _pread_all(self.fd, scratch, at)
                    lo, hi = max(at, position), min(at + BLOCK_BYTES, end)
                    buffer[at - start:lo - start] = scratch[:lo - at]
                    buffer[hi - start:at + BLOCK_BYTES - start] = scratch[hi - at:]
            _pwrite_all(self.fd, buffer[:aligned_end - start], start)

    def read_stream(self, offset: int, length: int,
                    drain: Callable[[memoryview], None]) -> None:
        """Read [offset, +length) and hand it to ``drain(view)`` piece by piece, in order,
        reading up to STREAM_DEPTH pieces ahead (see the module docstring)."""
        ring = self._ring()
        pieces = self._pieces(offset, length)
        in_flight: deque[tuple[Future, memoryview]] = deque()
        try:
            for i, piece in enumerate(pieces):
                in_flight.append(self._submit_read(ring[i % len(ring)], *piece))
                if len(in_flight) == STREAM_DEPTH:
                    break
            i = len(in_flight)
            while in_flight:
                future, view = in_flight.popleft()
                future.result()
                drain(view)
                piece = next(pieces, None)
                if piece is not None:
                    in_flight.append(self._submit_read(ring[i % len(ring)], *piece))
                    i += 1
        finally:
            wait_all(future for future, _ in in_flight)

    def _submit_read(self, buffer: memoryview, position: int, num_bytes: int,
                     pad: int) -> tuple[Future, memoryview]:
        start = position - pad
        aligned_end = -(-(position + num_bytes) // BLOCK_BYTES) * BLOCK_BYTES \
            if self.direct_io else position + num_bytes
        return (self._pool.submit(_pread_all, self.fd, buffer[:aligned_end - start], start),
                buffer[pad:pad + num_bytes])

    def read(self, offset: int, dst: memoryview) -> None:
        length = len(dst)
        if not self.direct_io:
            _pread_all(self.fd, dst, offset)
            return
        done = 0
        while done < length:
            position = offset + done
            pad = position % BLOCK_BYTES
            num_bytes = min(CHUNK_BYTES - pad, length - done)
            start = position - pad
            aligned_end = -(-(position + num_bytes) // BLOCK_BYTES) * BLOCK_BYTES
            bounce = self._bounce()[:aligned_end - start]
            _pread_all(self.fd, bounce, start)
            dst[done:done + num_bytes] = bounce[pad:pad + num_bytes]
            done += num_bytes


class _EdgeLocks:
    """Holds the given locks (acquired in a fixed order) while the context is open."""

    def __init__(self, edges: list[int], locks: list[threading.Lock]):
        self.edges, self._locks = edges, locks

    def __enter__(self) -> list[int]:
        for lock in self._locks:
            lock.acquire()
        return self.edges

    def __exit__(self, *exc_info: object) -> None:
        for lock in reversed(self._locks):
            lock.release()


def wait_all(futures) -> None:
    """Wait for every future (their buffers are then free again); raise the first error."""
    error = None
    for future in list(futures):
        try:
            future.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others
            error = error or exc
    if error is not None:
        raise error


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwritev(fd, [data], offset)
        data, offset = data[written:], offset + written


def _pread_all(fd: int, buffer: memoryview, offset: int) -> None:
    while len(buffer):
        num_read = os.preadv(fd, [buffer], offset)
        if num_read == 0:
            raise OSError(f"SSD data file ends before offset {offset}")
        buffer, offset = buffer[num_read:], offset + num_read
