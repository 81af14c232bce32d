"""POSIX shared-memory segments: created by a daemon, mapped by same-host clients.

Resource handling: ``create_shm`` creates the object with ``O_EXCL`` and mode 0600 (readable
and writable by the daemon's user only) and returns a ``SharedSegment`` whose ``close``
unmaps it and ``unlink`` removes the name. ``open_shm`` maps an existing object; its owner
(the daemon) decides when the name goes away, so a client only ever unmaps.

NOTE: we call ``_posixshmem`` (what ``multiprocessing.shared_memory`` is built on) rather than
``SharedMemory`` itself, because before Python 3.13 a ``SharedMemory`` opened by a client is
registered with the resource tracker, which unlinks the daemon's segment when the client exits.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import secrets
import threading

import _posixshmem

from kvstore.transport.hostid import local_host_id

log = logging.getLogger("kvstore.shm")

SHM_MODE = 0o600

#: Page tables are filled (MADV_POPULATE_WRITE) in chunks of this many bytes, the first time
#: a copy (the daemon's data plane, a client's shm transport) touches the chunk.
POPULATE_CHUNK_BYTES = 2 << 20
_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux >= 5.14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_populate_supported = True


class SharedSegment:
    """One mapped shared-memory object. ``view`` is a writable byte memoryview of all of it."""

    def __init__(self, name: str, mapping: mmap.mmap, *, owner: bool):
        self.name = name
        self.size_bytes = len(mapping)
        self.owner = owner
        self._mapping = mapping
        self.view = memoryview(mapping)

    def close(self) -> None:
        """Unmap. Idempotent. Views handed out earlier must be released first (or the unmap
        is deferred to garbage collection; the mapping stays valid until then)."""
        if self._mapping is None:
            return
        release_mapping(self.view, self._mapping)
        self._mapping = None

    def unlink(self) -> None:
        """Remove the name (owner only); mappings that exist stay valid. Idempotent."""
        try:
            _posixshmem.shm_unlink(self.name)
        except FileNotFoundError:
            pass


def release_mapping(view: memoryview, mapping: mmap.mmap) -> None:
    """Release ``view`` and unmap ``mapping`` now, or when the last slice of the view goes.

    NOTE: a caller may still hold a slice of the view (a copy in flight); then the kernel
    unmaps when the last reference goes away, which is safe: the memory stays valid until then.
    """
    try:
        view.release()
        mapping.close()
    except BufferError:
        pass


#: ``{prefix}-{host tag}-{pid}-{16 hex}``: what ``unique_shm_name`` makes (without the "/")
SHM_NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{16}$")


def host_tag() -> str:
    """8 hex characters of this machine's host id, embedded in every name we create."""
    return local_host_id()[:8]


def unique_shm_name(prefix: str) -> str:
    """A fresh, hard-to-guess name: ``/{prefix}-{host tag}-{pid}-{random}`` (never fixed).

    The host tag and pid say which process on which machine created it, so a later daemon can
    tell an orphan (creator dead, same machine) from a live segment (see SHM_NAME_RE).
    """
    safe_prefix = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in prefix)[:64]
    return f"/{safe_prefix}-{host_tag()}-{os.getpid()}-{secrets.token_hex(8)}"


def create_shm(name: str, size_bytes: int, *, prefault: bool = True) -> SharedSegment:
    """Create, size and map a new shared-memory object with mode 0600.

    With ``prefault`` the filesystem must have ``size_bytes`` free now (else OSError naming
    /dev/shm), and the owner then allocates the pages off the critical path
    (``allocate_in_background``). NOTE: why not here: posix_fallocate of 8 GiB took 2-6 s
    and MAP_POPULATE another 8-15 s before the daemon could listen; page tables are filled per
    chunk on first use instead (``ChunkPopulator``), by the daemon and by each client.

    Raises FileExistsError if the name is taken and OSError if the system refuses (e.g. the
    size exceeds /dev/shm); nothing is left behind on failure.
    """
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=SHM_MODE)
    try:
        # NOTE: the umask may have dropped bits but never adds any; fchmod makes 0600 exact.
        os.fchmod(fd, SHM_MODE)
        if prefault and size_bytes:
            stats = os.fstatvfs(fd)
            free_bytes = stats.f_bavail * stats.f_frsize
            if free_bytes < size_bytes:
                raise OSError(28, f"cannot allocate {size_bytes} bytes of shared memory for "
                                  f"{name}: only {free_bytes} free (is /dev/shm large enough?)")
        os.ftruncate(fd, size_bytes)
        mapping = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        _posixshmem.shm_unlink(name)
        raise
    os.close(fd)
    return SharedSegment(name, mapping, owner=True)


def allocate_in_background(name: str, size_bytes: int, stop: "threading.Event") -> None:
    """Allocate every page of shm object ``name`` (posix_fallocate, 256 MiB per call) until
    done or ``stop`` is set; for a background thread. Never raises: a failure (the
    filesystem filled up meanwhile) is logged, and the pages are then allocated on first
    touch (a touch that finds no memory is a SIGBUS, as without prefault)."""
    step = 256 << 20
    try:
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0)
    except OSError:
        return  # unlinked meanwhile (stopped)
    try:
        for start in range(0, size_bytes, step):
            if stop.is_set():
                return
            os.posix_fallocate(fd, start, min(step, size_bytes - start))
        log.debug("allocated all %d bytes of %s", size_bytes, name)
    except OSError as exc:
        log.error("cannot allocate all %d bytes of shared memory for %s (%s): /dev/shm is "
                  "short; writes into unallocated pages may fail", size_bytes, name, exc)
    finally:
        os.close(fd)


def populate_range(address: int, length: int) -> bool:
    """Fill this process's page tables for [address, address + length) of a shared mapping
    (MADV_POPULATE_WRITE; the range is widened to whole pages). Returns False where the kernel
    lacks it (before Linux 5.14): pages then fault in on first touch, as before. Never raises.
    """
    global _populate_supported
    if not _populate_supported or length <= 0:
        return False
    start = address & ~(mmap.PAGESIZE - 1)
    if _libc.madvise(start, address + length - start, _MADV_POPULATE_WRITE) != 0:
        errno = ctypes.get_errno()
        if errno == 22:  # EINVAL: the kernel does not know the advice
            _populate_supported = False
            log.info("MADV_POPULATE_WRITE unsupported here; shm pages fault in on first touch")
        return False
    return True


class ChunkPopulator:
    """Fills this process's page tables for a mapping one POPULATE_CHUNK_BYTES chunk at a
    time, the first time a copy touches the chunk (a byte per chunk remembers). Races are
    harmless: populating a chunk twice is."""

    def __init__(self, address: int, size_bytes: int):
        self._address = address
        self._size_bytes = size_bytes
        self._chunk_populated = bytearray(-(-size_bytes // POPULATE_CHUNK_BYTES))

    @property
    def chunk_flags(self) -> bytearray | None:
        """One byte per chunk, nonzero once populated, for a caller that populates chunks
        itself (``kvstore._copy_hash.read_ranges``); None where the kernel lacks
        MADV_POPULATE_WRITE (nothing to populate)."""
        return self._chunk_populated if _populate_supported else None

    def ensure(self, offset: int, length: int) -> None:
        """Populate the chunks of [offset, +length) not yet populated (never raises)."""
        if length <= 0:
            return
        first = offset // POPULATE_CHUNK_BYTES
        last = (offset + length - 1) // POPULATE_CHUNK_BYTES
        flags = self._chunk_populated
        if flags.find(0, first, last + 1) < 0:
            return
        start = first * POPULATE_CHUNK_BYTES
        end = min((last + 1) * POPULATE_CHUNK_BYTES, self._size_bytes)
        if populate_range(self._address + start, end - start):
            flags[first:last + 1] = b"\x01" * (last + 1 - first)


def open_shm(name: str) -> SharedSegment:
    """Map an existing shared-memory object read-write (OSError if absent or not allowed).

    NOTE: mapped lazily (no MAP_POPULATE: it cost a new client ~0.1 s per GiB of segment on
    its first put); the transport populates the chunks a copy touches (``ChunkPopulator``).
    """
    fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0)
    try:
        size_bytes = os.fstat(fd).st_size
        mapping = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return SharedSegment(name, mapping, owner=False)
