"""The daemon's segments: the memory it contributes to the pool, one object per tier region.

- DRAM: a POSIX shared-memory object (mode 0600, fresh unguessable name per daemon) that
  same-host clients map directly (``shm_name`` is published to the master).
- SSD: a file (mode 0600) in the configured directory, memory-mapped; served only over the
  data plane (no ``shm_name``), so bytes reach the page cache and the disk through the kernel.
- HBM: a GPU buffer (``kvstore.daemon.gpu_segment``; torch is imported only when configured).

Every segment serves the data plane through ``recv_range`` (fill a range from a socket: a
client WRITE) and ``send_range`` (send a reply header then a range: a client READ). Callers
bounds-check first (``check_range``); segments trust the range they are given.

Resource handling: ``close`` unmaps, and removes what the daemon created (shm name, file).
"""

from __future__ import annotations

import mmap
import os
import socket
from pathlib import Path

from kvstore._posix_shm import SharedSegment, create_shm, release_mapping, unique_shm_name
from kvstore.tiers import Tier
from kvstore.transport import data_frames


class Segment:
    """A contiguous byte region served by the data plane. Subclasses provide the bytes."""

    tier: Tier

    def __init__(self, segment_id: str, size_bytes: int, *, shm_name: str = "",
                 path: str = ""):
        self.segment_id = segment_id
        self.size_bytes = size_bytes
        self.shm_name = shm_name
        self.path = path

    def check_range(self, offset: int, length: int) -> bool:
        """True iff [offset, offset + length) lies inside the segment."""
        return 0 <= offset and 0 <= length and offset + length <= self.size_bytes

    def recv_range(self, sock: socket.socket, offset: int, length: int) -> None:
        raise NotImplementedError

    def send_range(self, sock: socket.socket, header: bytes, offset: int, length: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the memory and remove what was created for it. Idempotent."""


class MappedSegment(Segment):
    """A segment backed by a memory mapping: payloads go straight between socket and mapping."""

    def __init__(self, segment_id: str, view: memoryview, **kwargs: str):
        super().__init__(segment_id, len(view), **kwargs)
        self.view = view

    def recv_range(self, sock: socket.socket, offset: int, length: int) -> None:
        data_frames.recv_exact_into(sock, self.view[offset:offset + length])

    def send_range(self, sock: socket.socket, header: bytes, offset: int, length: int) -> None:
        data_frames.sendmsg_all(sock, [header, self.view[offset:offset + length]])


class ShmSegment(MappedSegment):
    """A DRAM segment in POSIX shared memory (0600); unlinked on close."""

    tier = Tier.DRAM

    def __init__(self, segment_id: str, size_bytes: int, *, name_prefix: str,
                 prefault: bool = True):
        self._shm: SharedSegment = create_shm(unique_shm_name(name_prefix), size_bytes,
                                              prefault=prefault)
        super().__init__(segment_id, self._shm.view, shm_name=self._shm.name)

    def close(self) -> None:
        self._shm.unlink()
        self.view = memoryview(b"")
        self._shm.close()


class FileSegment(MappedSegment):
    """An SSD segment: a sparse file of ``size_bytes`` (mode 0600) mapped shared; removed on
    close. Dirty pages reach the disk through the kernel's writeback."""

    tier = Tier.SSD

    def __init__(self, segment_id: str, size_bytes: int, *, directory: str, name_prefix: str):
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / f"{unique_shm_name(name_prefix).lstrip('/')}.seg"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
            self._mapping = mmap.mmap(fd, size_bytes)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        super().__init__(segment_id, memoryview(self._mapping), path=str(path))

    def close(self) -> None:
        if self._mapping is None:
            return
        release_mapping(self.view, self._mapping)
        self._mapping = None
        Path(self.path).unlink(missing_ok=True)
