"""The put flow of one batch: PutStart (values hashed while it runs) -> write every replica
-> PutEnd (or PutRevoke).

One PutStart and at most one PutEnd and one PutRevoke per batch, whatever its size; bytes go
through ``Transfers.write`` (one ``write_many`` per transport). A key whose write fails on any
replica is revoked (its space goes back to the pool) and reported with the transfer error;
the others are committed. A key that already exists is a success and nothing is written
(keys are content-addressed). If the caller is interrupted between PutStart and PutEnd, every
started key is revoked before the interruption propagates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from kvstore._errors import InvalidArgumentError, KVStoreError
from kvstore.client import statuses
from kvstore.client.buffers import as_source
from kvstore.client.checksum import EMPTY_CHECKSUM, EMPTY_PLACEHOLDER, checksum
from kvstore.client.keys import check_key
from kvstore.client.replicas import decode_targets
from kvstore.client.transfer import Transfers
from kvstore.master.rpc_client import MasterClient
from kvstore.v1 import master_pb2


@dataclass(frozen=True, slots=True)
class PutSettings:
    """What one put call asks for, besides keys and values."""

    replicas: int
    deadline: float          # time.monotonic() by which the whole call must finish
    rpc_timeout_s: float
    client_id: str
    host_id: str
    soft_pin_ttl_s: float | None = None
    hard_pin: bool = False
    tier: int = master_pb2.TIER_UNSPECIFIED


#: ``tier=`` names a put accepts -> the master's Tier (placement tries it first)
TIER_NAMES = {None: master_pb2.TIER_UNSPECIFIED, "hbm": master_pb2.TIER_HBM,
              "dram": master_pb2.TIER_DRAM, "ssd": master_pb2.TIER_SSD}


def check_tier(tier: Any) -> int:
    """The master's Tier for ``tier`` (None, "hbm", "dram" or "ssd"); InvalidArgumentError
    otherwise."""
    try:
        return TIER_NAMES[tier]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"tier must be None, 'hbm', 'dram' or 'ssd', got {tier!r}") from None


def check_replicas(replicas: Any) -> int:
    """``replicas`` as an int >= 1; InvalidArgumentError otherwise."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidArgumentError(f"replicas must be an int >= 1, got {replicas!r}")
    return replicas


def _rpc_timeout(settings: PutSettings) -> float:
    return max(0.001, min(settings.rpc_timeout_s, settings.deadline - time.monotonic()))


def put_batch(master: MasterClient, transfers: Transfers, keys: Sequence[Any],
              values: Sequence[Any], settings: PutSettings) -> list[KVStoreError | None]:
    """Store ``values[i]`` under ``keys[i]``; one result per key, in order (None: stored or
    already present). Raises only for failures of the whole batch (master unreachable, wrong
    token); bad keys or values fail just their item."""
    results: list[KVStoreError | None] = [None] * len(keys)
    first_index: dict[str, int] = {}
    duplicate_of: dict[int, int] = {}
    indices, names, sizes, sources = [], [], [], []
    for i, (key, value) in enumerate(zip(keys, values)):
        try:
            check_key(key)
            src = as_source(value)
        except InvalidArgumentError as exc:
            exc.keys = [key] if isinstance(key, str) else []
            results[i] = exc
            continue
        if key in first_index:
            duplicate_of[i] = first_index[key]
            continue
        first_index[key] = i
        if src.nbytes == 0:
            src = EMPTY_PLACEHOLDER
        indices.append(i)
        names.append(key)
        sizes.append(src.nbytes)
        sources.append(src)
    if names:
        _put_valid(master, transfers, indices, names, sizes, sources, settings, results)
    for i, first in duplicate_of.items():
        results[i] = results[first]
    return results


def _put_valid(master: MasterClient, transfers: Transfers, indices: list[int],
               names: list[str], sizes: list[int], sources: list[memoryview],
               settings: PutSettings, results: list[KVStoreError | None]) -> None:
    request = master_pb2.PutStartRequest(
        keys=names, sizes=sizes, replicas=settings.replicas, near_host_id=settings.host_id,
        client_id=settings.client_id, hard_pin=settings.hard_pin,
        preferred_tier=settings.tier,
        soft_pin_ttl_ms=int((settings.soft_pin_ttl_s or 0) * 1000))
    pending = master.start("PutStart", request, timeout_s=_rpc_timeout(settings))
    # NOTE: hashed while the master allocates, not after the write: the client would only
    # wait here, so the hash is off the critical path (~100 us of a 4 MiB put), and it pulls
    # the value into the cache for the copy. The cost: values the master reports
    # ALREADY_EXISTS are hashed for nothing (a hash is ~1/10 of a copy).
    try:
        sums = [EMPTY_CHECKSUM if src is EMPTY_PLACEHOLDER else checksum(src)
                for src in sources]
    except BaseException:
        _abandon(master, settings, pending, names)
        raise
    reply = pending.result()
    statuses.check_length(reply, "statuses", len(names), "PutStart")
    ok = [status == statuses.OK for status in reply.statuses]
    started = [j for j, key_ok in enumerate(ok) if key_ok]
    try:
        targets = decode_targets(reply, sizes, ok)
        items = []
        failures: dict[int, KVStoreError] = {}
        for j in started:
            if not targets[j]:
                failures[j] = KVStoreError(f"put {names[j]!r}: master allocated no replica",
                                           keys=[names[j]])
            for target in targets[j]:
                items.append((j, names[j], target, sources[j]))
        failures.update(transfers.write(items, deadline=settings.deadline))
    except BaseException:
        _revoke(master, settings, [names[j] for j in started])
        raise
    for j, status in enumerate(reply.statuses):
        if status == statuses.ALREADY_EXISTS:
            results[indices[j]] = None
        elif status != statuses.OK:
            results[indices[j]] = statuses.item_error(reply, j, names[j], "put")
    for j, error in failures.items():
        results[indices[j]] = error
    if failures:
        _revoke(master, settings, [names[j] for j in failures])
    committed = [j for j in started if j not in failures]
    if committed:
        _end(master, settings, committed, indices, names, sums, results)


def _abandon(master: MasterClient, settings: PutSettings, pending: Any,
             names: list[str]) -> None:
    """Finish a PutStart the flow will not follow up (interrupted before its reply was
    read): read the reply and revoke the keys it started. Best effort, like ``_revoke``."""
    try:
        reply = pending.result()
    except KVStoreError:
        return
    _revoke(master, settings, [names[j] for j, status in enumerate(reply.statuses)
                               if status == statuses.OK and j < len(names)])


def _end(master: MasterClient, settings: PutSettings, committed: list[int],
         indices: list[int], names: list[str], sums: list[int],
         results: list[KVStoreError | None]) -> None:
    end_names = [names[j] for j in committed]
    request = master_pb2.PutEndRequest(keys=end_names, client_id=settings.client_id,
                                       checksums=[sums[j] for j in committed])
    try:
        reply = master.call("PutEnd", request, timeout_s=_rpc_timeout(settings))
    except BaseException:
        _revoke(master, settings, end_names)
        raise
    statuses.check_length(reply, "statuses", len(end_names), "PutEnd")
    for n, j in enumerate(committed):
        if reply.statuses[n] != statuses.OK:
            results[indices[j]] = statuses.item_error(reply, n, names[j], "put_end")


def _revoke(master: MasterClient, settings: PutSettings, names: list[str]) -> None:
    """Give the space of ``names`` back; best effort, since the master also reclaims PENDING
    objects after its pending timeout."""
    if not names:
        return
    try:
        master.call("PutRevoke", master_pb2.PutRevokeRequest(
            keys=names, client_id=settings.client_id), timeout_s=settings.rpc_timeout_s)
    except KVStoreError:
        pass
