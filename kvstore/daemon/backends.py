"""Tier backends: the storage a daemon contributes to the pool, one backend per segment.

The interface (``Backend``) is what the data plane, tier moves (``kvstore.daemon.moves``) and
(later) the NIXL transport use; none of them knows which tier it talks to:

- ``view(offset, length)``: a writable memoryview of the range when the backend is memory
  that the process can address directly (DRAM), else None; the data plane then receives into
  or sends from that view with no copy.
- ``read_into(offset, dst)`` / ``write_from(offset, src)``: copy ``len(buffer)`` bytes between
  the range at ``offset`` and a caller's buffer (the path for SSD and HBM, and for any backend
  when the caller already holds the bytes in a buffer).
- ``write_stream(offset, length, fill)`` / ``read_stream(offset, length, drain)``: the same
  for a caller that produces or consumes the bytes piece by piece (a socket, a tier move):
  the backend hands out the pieces' buffers, so it can fill them in place and overlap the
  caller's work with its own I/O (the SSD backend does: ``aligned_io``). The defaults here
  go through the view, else a STREAM_STAGING_BYTES buffer and ``write_from``/``read_into``.
- ``capacity_bytes``; ``used_bytes`` (bytes of the objects this node's object table places in
  the segment, kept by ``note_stored``/``note_freed``; 0 without a master).
- ``check_range(offset, length)``: callers bounds-check first; backends trust the range.

Backends here: ``ShmBackend`` (DRAM, POSIX shared memory, registered with CUDA as pinned
memory where CUDA is available). ``kvstore.daemon.ssd.SsdBackend`` (SSD) and
``kvstore.daemon.gpu.GpuBackend`` (HBM) live in their own modules.

Resource handling: ``close`` unmaps and removes what the backend created for itself (shm
name); an SSD backend keeps its files, which must survive restarts. Idempotent.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import numpy as np

from kvstore._posix_shm import (ChunkPopulator, SharedSegment, allocate_in_background,
                                create_shm, unique_shm_name)
from kvstore.tiers import Tier

log = logging.getLogger("kvstore.daemon.backends")

STREAM_STAGING_BYTES = 8 << 20


class Backend:
    """A contiguous byte range of one tier on this node. Subclasses provide the bytes."""

    tier: Tier

    def __init__(self, segment_id: str, size_bytes: int, *, shm_name: str = "",
                 path: str = ""):
        self.segment_id = segment_id
        self.size_bytes = size_bytes
        self.shm_name = shm_name
        self.path = path
        self.used_bytes = 0
        self._usage_lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self.size_bytes

    def check_range(self, offset: int, length: int) -> bool:
        """True iff [offset, offset + length) lies inside the segment."""
        return 0 <= offset and 0 <= length and offset + length <= self.size_bytes

    def view(self, offset: int, length: int) -> memoryview | None:
        """A writable view of the range when the bytes are directly addressable, else None."""
        return None

    def read_into(self, offset: int, dst: memoryview) -> None:
        """Copy ``len(dst)`` bytes starting at ``offset`` into ``dst`` (a byte view)."""
        raise NotImplementedError

    def write_from(self, offset: int, src: memoryview) -> None:
        """Copy ``src`` (a byte view) into the range starting at ``offset``."""
        raise NotImplementedError

    def write_stream(self, offset: int, length: int,
                     fill: Callable[[memoryview], None]) -> None:
        """Store [offset, +length) from pieces, in order, that ``fill(view)`` fills
        completely; returns once all are stored. Errors: those of ``fill`` and of the
        backend's I/O (the range then possibly partly written)."""
        view = self.view(offset, length)
        if view is not None:
            fill(view)
            return
        staging = memoryview(bytearray(min(STREAM_STAGING_BYTES, length)))
        for start in range(0, length, STREAM_STAGING_BYTES):
            piece = staging[:min(STREAM_STAGING_BYTES, length - start)]
            fill(piece)
            self.write_from(offset + start, piece)

    def read_stream(self, offset: int, length: int,
                    drain: Callable[[memoryview], None]) -> None:
        """Hand [offset, +length) to ``drain(view)`` piece by piece, in order. A view is
        valid only during its ``drain`` call."""
        view = self.view(offset, length)
        if view is not None:
            drain(view)
            return
        staging = memoryview(bytearray(min(STREAM_STAGING_BYTES, length)))
        for start in range(0, length, STREAM_STAGING_BYTES):
            piece = staging[:min(STREAM_STAGING_BYTES, length - start)]
            self.read_into(offset + start, piece)
            drain(piece)

    def note_stored(self, key: str, offset: int, length: int, checksum: int,
                    codec: int) -> None:
        """The master committed an object in this segment (from a heartbeat change set)."""
        with self._usage_lock:
            self.used_bytes += length

    def note_stored_many(self, keys: list[str], offsets: list[int], lengths: list[int],
                         checksums: list[int], codecs: list[int]) -> None:
        """``note_stored`` of each object (parallel lists): one call per commit record or
        change set. The default calls ``note_stored`` per object."""
        for i, key in enumerate(keys):
            self.note_stored(key, offsets[i], lengths[i], checksums[i], codecs[i])

    def note_freed(self, key: str, offset: int, length: int) -> None:
        """The master freed an object of this segment."""
        with self._usage_lock:
            self.used_bytes = max(0, self.used_bytes - length)

    def note_reset(self) -> None:
        """The master resent the whole table (full resync): forget every object."""
        with self._usage_lock:
            self.used_bytes = 0

    #: True where ``sync`` does work (SSD): the object table then tracks the client commits
    #: whose sync still runs; a volatile tier's objects are durable once noted.
    SYNCS = False

    def sync(self) -> None:
        """Make every object noted so far durable (SSD); a no-op for volatile tiers."""

    def close(self) -> None:
        """Release the memory and remove what was created for it. Idempotent."""


class MappedBackend(Backend):
    """A backend whose bytes are a memory mapping: views go straight to the data plane."""

    def __init__(self, segment_id: str, mapping_view: memoryview, **kwargs: str):
        super().__init__(segment_id, len(mapping_view), **kwargs)
        self.mapping_view = mapping_view

    def view(self, offset: int, length: int) -> memoryview:
        return self.mapping_view[offset:offset + length]

    def read_into(self, offset: int, dst: memoryview) -> None:
        dst[:] = self.mapping_view[offset:offset + len(dst)]

    def write_from(self, offset: int, src: memoryview) -> None:
        self.mapping_view[offset:offset + len(src)] = src


class ShmBackend(MappedBackend):
    """A DRAM segment in POSIX shared memory (0600); unlinked on close.

    With ``prefault`` the filesystem must have room for the segment at creation, and the
    pages are allocated by a background thread once the daemon listens
    (``allocate_in_background``), so start stays fast. The data plane's views fill their
    page tables per chunk on first use (``ChunkPopulator``). Where CUDA is available the
    mapping is registered as pinned memory (``pin_with_cuda``).
    """

    tier = Tier.DRAM

    def __init__(self, segment_id: str, size_bytes: int, *, name_prefix: str,
                 prefault: bool = True):
        self._shm: SharedSegment = create_shm(unique_shm_name(name_prefix), size_bytes,
                                              prefault=prefault)
        super().__init__(segment_id, self._shm.view, shm_name=self._shm.name)
        self._address = np.frombuffer(self.mapping_view, dtype=np.uint8).ctypes.data
        self._populator = ChunkPopulator(self._address, self.size_bytes)
        self._stop_allocating = threading.Event()
        self._cuda_address: int | None = None
        # NOTE: the segment's objects and lease for same-host clients' cached reads
        # (daemon/shm_locations.py); told every change the object table applies, below
        from kvstore.daemon.shm_locations import ShmLocationTable
        try:
            self.locations: ShmLocationTable | None = ShmLocationTable(self.shm_name,
                                                                       size_bytes)
        except BaseException:
            self._shm.unlink()
            self._shm.close()
            raise

    def note_stored(self, key: str, offset: int, length: int, checksum: int,
                    codec: int) -> None:
        super().note_stored(key, offset, length, checksum, codec)
        if self.locations is not None and codec == 0:   # NOTE: raw bytes only (CODEC_RAW)
            self.locations.stored(key, offset, length, checksum)

    def note_stored_many(self, keys: list[str], offsets: list[int], lengths: list[int],
                         checksums: list[int], codecs: list[int]) -> None:
        # NOTE: one usage update and one location-table call for the whole record (issue
        # 10, 10d2); only raw objects (CODEC_RAW) are published, as in note_stored
        with self._usage_lock:
            self.used_bytes += sum(lengths)
        if self.locations is None:
            return
        if any(codecs):
            raw = [i for i, codec in enumerate(codecs) if codec == 0]
            keys, offsets = [keys[i] for i in raw], [offsets[i] for i in raw]
            lengths, checksums = [lengths[i] for i in raw], [checksums[i] for i in raw]
        self.locations.stored_many(keys, offsets, lengths, checksums)

    def note_freed(self, key: str, offset: int, length: int) -> None:
        if self.locations is not None:
            self.locations.freed(offset)
        super().note_freed(key, offset, length)

    def note_reset(self) -> None:
        if self.locations is not None:
            self.locations.reset()
        super().note_reset()

    def view(self, offset: int, length: int) -> memoryview:
        self._populator.ensure(offset, length)
        return self.mapping_view[offset:offset + length]

    def pin_with_cuda(self) -> bool:
        """Register the mapping with CUDA (cudaHostRegister) so GPU copies run at DMA speed.

        Returns False, changing nothing, where no NVIDIA driver is present, torch or CUDA is
        absent, or registration fails (logged). NOTE: the driver check comes first so that a
        CPU-only node never pays torch's import (~1 s, hundreds of MB).
        """
        if not os.path.exists("/dev/nvidiactl"):
            return False
        try:
            import torch
        except ImportError:
            return False
        if not torch.cuda.is_available():
            return False
        address = self._address
        # cudaHostRegisterPortable = 1: pinned for every CUDA context
        status = torch.cuda.cudart().cudaHostRegister(address, self.size_bytes, 1)
        if int(status) != 0:
            log.warning("cudaHostRegister of %s (%d bytes) failed: %s; GPU copies from this "
                        "segment run through pageable memory", self.shm_name, self.size_bytes,
                        status)
            return False
        self._cuda_address = address
        log.info("registered %s with CUDA as pinned memory", self.shm_name)
        return True

    def allocate_in_background(self) -> threading.Thread:
        """Allocate every page on a background thread (stops at ``close``); return it."""
        thread = threading.Thread(target=allocate_in_background,
                                  args=(self.shm_name, self.size_bytes, self._stop_allocating),
                                  daemon=True, name=f"kvstore-allocate-{self.segment_id}")
        thread.start()
        return thread

    def close(self) -> None:
        if self.locations is not None:
            self.locations.close()     # NOTE: first: clients stop serving from the segment
        self._stop_allocating.set()
        if self._cuda_address is not None:
            import torch
            torch.cuda.cudart().cudaHostUnregister(self._cuda_address)
            self._cuda_address = None
        self._shm.unlink()
        self.mapping_view = memoryview(b"")
        self._shm.close()
