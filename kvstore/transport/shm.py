"""Same-host transport: map the daemon's shared-memory segment, copy with one memcpy.

No daemon round-trip: the first access to a segment maps it (by its POSIX shm name) and the
mapping is cached until ``close()``, or until mapping another segment finds this one's name
gone (its daemon exited; only our mapping would keep its memory alive); every later read or
write is one memcpy
between the caller's buffer and the mapping. Copies of at least ``GIL_FREE_COPY_BYTES`` go
through ``ctypes.memmove``, which releases the GIL, so other threads (the engine, a parallel
batch) keep running during a large copy.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from kvstore._errors import ClosedError, TransferError
from kvstore._posix_shm import ChunkPopulator, SharedSegment, open_shm
from kvstore.transport import byte_views
from kvstore.transport.base import Target, Transport
from kvstore.transport.hostid import local_host_id

# NOTE: below this, the call overhead of ctypes (~1 us) outweighs letting other threads run.
GIL_FREE_COPY_BYTES = 256 * 1024
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shm names


class _Mapping:
    """A cached mapping of one segment plus its base address (for memmove).

    The mapping is lazy; ``populator`` fills the page tables of the chunks a copy touches,
    once per chunk. NOTE: why: a first put into a fresh 8 GiB mapping then costs ~2 ms for
    4 MiB instead of ~1 s (populating everything at map time), and later copies still run at
    memcpy speed instead of taking a minor fault per 4 KiB page.
    """

    def __init__(self, segment: SharedSegment):
        self.segment = segment
        self.array = np.frombuffer(segment.view, dtype=np.uint8)
        self.address = self.array.ctypes.data
        self.size_bytes = segment.size_bytes
        self.populator = ChunkPopulator(self.address, self.size_bytes)


class ShmTransport(Transport):
    """Reads and writes DRAM segments of daemons on this host through shared memory.

    Reachable targets: a non-empty ``shm_name`` and ``host_id`` equal to ours. Segments are
    mapped read-write on first use and stay mapped until ``close()``. Thread-safe: the mapping
    cache is guarded by a lock; concurrent copies into disjoint ranges are independent.

    Errors: ``TransferError`` naming the node when the segment cannot be mapped (gone,
    permission) or the range runs past its end; ``InvalidArgumentError`` when the caller's
    buffer length differs from ``target.length``. Nothing is copied when an error is raised.
    """

    name = "shm"

    def __init__(self, *, host_id: str | None = None):
        self.host_id = host_id or local_host_id()
        self._lock = threading.Lock()
        self._name_to_mapping: dict[str, _Mapping] = {}
        self._closed = False

    def can_reach(self, target: Target) -> bool:
        return bool(target.shm_name) and target.host_id == self.host_id

    def write(self, target: Target, src: memoryview, *, timeout_s: float) -> None:
        src = byte_views.as_bytes_view(src, target.length)
        mapping = self._range(target)
        mapping.populator.ensure(target.offset, target.length)
        if target.length >= GIL_FREE_COPY_BYTES:
            src_array = np.frombuffer(src, dtype=np.uint8)
            ctypes.memmove(mapping.address + target.offset, src_array.ctypes.data,
                           target.length)
        elif target.length:
            mapping.segment.view[target.offset:target.offset + target.length] = src

    def read_into(self, target: Target, dst: memoryview, *, timeout_s: float) -> None:
        dst = byte_views.as_bytes_view(dst, target.length, writable=True)
        mapping = self._range(target)
        mapping.populator.ensure(target.offset, target.length)
        if target.length >= GIL_FREE_COPY_BYTES:
            dst_array = np.frombuffer(dst, dtype=np.uint8)
            ctypes.memmove(dst_array.ctypes.data, mapping.address + target.offset,
                           target.length)
        elif target.length:
            dst[:] = mapping.segment.view[target.offset:target.offset + target.length]

    def forget(self, shm_name: str) -> None:
        """Drop the cached mapping of one segment (e.g. its daemon left). Idempotent."""
        with self._lock:
            self._name_to_mapping.pop(shm_name, None)
        # NOTE: no explicit unmap: a thread may be copying through this mapping right now
        # (memmove on its raw address). The mapping is unmapped when its last reference goes,
        # which is after every copy that holds it has finished.

    def close(self) -> None:
        with self._lock:
            self._closed = True
            names = list(self._name_to_mapping)
        for shm_name in names:
            self.forget(shm_name)

    def _range(self, target: Target) -> _Mapping:
        """The mapping of ``target``'s segment, after checking the range lies inside it."""
        mapping = self._mapping(target)
        if target.offset < 0 or target.length < 0 or \
                target.offset + target.length > mapping.size_bytes:
            raise TransferError(
                f"shm {target.node_id}: range [{target.offset}, +{target.length}) is outside "
                f"segment {target.segment_id!r} of {mapping.size_bytes} bytes")
        return mapping

    def _mapping(self, target: Target) -> _Mapping:
        # NOTE: the hit path takes no lock: dict.get is atomic under the GIL, and a copy that
        # races close() or forget() is safe, since dropping a mapping never unmaps it while
        # this reference lives (see forget()).
        mapping = self._name_to_mapping.get(target.shm_name)
        if mapping is not None and not self._closed:
            return mapping
        with self._lock:
            if self._closed:
                raise ClosedError(f"shm {target.node_id}: transport is closed")
            mapping = self._name_to_mapping.get(target.shm_name)
            if mapping is not None:
                return mapping
            stale = self._pop_unlinked()
            try:
                mapping = _Mapping(open_shm(target.shm_name))
            except OSError as exc:
                raise TransferError(f"shm {target.node_id}: cannot map segment "
                                    f"{target.segment_id!r} ({target.shm_name}): {exc}") from exc
            self._name_to_mapping[target.shm_name] = mapping
        del stale  # NOTE: see forget(): dropping the last reference unmaps
        return mapping

    def _pop_unlinked(self) -> list[_Mapping]:
        """Remove (under the lock) mappings of segments whose name is gone: their daemon
        exited, and our mapping is all that keeps their memory allocated."""
        gone = [name for name in self._name_to_mapping
                if not os.path.exists(f"{SHM_DIR}{name}")]
        return [self._name_to_mapping.pop(name) for name in gone]
