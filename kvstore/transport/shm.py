"""Same-host transport: map the daemon's shared-memory segment, copy with one memcpy.

No daemon round-trip: the first access to a segment maps it (by its POSIX shm name) and the
mapping is cached; every later read or write is one memcpy between the caller's buffer and
the mapping.

A mapping of a segment whose name is gone is never used. A daemon unlinks its segment's name
when it stops (and orphan reaping unlinks the name of a SIGKILLed one), after which our
mapping would be the only thing keeping that memory alive: a write into it would be lost
while reporting success, and a read would return bytes no daemon serves any more. Each
call checks the link count of each segment it touches on a descriptor kept with the mapping
(one ``fstat`` per segment per call: a batch checks a segment at its first item), and an
unlinked segment is dropped and refused with ``TransferError``, so the client falls back to
the next replica. Mappings of nodes the master dropped are never named by its answers
again; they are released when mapping another segment prunes every unlinked name, or at
``close()``. Copies of at least ``GIL_FREE_COPY_BYTES`` go
through ``kvstore._copy_hash.copy``, which releases the GIL, so other threads (the engine, a
parallel batch) keep running during a large copy, and stores non-temporally from 1 MiB (the
destination's lines are not read first: 1.5-1.75x glibc's memcpy for a put's 4 MiB here).
With ``copy_threads=2`` a write of 2 MiB or more shares its copy with a helper thread
(``kvstore._copy_hash.copy``'s ``num_threads``, csrc/cpu/copy_split.h), so a same-host put
moves at two cores' copy bandwidth where the second core is free; the caller never waits
for a helper that was not scheduled (it then copies everything itself).
"""

from __future__ import annotations

import os
import threading
from typing import Sequence

import numpy as np

from kvstore._copy_hash import copy, copy_hash_many
from kvstore._errors import ClosedError, InvalidArgumentError, TransferError
from kvstore._posix_shm import ChunkPopulator, SharedSegment, open_shm
from kvstore.transport import byte_views
from kvstore.transport.base import Target, Transport, _each
from kvstore.transport.hostid import local_host_id

# NOTE: below this, releasing the GIL (~1 us) and slicing the mapping outweigh letting other
# threads run; the slice assignment copies under the GIL.
GIL_FREE_COPY_BYTES = 256 * 1024
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shm names


class _Mapping:
    """A cached mapping of one segment plus its base address (for read_ranges).

    The mapping is lazy; ``populator`` fills the page tables of the chunks a copy touches,
    once per chunk. NOTE: why: a first put into a fresh 8 GiB mapping then costs ~2 ms for
    4 MiB instead of ~1 s (populating everything at map time), and later copies still run at
    memcpy speed instead of taking a minor fault per 4 KiB page.
    """

    def __init__(self, segment: SharedSegment, name_file):
        self.segment = segment
        self.array = np.frombuffer(segment.view, dtype=np.uint8)
        self.address = self.array.ctypes.data
        self.size_bytes = segment.size_bytes
        # NOTE: a descriptor of the segment's file, closed only with this object (never
        # explicitly), so fstat never reaches a reused descriptor number.
        self.name_file = name_file
        self.name_fd = name_file.fileno()
        self.populator = ChunkPopulator(self.address, self.size_bytes)

    def is_unlinked(self) -> bool:
        """True once the segment's name was removed (its daemon stopped or was reaped)."""
        return os.fstat(self.name_fd).st_nlink == 0


class ShmTransport(Transport):
    """Reads and writes DRAM segments of daemons on this host through shared memory.

    Reachable targets: a non-empty ``shm_name`` and ``host_id`` equal to ours. Segments are
    mapped read-write on first use and stay mapped until ``close()`` or until their name is
    unlinked (see the module docstring). Thread-safe: the mapping
    cache is guarded by a lock; concurrent copies into disjoint ranges are independent.

    Errors: ``TransferError`` naming the node when the segment cannot be mapped (gone,
    permission) or the range runs past its end; ``InvalidArgumentError`` when the caller's
    buffer length differs from ``target.length``. Nothing is copied when an error is raised.
    """

    name = "shm"

    def __init__(self, *, host_id: str | None = None, copy_threads: int = 1):
        if isinstance(copy_threads, bool) or not isinstance(copy_threads, int) or \
                copy_threads not in (1, 2):
            raise InvalidArgumentError(f"copy_threads must be 1 or 2, got {copy_threads!r}")
        self.host_id = host_id or local_host_id()
        # threads a write of 2 MiB or more copies with (also the reserved put's copy + hash,
        # client/reservations.py)
        self.copy_threads = copy_threads
        self._lock = threading.Lock()
        self._name_to_mapping: dict[str, _Mapping] = {}
        self._closed = False

    def can_reach(self, target: Target) -> bool:
        return bool(target.shm_name) and target.host_id == self.host_id

    def write(self, target: Target, src: memoryview, *, timeout_s: float) -> None:
        self._write(target, src, None)

    def read_into(self, target: Target, dst: memoryview, *, timeout_s: float) -> None:
        self._read(target, dst, None)

    def write_many(self, items: Sequence[tuple[Target, memoryview]], *,
                   timeout_s: float) -> list[BaseException | None]:
        checked: set[str] = set()    # segments found linked in this batch
        return _each(lambda target, src, timeout_s: self._write(target, src, checked),
                     items, timeout_s)

    def read_many(self, items: Sequence[tuple[Target, memoryview]], *,
                  timeout_s: float) -> list[BaseException | None]:
        checked: set[str] = set()
        return _each(lambda target, dst, timeout_s: self._read(target, dst, checked),
                     items, timeout_s)

    def writable_range(self, target: Target, checked: set[str] | None = None) -> memoryview:
        """A writable view of ``target``'s range in its mapped segment, its page tables
        populated, for a writer that fills the range itself (``kvstore.client.reserve``)
        instead of handing a source to ``write``. The view keeps the mapping alive; bytes
        written through it are in the segment at once. ``checked``: as ``write_many``'s, the
        names of segments already found linked by this batch's earlier calls (updated; None:
        check every call). Raises TransferError as ``write`` (segment gone or unlinked,
        range outside it)."""
        mapping = self._range(target, checked)
        mapping.populator.ensure(target.offset, target.length)
        return mapping.segment.view[target.offset:target.offset + target.length]

    def populate_mapped(self) -> int:
        """Populate this process's page tables for the whole of every segment mapped so far
        (what copies do chunk by chunk on first touch), e.g. once at an engine's start-up;
        returns the bytes of the segments covered. Never raises (a kernel without
        MADV_POPULATE_WRITE leaves pages to fault in, as before)."""
        total = 0
        for mapping in list(self._name_to_mapping.values()):
            mapping.populator.ensure(0, mapping.size_bytes)
            total += mapping.size_bytes
        return total

    def _write(self, target: Target, src: memoryview, checked: set[str] | None) -> None:
        src = byte_views.as_bytes_view(src, target.length)
        mapping = self._range(target, checked)
        mapping.populator.ensure(target.offset, target.length)
        if target.length >= GIL_FREE_COPY_BYTES:
            copy(mapping.segment.view[target.offset:target.offset + target.length], src,
                 self.copy_threads)
        elif target.length:
            mapping.segment.view[target.offset:target.offset + target.length] = src

    def read_many_checksummed(self, items: Sequence[tuple[Target, memoryview]], *,
                              timeout_s: float
                              ) -> tuple[list[BaseException | None], list[int | None]]:
        """``read_many`` whose copies also hash: every range is copied into its buffer and
        the copied bytes hashed in one pass (``kvstore._copy_hash``, cache-sized chunks), all
        items in one call that releases the GIL once. The checks (mapping, range, buffer)
        run per item first; a failed item is neither copied nor hashed."""
        checked: set[str] = set()
        results: list[BaseException | None] = []
        dsts, srcs, copied = [], [], []
        for index, (target, dst) in enumerate(items):
            try:
                dst = byte_views.as_bytes_view(dst, target.length, writable=True)
                mapping = self._range(target, checked)
                mapping.populator.ensure(target.offset, target.length)
            except Exception as exc:  # noqa: BLE001 - reported per item
                results.append(exc)
                continue
            results.append(None)
            dsts.append(dst)
            # NOTE: a slice of the segment's view, not its raw address: the slice keeps the
            # mapping alive for the copy even if forget() drops it meanwhile
            srcs.append(mapping.segment.view[target.offset:target.offset + target.length])
            copied.append(index)
        digests: list[int | None] = [None] * len(items)
        for index, digest in zip(copied, copy_hash_many(dsts, srcs)):
            digests[index] = digest
        return results, digests

    def segment_mappings(self, segments: Sequence[Target]) -> list[_Mapping | None]:
        """The mapping of each segment ``segments`` name (only their node, host, segment
        and shm-name fields count), for a batch read that copies from the mappings' raw
        addresses itself (``kvstore._copy_hash.read_ranges``, client/shm_batch.py): None
        where this transport does not reach the segment, cannot map it, or finds its name
        unlinked. Each mapping's ``address`` and ``size_bytes`` stay valid while the caller
        holds it. One link check per segment, as ``read_many`` does; never raises for a
        segment (its keys' reads through ``read_many`` then report why)."""
        checked: set[str] = set()
        mappings: list[_Mapping | None] = []
        for target in segments:
            mapping = None
            if self.can_reach(target):
                try:
                    mapping = self._mapping(target, checked)
                except (TransferError, ClosedError):
                    mapping = None
            mappings.append(mapping)
        return mappings

    def _read(self, target: Target, dst: memoryview, checked: set[str] | None) -> None:
        dst = byte_views.as_bytes_view(dst, target.length, writable=True)
        mapping = self._range(target, checked)
        mapping.populator.ensure(target.offset, target.length)
        if target.length >= GIL_FREE_COPY_BYTES:
            copy(dst, mapping.segment.view[target.offset:target.offset + target.length])
        elif target.length:
            dst[:] = mapping.segment.view[target.offset:target.offset + target.length]

    def forget(self, shm_name: str) -> None:
        """Drop the cached mapping of one segment (e.g. its daemon left). Idempotent."""
        with self._lock:
            self._name_to_mapping.pop(shm_name, None)
        # NOTE: no explicit unmap: a thread may be copying through this mapping right now
        # (read_ranges on its raw address). The mapping is unmapped when its last reference goes,
        # which is after every copy that holds it has finished.

    def close(self) -> None:
        with self._lock:
            self._closed = True
            names = list(self._name_to_mapping)
        for shm_name in names:
            self.forget(shm_name)

    def _range(self, target: Target, checked: set[str] | None) -> _Mapping:
        """The mapping of ``target``'s segment, after checking the range lies inside it.

        ``checked``: names of segments already found linked in this batch (None: check)."""
        mapping = self._mapping(target, checked)
        if target.offset < 0 or target.length < 0 or \
                target.offset + target.length > mapping.size_bytes:
            raise TransferError(
                f"shm {target.node_id}: range [{target.offset}, +{target.length}) is outside "
                f"segment {target.segment_id!r} of {mapping.size_bytes} bytes")
        return mapping

    def _mapping(self, target: Target, checked: set[str] | None) -> _Mapping:
        # NOTE: the hit path takes no lock: dict.get is atomic under the GIL, and a copy that
        # races close() or forget() is safe, since dropping a mapping never unmaps it while
        # this reference lives (see forget()).
        mapping = self._name_to_mapping.get(target.shm_name)
        if mapping is not None and not self._closed:
            # NOTE: one fstat per segment per call (1-2.5 us here), not per item of a batch
            if checked is None or target.shm_name not in checked:
                if mapping.is_unlinked():
                    self._refuse_unlinked(target)
                if checked is not None:
                    checked.add(target.shm_name)
            return mapping
        with self._lock:
            if self._closed:
                raise ClosedError(f"shm {target.node_id}: transport is closed")
            mapping = self._name_to_mapping.get(target.shm_name)
            if mapping is not None:
                if not mapping.is_unlinked():
                    return mapping
                del self._name_to_mapping[target.shm_name]   # NOTE: the lock is held here
                raise _unlinked_error(target)
            stale = self._pop_unlinked()
            try:
                # NOTE: the descriptor is opened before the mapping, so a name unlinked in
                # between is seen as unlinked by the first check, never missed.
                name_file = open(f"{SHM_DIR}{target.shm_name}", "rb", buffering=0)
                try:
                    mapping = _Mapping(open_shm(target.shm_name), name_file)
                except BaseException:
                    name_file.close()
                    raise
                if mapping.is_unlinked():
                    raise FileNotFoundError("the segment's name was unlinked")
            except OSError as exc:
                raise TransferError(f"shm {target.node_id}: cannot map segment "
                                    f"{target.segment_id!r} ({target.shm_name}): {exc}") from exc
            self._name_to_mapping[target.shm_name] = mapping
        del stale  # NOTE: see forget(): dropping the last reference unmaps
        return mapping

    def _refuse_unlinked(self, target: Target) -> None:
        """Drop the mapping of an unlinked segment and raise (caller must not hold the lock)."""
        self.forget(target.shm_name)
        raise _unlinked_error(target)

    def _pop_unlinked(self) -> list[_Mapping]:
        """Remove (under the lock) mappings of segments whose name is gone: their daemon
        exited, and our mapping is all that keeps their memory allocated."""
        gone = [name for name, mapping in self._name_to_mapping.items()
                if mapping.is_unlinked()]
        return [self._name_to_mapping.pop(name) for name in gone]


def _unlinked_error(target: Target) -> TransferError:
    return TransferError(f"shm {target.node_id}: segment {target.segment_id!r} "
                         f"({target.shm_name}) was unlinked: its daemon is gone")
