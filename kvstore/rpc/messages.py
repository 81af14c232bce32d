"""Protobuf messages to and from the domain values of ``kvstore.rpc.results``.

Batch replies are parallel arrays plus a table of nodes and segments: key i's replicas are the
slice ``[replica_start[i], replica_start[i] + replica_count[i])`` of the ``replica_*``
arrays; each replica names a segment by index into the reply's ``segments``, and each segment
a node by index into ``nodes`` (proto/kvstore/v1/master.proto). A reply whose arrays do not
fit the request, or whose indices point outside its tables, raises KVStoreError: a client
never guesses where bytes live.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvstore._errors import KVStoreError
from kvstore.rpc.errors import item_error, malformed
from kvstore.rpc.results import (
    HeartbeatChanges, Inventory, MasterStats, NodeSpec, NodeStatus, ReplicaSet, SegmentSpec,
    TenantStatus, TierMove, TierUsage,
)
from kvstore.tiers import Tier
from kvstore.transport.base import Target
from kvstore.v1 import master_pb2 as pb

OK = pb.ITEM_OK
ALREADY_EXISTS = pb.ITEM_ALREADY_EXISTS
NOT_FOUND = pb.ITEM_NOT_FOUND

#: Replies for at most this many keys are read by indexing their repeated fields in place;
#: larger ones are copied into lists first (cheaper per element).
MAX_KEYS_INDEXED_IN_PLACE = 8


# ---- checks ------------------------------------------------------------------------------

def check_length(reply: Any, field: str, expected: int, method: str) -> None:
    """Raise KVStoreError unless the reply's ``field`` has one entry per requested key."""
    actual = len(getattr(reply, field))
    if actual != expected:
        raise malformed(method, f"{actual} {field} for {expected} keys")


def statuses_to_results(reply: Any, keys: Sequence[str], method: str, action: str,
                        ) -> list[KVStoreError | None]:
    """None per OK item, else the item's error naming its key (Pin, Unpin, PutEnd, ...)."""
    check_length(reply, "statuses", len(keys), method)
    messages = reply.error_messages
    return [None if status == OK else
            item_error(status, key, action, messages[i] if i < len(messages) else "")
            for i, (key, status) in enumerate(zip(keys, reply.statuses))]


# ---- replica tables ----------------------------------------------------------------------

def segment_prefixes(reply: Any) -> list[tuple[str, str, str, str, str]]:
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


def decode_targets(reply: Any, sizes: Sequence[int], ok: Sequence[bool],
                   capabilities: Sequence[bytes] = ()) -> list[list[Target]]:
    """The replica Targets of each key of a PutStart or GetReplicas reply.

    ``sizes[i]`` is the object size of key i (the length of each of its Targets); keys with
    ``ok[i]`` False get an empty list. ``capabilities``: one per replica, PutStart's write
    capabilities or GetReplicas' read capabilities (empty: none). Raises KVStoreError on out-of-range indices or a capability list of another
    length than the replicas'.
    """
    prefixes = segment_prefixes(reply)
    starts, counts = reply.replica_start, reply.replica_count
    segment_indices, offsets = reply.replica_segment, reply.replica_offset
    if len(ok) > MAX_KEYS_INDEXED_IN_PLACE:
        # NOTE: plain lists for batches: indexing a protobuf repeated field costs more per
        # element than a list, but copying four fields costs more than a few lookups.
        starts, counts = list(starts), list(counts)
        segment_indices, offsets = list(segment_indices), list(offsets)
    num_replicas = len(segment_indices)
    if len(offsets) != num_replicas or (capabilities and len(capabilities) != num_replicas):
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
            if capabilities:
                key_targets.append(Target(*prefixes[index], offsets[j], size, capabilities[j]))
            else:
                key_targets.append(Target(*prefixes[index], offsets[j], size))
        targets.append(key_targets)
    return targets


# ---- put ---------------------------------------------------------------------------------

class PutSlots(list):
    """``put_slots``' list, plus ``client_commit``: the master asks the writer to commit
    the written replicas on their daemons itself (PutStartResponse.client_commit)."""

    client_commit = False
    #: node id -> shm name of its commit ring (NodeRef.commit_ring), for the nodes that have one
    commit_rings: dict = {}
    #: node id -> its batch capability (PutStartResponse.node_capability), where offered
    node_capabilities: dict = {}


def put_slots(reply: pb.PutStartResponse, keys: Sequence[str], sizes: Sequence[int],
              ) -> PutSlots:
    """Per key of a PutStart: the Targets to write (one per replica), None when the key
    already exists (nothing to write: a success), or the item's error (a ``PutSlots``)."""
    check_length(reply, "statuses", len(keys), "PutStart")
    statuses = reply.statuses
    ok = [status == OK for status in statuses]
    targets = decode_targets(reply, sizes, ok, reply.replica_capability)
    messages = reply.error_messages
    results = PutSlots()
    results.client_commit = reply.client_commit
    rings = {node.node_id: node.commit_ring for node in reply.nodes if node.commit_ring}
    if rings:
        results.commit_rings = rings
    if reply.node_capability:
        results.node_capabilities = {node.node_id: cap for node, cap
                                     in zip(reply.nodes, reply.node_capability) if cap}
    for i, key in enumerate(keys):
        status = statuses[i]
        if status == OK:
            results.append(targets[i])
        elif status == ALREADY_EXISTS:
            results.append(None)
        else:
            results.append(item_error(status, key, "put",
                                      messages[i] if i < len(messages) else ""))
    return results


# ---- get ---------------------------------------------------------------------------------

_PER_KEY_FIELDS = ("statuses", "sizes", "checksums", "codecs")


def replica_sets(reply: pb.GetReplicasResponse, keys: Sequence[str],
                 ) -> list[ReplicaSet | KVStoreError]:
    """Per key of a GetReplicas: its ReplicaSet, or the item's error (the lease id is
    ``reply.lease_id``)."""
    for field in _PER_KEY_FIELDS:
        if len(getattr(reply, field)) != len(keys):
            check_length(reply, field, len(keys), "GetReplicas")
    statuses, sizes, sums, codecs = reply.statuses, reply.sizes, reply.checksums, reply.codecs
    if len(keys) > MAX_KEYS_INDEXED_IN_PLACE:
        # NOTE: plain lists for batches: indexing protobuf repeated fields per key costs
        # more than copying them once (for a few keys the copies cost more)
        statuses, sizes, sums, codecs = list(statuses), list(sizes), list(sums), list(codecs)
    ok = [status == OK for status in statuses]
    targets = decode_targets(reply, sizes, ok, reply.replica_read_capability)
    if all(ok):   # NOTE: the common batch, built without a Python-level loop
        return list(map(ReplicaSet, sizes, sums, codecs, targets))
    messages = reply.error_messages
    results: list[ReplicaSet | KVStoreError] = []
    for i, key in enumerate(keys):
        if ok[i]:
            results.append(ReplicaSet(sizes[i], sums[i], codecs[i], targets[i]))
        else:
            results.append(item_error(statuses[i], key, "get",
                                      messages[i] if i < len(messages) else ""))
    return results


# ---- membership --------------------------------------------------------------------------

def node_info(node: NodeSpec) -> pb.NodeInfo:
    return pb.NodeInfo(node_id=node.node_id, host_id=node.host_id, data_addr=node.data_addr,
                       segments=[_segment_info(s) for s in node.segments],
                       incarnation=node.incarnation,
                       nixl_metadata=node.nixl_metadata, commit_push=node.commit_push,
                       write_capabilities=node.write_capabilities,
                       client_commit=node.client_commit, commit_ring=node.commit_ring,
                       read_capabilities=node.read_capabilities,
                       batch_capabilities=node.batch_capabilities)


def _segment_info(segment: SegmentSpec) -> pb.SegmentInfo:
    return pb.SegmentInfo(segment_id=segment.segment_id, tier=segment.tier,
                          capacity_bytes=segment.capacity_bytes, shm_name=segment.shm_name,
                          path=segment.path)


def inventory_message(inventory: Inventory) -> pb.Inventory:
    message = pb.Inventory()
    message.keys.extend(inventory.keys)
    message.segment_ids.extend(inventory.segment_ids)
    message.offsets.extend(inventory.offsets)
    message.lengths.extend(inventory.lengths)
    message.checksums.extend(inventory.checksums)
    message.codecs.extend(inventory.codecs)
    return message


def heartbeat_changes(reply: pb.HeartbeatResponse) -> HeartbeatChanges:
    added = reply.added
    return HeartbeatChanges(
        master_id=reply.master_id, seq=reply.seq, full_resync=reply.full_resync,
        added=Inventory(list(added.keys), list(added.segment_ids), list(added.offsets),
                        list(added.lengths), list(added.checksums), list(added.codecs)),
        removed_keys=list(reply.removed_keys), base_seq=reply.base_seq,
        moves=[TierMove(m.move_id, m.key, m.src_segment_id, m.src_offset, m.dst_segment_id,
                        m.dst_offset, m.length, m.dst_capability) for m in reply.moves],
        up_to_date=reply.up_to_date)


# ---- observability -----------------------------------------------------------------------

def _tier(value: int) -> Tier | None:
    try:
        return Tier(value)
    except ValueError:
        return None


def master_stats(reply: pb.StatsResponse) -> MasterStats:
    return MasterStats(
        master_id=reply.master_id, uptime_s=reply.uptime_s, num_nodes=reply.num_nodes,
        num_objects=reply.num_objects, num_pending=reply.num_pending,
        num_leased=reply.num_leased, hits=reply.hits, misses=reply.misses,
        evictions=reply.evictions,
        tiers=tier_usages(reply.tiers),
        max_batch=reply.max_batch, metrics_port=reply.metrics_port or None,
        fast_port=reply.fast_port or None,
        tenants=[TenantStatus(t.name, t.namespace, t.num_objects,
                              {_tier(x.tier): x.used_bytes for x in t.tiers},
                              {_tier(x.tier): x.quota_bytes for x in t.tiers if x.has_quota},
                              t.num_refused) for t in reply.tenants],
        data_token=reply.data_token or None)


def tier_usages(tiers) -> list[TierUsage]:
    return [TierUsage(_tier(t.tier), t.capacity_bytes, t.used_bytes, t.num_objects, t.hits,
                      t.demotions, t.promotions, t.evictions) for t in tiers]


def node_statuses(reply: pb.ListNodesResponse) -> list[NodeStatus]:
    return [NodeStatus(node_id=n.node_id, host_id=n.host_id, data_addr=n.data_addr,
                       segments=[SegmentSpec(s.segment_id, _tier(s.tier), s.capacity_bytes,
                                             s.shm_name, s.path) for s in n.segments],
                       used_bytes=n.used_bytes, num_objects=n.num_objects,
                       last_heartbeat_age_s=n.last_heartbeat_age_s,
                       tiers=tier_usages(n.tiers), nixl_metadata=n.nixl_metadata,
                       reserved_bytes=n.reserved_bytes)
            for n in reply.nodes]
