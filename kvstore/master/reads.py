"""Read verbs: get_replicas, renew_lease, exists, match_prefix.

These are the hot path (a decode engine asks for a request's blocks in one batch), so the
common case (every key found, one replica each) transposes the objects' cached reply rows
(``ObjectMeta.row``) in one step instead of running a Python loop with many appends per key;
anything else takes the general loop. Both produce the same reply.
"""

from __future__ import annotations

from kvstore.master.objects import (
    ITEM_INVALID, ITEM_NOT_FOUND, ITEM_OK, ITEM_PENDING,
)
from kvstore.master.validation import check_batch, check_keys_strict, key_problem


def get_replicas(state, keys, lease_ttl_s: float, client_host_id: str, now_s: float):
    """Where each COMPLETE key's replicas are; grants (lengthens, never shortens) a lease of
    ``lease_ttl_s`` and marks the key used (LRU). Per key: ITEM_OK, ITEM_NOT_FOUND,
    ITEM_PENDING, ITEM_INVALID (with a message). Returns ``(statuses, sizes, checksums,
    codecs, starts, counts, replica_segments, replica_offsets, segments, messages)`` where
    ``replica_segments`` index ``segments`` and ``messages`` is None when all keys are
    valid. Safe to retry (a retry only lengthens the lease)."""
    check_batch(len(keys), state.config.max_batch)
    get = state.objects.get
    objs = [get(key) for key in keys]
    state.use_count += 1
    use = state.use_count
    lease_until_s = now_s + lease_ttl_s
    if None in objs:
        return _general(state, keys, objs, lease_until_s, client_host_id, use)
    rows = [o.row for o in objs]
    num = len(objs)
    if None in rows or not num:                               # some key has 2+ replicas
        return _general(state, keys, objs, lease_until_s, client_host_id, use)
    for o in objs:
        o.last_used = use
        if o.lease_until_s < lease_until_s:
            o.lease_until_s = lease_until_s
    sizes, checksums, codecs, segment_of, offsets = zip(*rows)
    segments = list(dict.fromkeys(segment_of))
    if len(segments) == 1:
        rep_segments = [0] * num
    else:
        index = {s: i for i, s in enumerate(segments)}
        rep_segments = [index[s] for s in segment_of]
    state.hits += num
    return ([ITEM_OK] * num, sizes, checksums, codecs, range(num), [1] * num, rep_segments,
            offsets, segments, None)


def _general(state, keys, objs, lease_until_s, client_host_id, use):
    statuses, sizes, checksums, codecs = [], [], [], []
    starts, counts, rep_segments, rep_offsets = [], [], [], []
    segment_to_index: dict = {}
    messages = None
    pending = state.pending
    for i, (key, obj) in enumerate(zip(keys, objs)):
        if obj is not None:
            obj.last_used = use
            if obj.lease_until_s < lease_until_s:
                obj.lease_until_s = lease_until_s
            statuses.append(ITEM_OK)
            sizes.append(obj.size_bytes)
            checksums.append(obj.checksum)
            codecs.append(obj.codec)
            starts.append(len(rep_offsets))
            replicas = obj.replicas
            counts.append(len(replicas))
            if client_host_id and len(replicas) > 1:
                # same-host replicas first: the client can map them (shm)
                replicas = sorted(replicas, key=lambda r: r[0].node.host_id != client_host_id)
            for segment, offset in replicas:
                index = segment_to_index.get(segment)
                if index is None:
                    index = segment_to_index[segment] = len(segment_to_index)
                rep_segments.append(index)
                rep_offsets.append(offset)
            continue
        if key in pending:
            status = ITEM_PENDING
        else:
            problem = key_problem(key)
            status = ITEM_NOT_FOUND if problem is None else ITEM_INVALID
            if problem is not None:
                if messages is None:
                    messages = [""] * len(keys)
                messages[i] = problem
        statuses.append(status)
        sizes.append(0)
        checksums.append(0)
        codecs.append(0)
        starts.append(len(rep_offsets))
        counts.append(0)
    num_hits = statuses.count(ITEM_OK)
    state.hits += num_hits
    state.misses += len(keys) - num_hits
    return (statuses, sizes, checksums, codecs, starts, counts, rep_segments, rep_offsets,
            list(segment_to_index), messages)


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
        if obj.lease_until_s < lease_until_s:
            obj.lease_until_s = lease_until_s
        statuses.append(ITEM_OK)
    return statuses


def exists(state, keys) -> list[bool]:
    """True for each COMPLETE key. No lease, no LRU touch. A bad key fails the call
    (INVALID_ARGUMENT: the reply has no per-item status to carry it)."""
    check_batch(len(keys), state.config.max_batch)
    objects = state.objects
    result = [key in objects for key in keys]
    if not all(result):
        check_keys_strict(k for k, found in zip(keys, result) if not found)
    return result


def match_prefix(state, keys):
    """Length of the leading run of COMPLETE keys, and the node of each one's first replica
    (as indices into the returned node list). A bad key fails the call."""
    check_batch(len(keys), state.config.max_batch)
    node_to_index: dict = {}
    indices = []
    for key in keys:
        obj = state.objects.get(key)
        if obj is None:
            check_keys_strict([key])
            break
        node = obj.replicas[0][0].node
        index = node_to_index.get(node)
        if index is None:
            index = node_to_index[node] = len(node_to_index)
        indices.append(index)
    return indices, list(node_to_index)
