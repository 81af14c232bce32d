"""Read verbs: get_replicas, renew_lease, exists, match_prefix.

get_replicas is the hot path (a decode engine asks for a request's blocks in one batch):
the common case (every key found) is one lookup and one lease/LRU update per key, with no
other per-key work; the reply is built by ``replies.ReplyEncoder.get_replicas``.
"""

from __future__ import annotations

from kvstore.master import tiering
from kvstore.master.objects import (
    ITEM_INVALID, ITEM_NOT_FOUND, ITEM_OK, ITEM_PENDING, ObjectMeta,
)
from kvstore.master.validation import check_batch, check_keys_strict, key_problem


def get_replicas(state, keys, lease_ttl_s: float, now_s: float):
    """Find each key's COMPLETE object; grant it a lease of ``lease_ttl_s`` (lengthens,
    never shortens; one more holder, see ``leases``) and mark it used (LRU). Safe to retry
    (a retry only lengthens leases; its extra hold ends with its TTL). In a tiered cluster,
    objects read from SSD may be queued for promotion (``tiering.maybe_promote``).
    Per-segment hit counters are counted by the reply encoder (``replies``), from the
    segment column it builds anyway.

    Returns ``(objs, missing, lease_id)``: ``objs[i]`` is key i's ObjectMeta, or None when
    it has no COMPLETE object; then ``missing[i]`` is ``(status, problem)``:
    ``(ITEM_PENDING, None)``, ``(ITEM_NOT_FOUND, None)`` or ``(ITEM_INVALID, why the key is
    bad)``. ``missing`` is empty when every key was found. ``lease_id`` names this call's
    holds for ReleaseLeases (0 when nothing was found).
    """
    check_batch(len(keys), state.config.max_batch)
    objs: list[ObjectMeta | None] = state.objects.index.get_many(keys)
    missing: dict[int, tuple[int, str | None]] = {}
    found = objs
    if None in objs:
        pending = state.pending
        for i, (key, obj) in enumerate(zip(keys, objs)):
            if obj is None:
                if key in pending:
                    missing[i] = (ITEM_PENDING, None)
                else:
                    problem = key_problem(key)
                    missing[i] = ((ITEM_NOT_FOUND, None) if problem is None
                                  else (ITEM_INVALID, problem))
        found = [obj for obj in objs if obj is not None]
    state.use_count += 1
    use = state.use_count
    lease_until_s = now_s + lease_ttl_s
    for obj in found:
        obj.last_used = use
        until_s = obj.lease_until_s
        if until_s > now_s:
            obj.readers += 1
            if until_s < lease_until_s:
                obj.lease_until_s = lease_until_s
        else:
            obj.readers = 1          # every earlier hold has expired
            obj.lease_until_s = lease_until_s
    state.hits += len(found)
    state.misses += len(missing)
    if not found:
        return objs, missing, 0
    if state.tiered and state.config.promote_after:
        tiering.maybe_promote(state, found, now_s)
    return objs, missing, state.leases.grant(found, lease_until_s)


def renew_lease(state, keys, lease_ttl_s: float, now_s: float):
    """Lengthen the leases of COMPLETE keys (never shortens). Per key: ITEM_OK,
    ITEM_NOT_FOUND, ITEM_PENDING. Idempotent."""
    check_batch(len(keys), state.config.max_batch)
    lease_until_s = now_s + lease_ttl_s
    statuses = []
    for key in keys:
        obj = state.objects.get(key)
        if obj is None:
            statuses.append(ITEM_PENDING if key in state.pending else ITEM_NOT_FOUND)
            continue
        if obj.lease_until_s <= now_s:
            obj.readers = 1          # a holder with no lease id: bounded by this TTL only
        if obj.lease_until_s < lease_until_s:
            obj.lease_until_s = lease_until_s
        statuses.append(ITEM_OK)
    return statuses


def exists(state, keys) -> list[bool]:
    """True for each COMPLETE key. No lease, no LRU touch. A bad key fails the call
    (INVALID_ARGUMENT: the reply has no per-item status to carry it)."""
    check_batch(len(keys), state.config.max_batch)
    result = state.objects.index.contains_many(keys)
    if not all(result):
        check_keys_strict(k for k, found in zip(keys, result) if not found)
    return result


def exists_wire(state, batch) -> bytes:
    """``exists`` of a ``wire.KeyBatch``: the ExistsResponse's bytes (its ``exists`` field).
    The same checks: a batch over the maximum or a bad key fails the call."""
    check_batch(len(batch), state.config.max_batch)
    payload, missing = state.objects.index.contains_batch(batch)
    if missing:
        check_keys_strict(missing)
    return payload


def match_prefix(state, keys) -> list:
    """The node of the first replica of each key of the leading run of COMPLETE keys (its
    length is the match). A bad key fails the call."""
    check_batch(len(keys), state.config.max_batch)
    nodes = []
    for key in keys:
        obj = state.objects.get(key)
        if obj is None:
            check_keys_strict([key])
            break
        nodes.append(obj.replicas[0][0].node)
    return nodes
