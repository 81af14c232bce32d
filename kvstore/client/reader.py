"""The get flow of one batch: GetReplicas (grants a read lease) -> read each key from its best
replica, falling back to the next one -> verify checksums where required.

One GetReplicas per batch; bytes go through ``Transfers.read`` (one ``read_many`` per
transport per round). Keys that fail are reported per item and never with wrong bytes: when a
read fails the destination's contents are unspecified, but the result is an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvstore._errors import InvalidArgumentError, KVStoreError
from kvstore.client import statuses
from kvstore.client.buffers import as_destination
from kvstore.client.checksum import is_empty_marker
from kvstore.client.keys import check_key
from kvstore.client.replicas import MAX_KEYS_INDEXED_IN_PLACE, decode_targets
from kvstore.client.transfer import ReadJob, Transfers
from kvstore.master.rpc_client import MasterClient
from kvstore.v1 import master_pb2


@dataclass(frozen=True, slots=True)
class GetSettings:
    """What one get call asks for, besides keys and destinations."""

    deadline: float          # time.monotonic() by which the whole call must finish
    rpc_timeout_s: float
    host_id: str
    verify: bool
    lease_ttl_s: float | None = None


_PER_KEY_FIELDS = ("statuses", "sizes", "checksums", "codecs")

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
    request = master_pb2.GetReplicasRequest(
        keys=names, client_host_id=settings.host_id,
        lease_ttl_ms=int((settings.lease_ttl_s or 0) * 1000))
    timeout_s = max(0.001, min(settings.rpc_timeout_s, settings.deadline - time.monotonic()))
    reply = master.call("GetReplicas", request, timeout_s=timeout_s)
    statuses.check_lengths(reply, _PER_KEY_FIELDS, len(names), "GetReplicas")
    sizes, sums, codecs = reply.sizes, reply.checksums, reply.codecs
    if len(names) > MAX_KEYS_INDEXED_IN_PLACE:
        # NOTE: plain lists for batches: indexing protobuf repeated fields per key costs
        # more than copying them once (for a few keys the copies cost more)
        sizes, sums, codecs = list(sizes), list(sums), list(codecs)
    ok = [status == statuses.OK for status in reply.statuses]
    targets = decode_targets(reply, sizes, ok)
    jobs = []
    for j, key in enumerate(names):
        i = indices[j]
        if not ok[j]:
            results[i] = statuses.item_error(reply, j, key, "get")
            continue
        size, expected = sizes[j], sums[j]
        if codecs[j] != master_pb2.CODEC_RAW:
            results[i] = KVStoreError(f"get {key!r}: stored with codec {codecs[j]}, "
                                      "which this client cannot decode", keys=[key])
            continue
        if is_empty_marker(size, expected):
            size = 0
        if dsts[j] is None:
            holder, dst = allocate(size)
            results[i] = holder
        else:
            dst = dsts[j]
            if dst.nbytes < size:
                results[i] = InvalidArgumentError(
                    f"get_into {key!r}: out has {dst.nbytes} bytes, the object {size}",
                    keys=[key])
                continue
            dst = dst[:size]
            results[i] = size
        if size:
            jobs.append(ReadJob(i, key, transfers.route(targets[j]), dst, expected,
                                settings.verify))
    for i, error in transfers.read(jobs, deadline=settings.deadline).items():
        results[i] = error
    return results
