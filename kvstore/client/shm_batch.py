"""The same-host batch read: a ``batch_get_into`` whose replicas are in shm segments on this
host, with no per-key Python between the GetReplicas reply and the copies.

The reply's parallel arrays go as lists straight to ``kvstore._copy_hash.read_ranges``, which
per key picks the first replica in a mapped segment, checks the range and the destination,
copies and (verify, the default) hashes while copying, and compares with the recorded
checksum, in one call that releases the GIL once. No Target or ReplicaSet is built for those
keys, large or small (the copies release the GIL once the batch moves 16 KiB, and the chunks
of the segments they touch get their page tables filled as the shm transport does). NOTE:
why: for 1,024 objects of 64 bytes that per-key Python (Target and ReplicaSet
objects, routing, ReadJobs, per-item checks in the transport) cost several times the master
call and the copies together (bench/small_objects_bench.py).

Every key the C call does not serve (no mapped replica, a range outside its segment, a
destination that is not a writable C-contiguous buffer or too small, a digest that does not
match) takes the general path: its Targets are
decoded and it is read through ``Transfers.read``, which falls back replica by replica and
reports the error naming the key. So results and errors are those of ``reader.get_batch``;
only the route differs. Items the master refused (not found, ...) get its error, as there.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from kvstore._copy_hash import read_ranges
from kvstore._posix_shm import POPULATE_CHUNK_BYTES
from kvstore._errors import InvalidArgumentError, KVStoreError, MasterUnavailableError
from kvstore.client.checksum import EMPTY_CHECKSUM
from kvstore.client.reader import CODEC_RAW, GetSettings, plan_read
from kvstore.client.shm_locations import vouched_entries
from kvstore.client.transfer import ReadJob, Transfers
from kvstore.client.values import as_destination
from kvstore.rpc import MasterClient, ReplicaSet
from kvstore.rpc.errors import item_error, malformed
from kvstore.rpc.messages import decode_targets, segment_prefixes
from kvstore.rpc.methods import METHODS
from kvstore.transport.base import Target
from kvstore.transport.shm import ShmTransport
from kvstore.v1 import master_pb2 as pb

#: Keys longer than this (characters) or not ASCII get the general path's per-key check.
_PLAIN_KEY_CHARS = 256
_PER_KEY_FIELDS = ("statuses", "sizes", "checksums", "codecs", "replica_start",
                   "replica_count")


def shm_first(transfers: Transfers) -> ShmTransport | None:
    """The shm transport when it is ``transfers``' most preferred one (else None: this path
    would pick replicas in another order than ``Transfers.route``)."""
    first = transfers.transports[0] if transfers.transports else None
    return first if isinstance(first, ShmTransport) else None


def _plain_keys(keys: Sequence[Any]) -> bool:
    """True when every key is a non-empty ASCII str of at most 256 characters (so valid);
    checked with C-level passes over the list, not a Python loop."""
    try:
        joined = "".join(keys)
    except TypeError:
        return False
    return all(keys) and joined.isascii() and max(map(len, keys)) <= _PLAIN_KEY_CHARS


def _tensor_type() -> type | None:
    """torch.Tensor if the caller imported torch (only then can an out be a tensor)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def get_into_batch(master: MasterClient, transfers: Transfers, shm: ShmTransport,
                   keys: Sequence[Any], outs: Sequence[Any], settings: GetSettings
                   ) -> list[Any] | None:
    """``reader.get_batch`` with ``outs`` for a batch whose keys are plain, or None when the
    batch is not one (the caller runs ``get_batch``; nothing was sent). Raises as
    ``get_batch``."""
    if not keys or not _plain_keys(keys):
        return None
    keys, dsts = list(keys), list(outs)
    request = pb.GetReplicasRequest(
        keys=keys, client_host_id=settings.host_id, shm_reads=True,
        lease_ttl_ms=int((settings.lease_ttl_s or 0) * 1000))
    try:
        reply = master.call(METHODS["GetReplicas"], request, settings.deadline)
    except MasterUnavailableError as exc:
        exc.keys = exc.keys or keys   # what failed, so an engine can recompute
        raise
    try:
        return _read(reply, transfers, shm, keys, outs, dsts, settings)
    finally:
        # NOTE: the reads are over (done or failed): no byte of the leased ranges is read
        # after this, so the lease may end now instead of at its TTL
        if settings.release is not None:
            settings.release(reply.lease_id)


def _read(reply: pb.GetReplicasResponse, transfers: Transfers, shm: ShmTransport,
          keys: list[str], outs: Sequence[Any], dsts: list[Any], settings: GetSettings
          ) -> list[Any]:
    num_keys = len(keys)
    # NOTE: a slice of a repeated field is a list made in one C call; list() iterates the
    # field from Python: 1.1 against 3.9 us per field measured here (issue 15m), and a get
    # takes eight of them
    per_key = [getattr(reply, field)[:] for field in _PER_KEY_FIELDS]
    for field, values in zip(_PER_KEY_FIELDS, per_key):
        if len(values) != num_keys:
            raise malformed("GetReplicas", f"{len(values)} {field} for {num_keys} keys")
    statuses, sizes, checksums, codecs, starts, counts = per_key
    errors: dict[int, KVStoreError] = {}
    if any(statuses) or any(codecs):   # NOTE: ITEM_OK and CODEC_RAW are both 0
        messages = reply.error_messages
        for i, status in enumerate(statuses):
            if status != pb.ITEM_OK:
                errors[i] = item_error(status, keys[i], "get",
                                       messages[i] if i < len(messages) else "")
            elif codecs[i] != CODEC_RAW:
                errors[i] = KVStoreError(f"get {keys[i]!r}: stored with codec {codecs[i]}, "
                                         "which this client cannot decode", keys=[keys[i]])
        for i in errors:
            dsts[i] = None   # not a destination: read_ranges hands the key back as slow
    segments = _segment_targets(reply)
    mappings = shm.segment_mappings(segments)
    replica_segment, replica_offset = reply.replica_segment[:], reply.replica_offset[:]
    written, slow = read_ranges(
        dsts, sizes, checksums, starts, counts, replica_segment, replica_offset,
        [m.address if m is not None else 0 for m in mappings],
        [m.size_bytes if m is not None else 0 for m in mappings],
        settings.verify, EMPTY_CHECKSUM,
        [m.populator.chunk_flags if m is not None else None for m in mappings],
        POPULATE_CHUNK_BYTES, _tensor_type())
    locations = settings.locations
    if locations is not None and locations.shm is shm:
        entries = vouched_entries(locations.shm_tables, keys, written, sizes, checksums,
                                  starts, counts, replica_segment, replica_offset, segments,
                                  mappings)
        if entries:   # NOTE: offered to the location cache (client/shm_locations.py)
            locations.insert_many(entries)
    del mappings   # NOTE: held until the copies are done: they keep the segments mapped
    if errors:
        slow = [i for i in slow if i not in errors]
    num_direct = num_keys - len(slow) - len(errors)
    transfers.count_reads(shm.name, num_direct,
                          sum(written) if not slow and not errors else
                          sum(w for w in written if w))
    results: list[Any] = written
    for i, error in errors.items():
        results[i] = error
    if slow:
        _read_slow(reply, transfers, keys, outs, sizes, checksums, codecs, slow, results,
                   settings)
    return results


def _segment_targets(reply: pb.GetReplicasResponse) -> list[Target]:
    """One Target (offset 0, length 0) per segment of the reply, naming its node;
    KVStoreError for a segment naming a node the reply lacks."""
    return [Target(*prefix, 0, 0) for prefix in segment_prefixes(reply)]


def _read_slow(reply: pb.GetReplicasResponse, transfers: Transfers, keys: list[str],
               outs: Sequence[Any], sizes: list[int], checksums: list[int], codecs: list[int],
               slow: list[int], results: list[Any], settings: GetSettings) -> None:
    """The general path (``reader.plan_read``, ``Transfers.read``) for the keys in
    ``slow``: only their Targets are decoded."""
    wanted = [False] * len(keys)
    for i in slow:
        wanted[i] = True
    targets = decode_targets(reply, sizes, wanted, reply.replica_read_capability)
    jobs: list[ReadJob] = []
    for i in slow:
        key = keys[i]
        try:
            dst = as_destination(outs[i])
        except InvalidArgumentError as exc:
            exc.keys = [key]
            results[i] = exc
            continue
        replica_set = ReplicaSet(sizes[i], checksums[i], codecs[i], targets[i])
        results[i] = plan_read(i, key, replica_set, dst, None, transfers, settings.verify, jobs)
    failures = transfers.read(jobs, deadline=settings.deadline)
    for i, error in failures.items():
        results[i] = error
    if settings.locations is not None:
        settings.locations.remember_reads(jobs, failures)
