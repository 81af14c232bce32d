"""Registration verbs of the master: register (with inventory adoption), heartbeat,
unregister, and dropping a node.

Adoption (how no stored block is lost to a master restart): a daemon that re-registers sends
the replicas it holds. Each one is adopted as COMPLETE when its key is valid, its segment is
one the node registers, its range is aligned, lies inside the segment and overlaps no other
adopted range; the space is marked allocated. A key already known with the same size gains
this node as one more replica; a key known with another size, or already on this node, is
refused, and so is one that is PENDING on the new master. Refused items are simply not
adopted: the daemon's first heartbeat (acked_seq 0) gets a full resync that omits them, so
it drops them too. A registration that refuses some logs a warning with their count and the
first ``MAX_LOGGED_REFUSALS`` keys with the reason (an object a daemon held but the master
did not adopt is otherwise invisible: gone from both after that resync).
"""

from __future__ import annotations

import logging

import grpc

from kvstore import capability
from kvstore.master import eviction, tiering
from kvstore.master.nodes import Node, SegmentSpace
from kvstore.master.objects import CODECS, COMPLETE, ObjectMeta
from kvstore.master.validation import (
    MAX_ID_CHARS, Rejected, check_id, check_parallel, invalid, key_problem,
)
from kvstore.tiers import TIERS_FASTEST_FIRST, Tier

MAX_SEGMENTS_PER_NODE = 1024
# NOTE: NIXL's UCX agent metadata is ~0.3-2 KiB per registered region; far below this
MAX_NIXL_METADATA_BYTES = 1024 * 1024
#: Refused inventory items a registration names in its warning (the rest are counted).
MAX_LOGGED_REFUSALS = 5

log = logging.getLogger("kvstore.master.registration")


def register_node(state, info, inventory, now_s: float) -> int:
    """Add a node and adopt its inventory; return the number of objects adopted.

    A live node with this id is replaced at once when the registration names another
    non-empty ``incarnation`` (the daemon restarted: its previous process is gone, and so
    are the replicas the master listed for it, unless the inventory brings them back).

    A registration that repeats the one that added a live node (same incarnation, same
    non-empty ``registration_token``: the daemon lost the reply) changes nothing and
    returns that registration's adoption count again.

    Raises Rejected: ALREADY_EXISTS if a live node has this id and the same (or no)
    incarnation, unless it repeats the registration as above (a node that expired or was
    forgotten by a master restart may register again); INVALID_ARGUMENT for an empty or
    over-long id, a bad data address, no segments, a duplicate or empty segment id, an
    unknown tier, a zero capacity, or inventory arrays of different lengths.
    """
    check_id(info.node_id, "node_id")
    check_id(info.host_id, "host_id")
    _check_address(info.data_addr)
    if not info.segments:
        raise invalid("a node must register at least one segment")
    if len(info.segments) > MAX_SEGMENTS_PER_NODE:
        raise invalid(f"a node may register at most {MAX_SEGMENTS_PER_NODE} segments")
    live = state.nodes.get(info.node_id)
    if _repeats(live, info):
        # NOTE: the daemon did not get this registration's reply (its deadline passed while
        # the master applied it): answering again with the same node keeps the secret that
        # writers' commits since then carry, and the objects placed there meanwhile; a fresh
        # registration would drop both (issue 10, 10y's registration window)
        live.last_heartbeat_s = now_s
        log.warning("node %s repeated its registration (a lost reply): answered again",
                    info.node_id)
        return live.num_adopted
    if live is not None and (not info.incarnation or info.incarnation == live.incarnation):
        raise Rejected(grpc.StatusCode.ALREADY_EXISTS,
                       f"node {info.node_id!r} is registered and alive; unregister it first "
                       "or wait for its TTL to pass")
    check_id(info.incarnation, "incarnation", allow_empty=True)
    if len(info.nixl_metadata) > MAX_NIXL_METADATA_BYTES:
        raise invalid(f"nixl_metadata is longer than {MAX_NIXL_METADATA_BYTES} bytes")
    node = Node(info.node_id, info.host_id, info.data_addr, now_s, info.incarnation,
                state.touched)
    node.nixl_metadata = info.nixl_metadata
    node.commit_push = info.commit_push
    node.client_commit = info.client_commit
    node.commit_ring = info.commit_ring
    node.batch_capabilities = info.batch_capabilities
    if info.write_capabilities:
        node.capability_secret = capability.new_secret()   # rotates with each registration
        node.read_capabilities = info.read_capabilities
    for seg in info.segments:
        check_id(seg.segment_id, "segment_id")
        if seg.segment_id in node.segments:
            raise invalid(f"duplicate segment_id {seg.segment_id!r}")
        if seg.tier not in TIERS_FASTEST_FIRST:
            raise invalid(f"segment {seg.segment_id!r}: tier must be HBM, DRAM or SSD")
        if seg.capacity_bytes == 0:
            raise invalid(f"segment {seg.segment_id!r}: capacity_bytes must be > 0")
        check_id(seg.shm_name, "shm_name", allow_empty=True)
        if len(seg.path) > 4096:
            raise invalid(f"segment {seg.segment_id!r}: path is longer than 4096 characters")
        node.segments[seg.segment_id] = SegmentSpace(seg.segment_id, node, Tier(seg.tier),
                                                seg.capacity_bytes, seg.shm_name, seg.path)
    inv = inventory
    check_parallel({"keys": len(inv.keys), "segment_ids": len(inv.segment_ids),
                    "offsets": len(inv.offsets), "lengths": len(inv.lengths),
                    "checksums": len(inv.checksums), "codecs": len(inv.codecs)},
                   optional=("checksums", "codecs"))
    if live is not None:
        drop_node(state, live)     # a restarted daemon: its previous incarnation is gone
    num_adopted = _adopt(state, node, inv) if inv.keys else 0
    node.registration_token = info.registration_token
    node.num_adopted = num_adopted
    state.nodes[node.node_id] = node
    _refresh_tiered(state)
    return num_adopted


def _repeats(live, info) -> bool:
    """True if ``info`` repeats the registration that added ``live``: same process
    (incarnation) and the same non-empty token."""
    return (live is not None and bool(info.registration_token) and
            info.registration_token == live.registration_token and
            info.incarnation == live.incarnation)


def _refresh_tiered(state) -> None:
    state.tiered = any(len({s.tier for s in n.segments.values()}) > 1
                       for n in state.nodes.values())


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or len(address) > MAX_ID_CHARS:
        raise invalid(f"data_addr must be 'host:port', got {address!r}")


def _adopt(state, node: Node, inv) -> int:
    objects, removals = state.objects, state.removals
    candidates: dict[SegmentSpace, list[int]] = {}
    refused = _Refusals(node.node_id, len(inv.keys))
    for i, (key, segment_id, length) in enumerate(zip(inv.keys, inv.segment_ids, inv.lengths)):
        segment = node.segments.get(segment_id)
        existing = objects.get(key)
        if segment is None or length == 0 or key_problem(key) is not None:
            refused.add(key, f"segment {segment_id!r} not registered" if segment is None
                        else "empty object" if length == 0 else "invalid key")
            continue
        if key in state.pending or (existing is not None and existing.size_bytes != length):
            refused.add(key, "PENDING on this master" if key in state.pending
                        else f"known with another size ({existing.size_bytes} bytes)")
            continue
        if removals and removals.refuses(node, key):   # removed, never confirmed here
            refused.add(key, "removed, the removal never confirmed by this node")
            continue
        candidates.setdefault(segment, []).append(i)
    num_adopted = 0
    for segment, indices in candidates.items():
        accepted = segment.allocator.reserve_many(
            [(inv.offsets[i], inv.lengths[i]) for i in indices])
        for i, ok in zip(indices, accepted):
            if not ok:
                refused.add(inv.keys[i], _range_refusal(segment, inv, i, indices, accepted)
                            if refused.naming else "")
                continue
            key, offset, length = inv.keys[i], inv.offsets[i], inv.lengths[i]
            existing = objects.get(key)
            if existing is not None and (existing.size_bytes != length
                                         or key in node.keys):
                segment.allocator.free(offset, length)   # same key twice, or size conflict
                refused.add(key, "listed twice, or known with another size")
                continue
            if existing is None:
                codec = inv.codecs[i] if inv.codecs and inv.codecs[i] in CODECS else 0
                checksum = inv.checksums[i] if inv.checksums else 0
                existing = objects[key] = ObjectMeta(
                    key, length, [(segment, offset)], codec, "", 0.0, False, state=COMPLETE,
                    checksum=checksum)
                existing.last_used = state.use_count
                if state.tenants is not None:
                    state.tenants.object_added(existing)
            else:
                existing.replicas.append((segment, offset))
                if state.tenants is not None:
                    state.tenants.replica_added(existing, segment.tier)
            segment.num_replicas += 1
            node.keys.add(key)
            num_adopted += 1
    refused.log()
    # NOTE: a baseline sequence, so the daemon's first heartbeat (acked 0) is a full resync
    # that tells it which items were refused.
    node.seq = 1
    return num_adopted


def _range_refusal(segment: SegmentSpace, inv, i: int, indices: list[int],
                   accepted: list[bool]) -> str:
    """Why item ``i``'s range was refused: the adopted item it overlaps, if any."""
    offset, length = inv.offsets[i], inv.lengths[i]
    where = f"range [{offset}, +{length}) in {segment.segment_id!r}"
    for j, ok in zip(indices, accepted):
        if ok and offset < inv.offsets[j] + inv.lengths[j] and inv.offsets[j] < offset + length:
            return (f"{where} overlaps {inv.keys[j]!r} at [{inv.offsets[j]}, "
                    f"+{inv.lengths[j]}), adopted")
    return f"{where} unaligned, outside the segment or overlapping an aligned range"


class _Refusals:
    """Counts the inventory items a registration refuses; ``log`` warns naming the first."""

    __slots__ = ("node_id", "num_items", "count", "first")

    def __init__(self, node_id: str, num_items: int) -> None:
        self.node_id, self.num_items = node_id, num_items
        self.count = 0
        self.first: list[str] = []

    @property
    def naming(self) -> bool:
        """True while the next refusal is one the warning names (its reason is needed)."""
        return len(self.first) < MAX_LOGGED_REFUSALS

    def add(self, key: str, reason: str) -> None:
        self.count += 1
        if self.naming:
            self.first.append(f"{key!r}: {reason}")

    def log(self) -> None:
        if self.count:
            log.warning("node %s: %d of %d inventory items not adopted; %s",
                        self.node_id, self.count, self.num_items, "; ".join(self.first))


def heartbeat(state, node_id: str, acked_seq: int, now_s: float, moves_done=(),
              moves_failed=()):
    """Record that the node is alive and settle the tier moves it acknowledges; return
    ``None`` if the node is unknown (the daemon must re-register), else
    ``(full_resync, seq, added, removed_keys, moves, moved)``: ``moves`` the copies the
    daemon is to make next, ``moved`` the objects whose replica switched tier now (the
    changes already include their new ranges)."""
    check_id(node_id, "node_id")
    node = state.nodes.get(node_id)
    if node is None:
        return None
    node.last_heartbeat_s = now_s
    # NOTE: an ack below what the daemon confirmed is normally a beat sent before a push's
    # reply arrived (then durable_seq moved since the last beat). If nothing was confirmed
    # since, the daemon's table really is behind: trust the ack, so it gets what it lacks.
    if acked_seq < node.durable_seq == node.beat_durable:
        node.durable_seq = acked_seq
    moved = []
    if moves_done or moves_failed:
        moved = tiering.settle(state, node, moves_done, moves_failed, now_s)
        if moves_failed:
            # NOTE: a move that failed would fail again at once (a broken disk, a tier the
            # daemon cannot copy): pause the passes instead of reordering it every beat
            state.pressure_idle_until_s = now_s + eviction.PRESSURE_RETRY_S
        else:
            # NOTE: a segment still pressed gets its next moves in this very reply: while
            # pressure lasts, copies and acknowledgements form one pipeline, not one batch
            # per heartbeat interval
            eviction.relieve_pressure(state, now_s)
    changes = node.changes_after(acked_seq, state.objects,
                                 state.config.max_changes_per_heartbeat)
    node.beat_durable = node.durable_seq
    return (*changes, tiering.take_outbox(node) if node.outbox else [], moved)


def unregister_node(state, node_id: str) -> int:
    """Drop a node at its own request; return how many objects lost their last replica.
    Raises Rejected(NOT_FOUND) for an unknown node id."""
    check_id(node_id, "node_id")
    node = state.nodes.get(node_id)
    if node is None:
        raise Rejected(grpc.StatusCode.NOT_FOUND, f"unknown node {node_id!r}")
    return drop_node(state, node)


def drop_node(state, node: Node) -> int:
    """Forget ``node``: its replicas vanish from every answer and its segments' space goes
    with it. Objects left with no replica are dropped. Returns how many were dropped."""
    del state.nodes[node.node_id]
    for segment in node.segments.values():
        segment.alive = False
    tiering.forget_node(state, node)
    _refresh_tiered(state)
    num_dropped = 0
    for key in node.keys:
        table = state.objects if key in state.objects else state.pending
        obj = table.get(key)
        if obj is None:
            continue
        kept = [r for r in obj.replicas if r[0].node is not node]
        if state.tenants is not None:
            for segment, _ in obj.replicas:
                if segment.node is node:
                    state.tenants.replica_lost(obj, segment.tier, not kept)
        obj.replicas = kept
        if not kept:
            del table[key]
            num_dropped += 1
    node.keys.clear()
    return num_dropped
