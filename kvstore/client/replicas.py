"""Decode the master's batch replies (parallel arrays + node/segment tables) into Targets.

A reply lists the replicas of key i in the slice
``[replica_start[i], replica_start[i] + replica_count[i])`` of its ``replica_*`` arrays; each
replica names a segment by index into the reply's ``segments`` table, and each segment a node
by index into ``nodes`` (see proto/kvstore/v1/master.proto). A reply whose indices point
outside its tables raises KVStoreError: a client never guesses where bytes live.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvstore._errors import KVStoreError
from kvstore.transport.base import Target

#: Replies for at most this many keys are read by indexing their repeated fields in place;
#: larger ones are copied into lists first (cheaper per element).
MAX_KEYS_INDEXED_IN_PLACE = 8


def _segment_prefixes(reply: Any) -> list[tuple[str, str, str, str, str]]:
    """(node_id, host_id, data_addr, segment_id, shm_name) for each segment of the reply."""
    nodes = reply.nodes
    prefixes = []
    for segment in reply.segments:
        if segment.node_index >= len(nodes):
            raise KVStoreError(f"malformed master reply: segment {segment.segment_id!r} names "
                               f"node index {segment.node_index} of {len(nodes)}")
        node = nodes[segment.node_index]
        prefixes.append((node.node_id, node.host_id, node.data_addr, segment.segment_id,
                         segment.shm_name))
    return prefixes


def decode_targets(reply: Any, sizes: Sequence[int], ok: Sequence[bool]) -> list[list[Target]]:
    """The replica Targets of each key of a PutStart or GetReplicas reply.

    ``sizes[i]`` is the object size of key i (the length of each of its Targets); keys with
    ``ok[i]`` False get an empty list. Raises KVStoreError on out-of-range indices.
    """
    prefixes = _segment_prefixes(reply)
    starts, counts = reply.replica_start, reply.replica_count
    segment_indices, offsets = reply.replica_segment, reply.replica_offset
    if len(ok) > MAX_KEYS_INDEXED_IN_PLACE:
        # NOTE: plain lists for batches: indexing a protobuf repeated field costs more per
        # element than a list, but copying four fields costs more than a few lookups.
        starts, counts = list(starts), list(counts)
        segment_indices, offsets = list(segment_indices), list(offsets)
    num_replicas = len(segment_indices)
    if len(offsets) != num_replicas:
        raise KVStoreError("malformed master reply: replica arrays differ in length")
    num_prefixes = len(prefixes)
    targets: list[list[Target]] = []
    for i, key_ok in enumerate(ok):
        if not key_ok:
            targets.append([])
            continue
        try:
            start, count = starts[i], counts[i]
        except IndexError:
            raise KVStoreError(f"malformed master reply: no replica slice for key {i}") from None
        if start + count > num_replicas:
            raise KVStoreError(f"malformed master reply: replica slice of key {i} ends at "
                               f"{start + count}, past {num_replicas}")
        size = sizes[i]
        key_targets = []
        for j in range(start, start + count):
            index = segment_indices[j]
            if index >= num_prefixes:
                raise KVStoreError(f"malformed master reply: replica {j} names segment "
                                   f"{index} of {num_prefixes}")
            key_targets.append(Target(*prefixes[index], offsets[j], size))
        targets.append(key_targets)
    return targets
