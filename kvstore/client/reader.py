"""The get flow of one batch: GetReplicas (grants a read lease) -> read each key from its best
replica, falling back to the next one -> verify checksums where required -> hand the lease id
to ``settings.release`` (``leases.LeaseReleaser``: the lease ends without waiting its TTL).

One GetReplicas per batch; bytes go through ``Transfers.read`` (one ``read_many`` per
transport per round). Keys that fail are reported per item and never with wrong bytes: when a
read fails the destination's contents are unspecified, but the result is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvstore._deadline import Deadline
from kvstore._errors import InvalidArgumentError, KVStoreError, MasterUnavailableError
from kvstore.client.checksum import is_empty_marker
from kvstore.client.key_checks import check_key
from kvstore.client.transfer import ReadJob, Transfers
from kvstore.client.values import as_destination
from kvstore.rpc import MasterClient, ReplicaSet

#: Codec (kvstore.v1.Codec) of objects stored as their raw bytes: the only one a get reads.
CODEC_RAW = 0


@dataclass(frozen=True, slots=True)
class GetSettings:
    """What one get call asks for, besides keys and destinations."""

    deadline: Deadline       # by which the whole call must finish
    host_id: str
    verify: bool
    lease_ttl_s: float | None = None
    # called with the call's lease id once its reads are done (ends the lease early)
    release: Callable[[int], None] | None = None
    # told the replicas reads succeeded from (client/location_cache.py); None: no cache
    locations: Any = None


# A destination factory: object size -> (result holder, writable view of exactly that size).
Allocate = Callable[[int], tuple[Any, memoryview]]


def get_batch(master: MasterClient, transfers: Transfers, keys: Sequence[Any],
              outs: Sequence[Any] | None, allocate: Allocate | None,
              settings: GetSettings) -> list[Any]:
    """Read each key. With ``outs``: into ``outs[i]``, result = bytes written. Without: into a
    buffer from ``allocate(size)``, result = its holder. One result or KVStoreError per key.
    Raises only for failures of the whole batch (master unreachable, wrong token)."""
    results: list[Any] = [None] * len(keys)
    indices, names, dsts = [], [], []
    for i, key in enumerate(keys):
        try:
            check_key(key)
            dst = as_destination(outs[i]) if outs is not None else None
        except InvalidArgumentError as exc:
            exc.keys = [key] if isinstance(key, str) else []
            results[i] = exc
            continue
        indices.append(i)
        names.append(key)
        dsts.append(dst)
    if not names:
        return results
    try:
        found, lease_id = master.get_replicas_leased(
            names, client_host_id=settings.host_id, lease_ttl_s=settings.lease_ttl_s,
            deadline=settings.deadline, shm_reads=transfers.shm_reads)
    except MasterUnavailableError as exc:
        exc.keys = exc.keys or list(names)   # what failed, so an engine can recompute
        raise
    jobs = []
    for j, key in enumerate(names):
        i = indices[j]
        replica_set = found[j]
        if isinstance(replica_set, KVStoreError):
            results[i] = replica_set
            continue
        results[i] = plan_read(i, key, replica_set, dsts[j], allocate, transfers,
                               settings.verify, jobs)
    try:
        failures = transfers.read(jobs, deadline=settings.deadline)
        for i, error in failures.items():
            results[i] = error
        if settings.locations is not None:
            settings.locations.remember_reads(jobs, failures)
    finally:
        # NOTE: the reads are over (done or failed): no byte of the leased ranges is read
        # after this, so the lease may end now instead of at its TTL
        if settings.release is not None:
            settings.release(lease_id)
    return results


def plan_read(index: int, key: str, replica_set: ReplicaSet, dst: memoryview | None,
              allocate: Allocate | None, transfers: Transfers, verify: bool,
              jobs: list[ReadJob]) -> Any:
    """The result of key ``index`` before its bytes arrive (bytes to write, the holder from
    ``allocate``, or the key's error), appending its ReadJob to ``jobs`` when there are bytes
    to read. ``dst`` None: allocate a destination."""
    size, expected = replica_set.size_bytes, replica_set.checksum
    if replica_set.codec != CODEC_RAW:
        return KVStoreError(f"get {key!r}: stored with codec {replica_set.codec}, "
                            "which this client cannot decode", keys=[key])
    if is_empty_marker(size, expected):
        size = 0
    if dst is None:
        result, dst = allocate(size)
    else:
        if dst.nbytes < size:
            return InvalidArgumentError(
                f"get_into {key!r}: out has {dst.nbytes} bytes, the object {size}", keys=[key])
        dst = dst[:size]
        result = size
    if size:
        jobs.append(ReadJob(index, key, transfers.route(replica_set.targets), dst, expected,
                            verify))
    return result
