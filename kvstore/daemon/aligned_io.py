"""Positional I/O on one file in whole blocks, with O_DIRECT where the filesystem allows.

``AlignedFile.write``/``read`` take any offset and length: with O_DIRECT every call moves
whole BLOCK_BYTES blocks through a page-aligned per-thread bounce buffer (at most
CHUNK_BYTES per system call); a block shared with a neighbouring range (a partial first or
last block) is read, patched and written under one of 64 striped block locks, so two
threads writing neighbours that share a block never lose each other's bytes. Without
O_DIRECT the calls go straight to pread/pwrite (the page cache).

Errors: OSError from the system calls; a read past the end of the file raises OSError.
"""

from __future__ import annotations

import mmap
import os
import threading

BLOCK_BYTES = 4096
CHUNK_BYTES = 8 << 20          # one I/O call moves at most this much
_NUM_BLOCK_LOCKS = 64


def open_direct(path: str, flags: int, mode: int = 0o600) -> tuple[int, bool]:
    """``os.open(path, flags | O_DIRECT)``, or without O_DIRECT where the filesystem
    refuses it: ``(fd, direct)``. Raises OSError when even the plain open fails."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode), True
    except OSError:
        return os.open(path, flags, mode), False


class AlignedFile:
    """One open file (``direct``: opened with O_DIRECT). Thread-safe."""

    def __init__(self, fd: int, *, direct: bool):
        self.fd = fd
        self.direct_io = direct
        self._block_locks = [threading.Lock() for _ in range(_NUM_BLOCK_LOCKS)]
        self._local = threading.local()

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
        edges = sorted({b for b, partial in ((start // BLOCK_BYTES, position != start),
                                             (aligned_end // BLOCK_BYTES - 1, end != aligned_end))
                        if partial})
        locks = sorted({id(self._block_locks[b % _NUM_BLOCK_LOCKS]):
                        self._block_locks[b % _NUM_BLOCK_LOCKS] for b in edges}.items())
        for _, lock in locks:
            lock.acquire()
        try:
            for block in edges:  # read-modify-write of blocks shared with neighbours
                at = block * BLOCK_BYTES - start
                _pread_all(self.fd, bounce[at:at + BLOCK_BYTES], block * BLOCK_BYTES)
            bounce[position - start:end - start] = data
            _pwrite_all(self.fd, bounce, start)
        finally:
            for _, lock in reversed(locks):
                lock.release()

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
