"""Zero-staging reads: read-only views of stored objects where they lie, in the shared-memory
segments of this host's daemons, held under the read lease of one GetReplicas.

    from kvstore.client.leased_views import lease_views

    with lease_views(store, keys) as leased:
        for view, digest in zip(leased.views, leased.checksums):
            ...            # a read-only memoryview (or None), and its recorded XXH3-64
    # the views are released and the lease ends here

Why: a get copies each object out of the segment into the caller's buffer, so a caller that
then copies it on (an engine scattering KV blocks into its paged cache) moves every byte
twice. Here the caller reads the segment's bytes itself, once (``kvstore.ops``' verified
scatters hash each block and write it only when it matches ``checksums[i]``).

Guarantees: while the context is open the master keeps every leased range (no eviction, no
reuse: the read lease of ``KVStore.batch_get``), up to the lease TTL; at exit the views are
released (a late read through one raises ValueError instead of reading space the master may
have reused) and the lease ends. The views are the stored bytes as they are: nothing here
checks them, the caller verifies against ``checksums`` (unverified bytes of a replica a
writer corrupted would be wrong). ``views[i]`` is None, and the caller must read key i
another way (``KVStore.batch_get_into``: other replicas, other transports, its error named),
when the key has no replica in a segment this process maps (another host, tcp-only, ssd), the
master refused it (``errors[i]``: not found, ...), its range lies outside the segment, or it
is stored with a codec or as the empty marker. Not thread-safe (one lease, one thread).

Errors: InvalidArgumentError (bad keys), ClosedError, MasterUnavailableError (the whole call,
naming the keys) from ``lease_views`` itself.

NOTE: a function of this module, not a ``KVStore`` method, for the reason of
``kvstore.client.reserve``: its views point into this process's mappings.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvstore._errors import InvalidArgumentError, KVStoreError, MasterUnavailableError
from kvstore.client.checksum import is_empty_marker
from kvstore.client.config import check_timeout
from kvstore.client.key_checks import check_key, check_keys
from kvstore.client.reader import CODEC_RAW
from kvstore.client.shm_batch import shm_first
from kvstore.client.values import release_views
from kvstore.rpc.errors import item_error, malformed
from kvstore.rpc.messages import segment_prefixes
from kvstore.rpc.methods import METHODS
from kvstore.transport.base import Target
from kvstore.v1 import master_pb2 as pb

_PER_KEY_FIELDS = ("statuses", "sizes", "checksums", "codecs", "replica_start",
                   "replica_count")


def lease_views(store: Any, keys: Sequence[str], *, timeout_s: float | None = None,
                lease_ttl_s: float | None = None) -> "LeasedViews":
    """Lease ``keys`` on ``store`` (a ``KVStore``) and hand out read-only views of their
    bytes in this host's shm segments; see the module docstring. One GetReplicas, at most
    the master's max_batch keys. Use as a context manager."""
    store._check_open()
    keys = [check_key(key) for key in check_keys(keys)]
    if len(keys) > store._max_batch:
        raise InvalidArgumentError(f"{len(keys)} keys: one lease holds at most the master's "
                                   f"max_batch ({store._max_batch})")
    ttl_s = (store.config.lease_ttl_s if lease_ttl_s is None
             else check_timeout(lease_ttl_s, "lease_ttl_s"))
    with store._closing_guard:
        return LeasedViews(store, keys, store._deadline(timeout_s), ttl_s)


class LeasedViews:
    """The views of one ``lease_views`` call: ``views``, ``checksums``, ``errors`` (one entry
    per key, in order)."""

    def __init__(self, store: Any, keys: list[str], deadline: Any, lease_ttl_s: float | None):
        self.keys = keys
        #: per key: a read-only view of its stored bytes, or None (read it another way)
        self.views: list[memoryview | None] = [None] * len(keys)
        #: per key: the address of views[i]'s first byte (0 where it is None), valid while
        #: the lease is open (``kvstore.ops.rows.RowAddresses`` takes them)
        self.addresses: list[int] = [0] * len(keys)
        #: per key: the XXH3-64 recorded at its put (0 where views[i] is None)
        self.checksums: list[int] = [0] * len(keys)
        #: per key: the master's error (not found, ...) or None
        self.errors: list[KVStoreError | None] = [None] * len(keys)
        self._release = store._leases.release if store._leases is not None else None
        self._lease_id = 0
        self._mappings: list = []
        shm = shm_first(store._transfers)
        if not keys or shm is None:
            return
        request = pb.GetReplicasRequest(keys=keys, client_host_id=store.host_id,
                                        shm_reads=True,
                                        lease_ttl_ms=int((lease_ttl_s or 0) * 1000))
        try:
            reply = store._master.call(METHODS["GetReplicas"], request, deadline)
        except MasterUnavailableError as exc:
            exc.keys = exc.keys or list(keys)
            raise
        self._lease_id = reply.lease_id
        try:
            self._map(reply, shm)
        except BaseException:
            self.close()
            raise

    def _map(self, reply: pb.GetReplicasResponse, shm: Any) -> None:
        keys = self.keys
        for field in _PER_KEY_FIELDS:
            if len(getattr(reply, field)) != len(keys):
                raise malformed("GetReplicas", f"{len(getattr(reply, field))} {field} for "
                                               f"{len(keys)} keys")
        # NOTE: held until close: a mapping stays valid (and its views' memory mapped) while
        # referenced
        self._mappings = shm.segment_mappings([Target(*prefix, 0, 0)
                                               for prefix in segment_prefixes(reply)])
        messages = reply.error_messages
        starts, counts = reply.replica_start, reply.replica_count
        segments, offsets = reply.replica_segment, reply.replica_offset
        for i, (status, size, digest, codec) in enumerate(
                zip(reply.statuses, reply.sizes, reply.checksums, reply.codecs)):
            if status != pb.ITEM_OK:
                self.errors[i] = item_error(status, keys[i], "get",
                                            messages[i] if i < len(messages) else "")
                continue
            if codec != CODEC_RAW or is_empty_marker(size, digest):
                continue
            for r in range(starts[i], starts[i] + counts[i]):
                mapping = (self._mappings[segments[r]] if r < len(segments) and
                           segments[r] < len(self._mappings) else None)
                offset = offsets[r] if r < len(offsets) else -1
                if mapping is None or offset < 0 or offset + size > mapping.size_bytes:
                    continue
                mapping.populator.ensure(offset, size)
                self.views[i] = mapping.segment.view[offset:offset + size].toreadonly()
                self.addresses[i] = mapping.address + offset
                self.checksums[i] = digest
                break

    def close(self) -> None:
        """Release the views and end the lease. Idempotent; never raises."""
        release_views(self.views)
        self.addresses = [0] * len(self.addresses)
        self._mappings = []
        lease_id, self._lease_id = self._lease_id, 0
        if lease_id and self._release is not None:
            self._release(lease_id)

    def __enter__(self) -> "LeasedViews":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
