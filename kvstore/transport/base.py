"""The seam every transport implements: move bytes between a local buffer and a byte range
of a node's segment.

A transport never talks to the master; the client resolves a key to ``Target`` ranges first
(through ``get_replicas``/``put_start``) and hands them here. Implementations: ``shm`` (same
host: map the daemon's segment, one memcpy), ``tcp`` (any host, through the daemon's
data-plane server) and, later, ``nixl`` (RDMA/NVLink one-sided reads and writes into
registered memory; ``register_memory`` is the hook for it).
"""

from __future__ import annotations

import abc
from typing import Callable, NamedTuple, Sequence


class Target(NamedTuple):
    """One byte range of one segment on one node: where a replica's bytes live.

    NOTE: a NamedTuple rather than a frozen dataclass: a get builds one per replica of every
    key, and a frozen dataclass cost 851 ns to build here, a NamedTuple ~300 ns.
    """

    node_id: str
    host_id: str          # the node's machine; shm is possible iff it equals ours
    data_addr: str        # "host:port" of the node's data-plane server
    segment_id: str
    shm_name: str         # DRAM segments: the POSIX shm name; "" when not mappable
    offset: int           # bytes from the start of the segment
    length: int           # bytes
    # the master's permission to write this range (PutStart) or to read it (GetReplicas),
    # kvstore/capability.py, sent with the WRITE or READ; b"" for nodes that do not check
    # them (and for same-host replicas a shm reader gets without one)
    capability: bytes = b""


class Transport(abc.ABC):
    """Moves bytes between caller buffers and node segments.

    Buffers are writable/readable memoryviews of exactly ``target.length`` bytes (C-contiguous,
    format "B"). Every method either completes the whole range or raises
    ``kvstore.TransferError`` (``TransferTimeoutError`` past ``timeout_s``) naming the node;
    it never reports success for a partial copy. Thread-safe unless the class says otherwise.
    """

    #: short name used in logs and stats ("shm", "tcp", "nixl")
    name: str = "abstract"

    @abc.abstractmethod
    def can_reach(self, target: Target) -> bool:
        """True if this transport can serve ``target`` from this process (cheap, no I/O)."""

    @abc.abstractmethod
    def write(self, target: Target, src: memoryview, *, timeout_s: float) -> None:
        """Copy ``src`` into the target range."""

    @abc.abstractmethod
    def read_into(self, target: Target, dst: memoryview, *, timeout_s: float) -> None:
        """Copy the target range into ``dst``."""

    def write_many(self, items: Sequence[tuple[Target, memoryview]], *,
                   timeout_s: float) -> list[BaseException | None]:
        """Write each (target, src); one entry per item, None on success. Transports override
        this to pipeline or parallelize; the default runs them one after another."""
        return _each(self.write, items, timeout_s)

    def read_many(self, items: Sequence[tuple[Target, memoryview]], *,
                  timeout_s: float) -> list[BaseException | None]:
        """Read each (target, dst); one entry per item, None on success."""
        return _each(self.read_into, items, timeout_s)

    def read_many_checksummed(self, items: Sequence[tuple[Target, memoryview]], *,
                              timeout_s: float
                              ) -> tuple[list[BaseException | None], list[int | None]]:
        """``read_many``, plus the checksum (``kvstore.client.checksum``) of the bytes each
        successful item received (None for a failed one). The default reads, then hashes
        each buffer; a transport that can hash while it copies overrides it (shm)."""
        # NOTE: imported here: kvstore.client imports the transports (a cycle at load time)
        from kvstore.client.checksum import checksum
        results = self.read_many(items, timeout_s=timeout_s)
        return results, [checksum(dst) if exc is None else None
                          for (_, dst), exc in zip(items, results)]

    def register_memory(self, buffer: memoryview) -> object | None:
        """Register a buffer for one-sided transfers (RDMA/NVLink); None where not needed."""
        return None

    def close(self) -> None:
        """Release connections and mappings. Idempotent."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _each(copy: Callable[..., None], items: Sequence[tuple[Target, memoryview]],
          timeout_s: float) -> list[BaseException | None]:
    """Run ``copy(target, buffer, timeout_s=...)`` per item; None or the exception, in order."""
    results: list[BaseException | None] = []
    for target, buffer in items:
        try:
            copy(target, buffer, timeout_s=timeout_s)
            results.append(None)
        except Exception as exc:  # noqa: BLE001 - reported per item
            results.append(exc)
    return results
