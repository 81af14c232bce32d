"""Tier moves: demotion (a tier over its high watermark sends its coldest objects one tier
down on the same node) and promotion (a read from SSD brings the object back to DRAM).

A move is a copy followed by a metadata switch, never the other way round:
1. ``schedule``: the master allocates the destination range and queues a ``Move`` on the
   source node; the next heartbeat reply carries it (``TierMove``). The object keeps its
   source replica: readers keep being sent there.
2. The daemon copies and reports the id in ``moves_done`` (or ``moves_failed``) of a later
   heartbeat; ``settle`` then switches the replica to the destination, logs the change for
   the daemon's table, and frees the source (deferred while the object is leased, so a reader
   given the old range never sees it reused). A get that races a move therefore reads the
   old or the new replica, never a freed one.
3. A failed move, one not acknowledged within ``move_timeout_s``, or one whose object was
   removed, evicted or lost its source meanwhile frees the destination instead.

Inclusive tiers: a promotion (SSD -> DRAM) keeps the SSD range allocated as the object's
``shadow``: the master's allocator keeps it, so no put or move writes there, and the bytes
stay those of the (immutable) object. The shadow is no replica: answers never name it, and
the daemon's table (hence its SSD index) no longer lists it after the switch. Its uses:
- ``demote_to_shadow``: a demotion of the object out of the tier above back to the shadow's
  tier is a metadata switch (the daemon's table is told the SSD range again, which puts the
  index record back and syncs it), no copy and no disk write.
- ``reclaim_shadows``: shadows are cache, the first space a full tier gives back: an
  eviction pass over a tier frees its shadows (least recently used first) before it evicts
  any object.
- A shadow is freed with its object (``state.drop_object``: remove, replace, eviction,
  revoke) and vanishes with its node (a dead segment's shadow is never used).
Space accounting: a shadow's bytes count as used in its segment (they are allocated) until
it is reclaimed; ``ObjectMeta.shadow`` and ``state.shadows`` name every one.

Only one move per object is in flight (``ObjectMeta.move``). Bytes of moves in flight count
as already gone from their source (``SegmentSpace.outgoing_bytes``), so the pressure pass does
not schedule them twice. Moves of a dropped node vanish with its segments.
"""

from __future__ import annotations

from kvstore.tiers import Tier


class Move:
    """One copy between two segments of one node, ordered by the master."""

    __slots__ = ("move_id", "obj", "src", "src_offset", "dst", "dst_offset", "size_bytes",
                 "deadline_s", "sent")

    def __init__(self, move_id, obj, src, src_offset, dst, dst_offset, deadline_s):
        self.move_id = move_id
        self.obj = obj
        self.src, self.src_offset = src, src_offset
        self.dst, self.dst_offset = dst, dst_offset
        self.size_bytes = obj.size_bytes
        self.deadline_s = deadline_s
        self.sent = False


def schedule(state, obj, src, src_offset: int, dst, now_s: float) -> bool:
    """Allocate ``obj``'s range in ``dst`` and queue the copy; False if ``dst`` has no room."""
    dst_offset = dst.allocator.allocate(obj.size_bytes)
    if dst_offset is None:
        return False
    state.next_move_id += 1
    move = Move(state.next_move_id, obj, src, src_offset, dst, dst_offset,
                now_s + state.config.move_timeout_s)
    state.moves[move.move_id] = move
    obj.move = move
    src.outgoing_bytes += move.size_bytes
    src.node.outbox.append(move)
    return True


def demotion_target(obj, src):
    """The segment one tier below ``src`` on its node that can take ``obj``'s bytes, or
    None. Tried slower-next first (HBM -> DRAM before SSD)."""
    lower = sorted((s for s in src.node.segments.values() if s.tier > src.tier),
                   key=lambda s: s.tier)
    for segment in lower:
        if segment.allocator.can_allocate(obj.size_bytes):
            return segment
    return None


def take_outbox(node) -> list[Move]:
    """The moves to send in this heartbeat reply (each sent once)."""
    moves, node.outbox = node.outbox, []
    for move in moves:
        move.sent = True
    return moves


def settle(state, node, done, failed, now_s: float) -> list:
    """Apply a heartbeat's acknowledgements from ``node``; return the objects whose replica
    moved (their cached reply rows are stale). Ids of other nodes or unknown ids (a move the
    master already gave up, or one from a previous master) are ignored."""
    moved = []
    moves = state.moves
    for move_id in done:
        move = moves.get(move_id)
        if move is not None and move.src.node is node and move.sent:
            obj = _complete(state, move, now_s)
            if obj is not None:
                moved.append(obj)
    for move_id in failed:
        move = moves.get(move_id)
        if move is not None and move.src.node is node and move.sent:
            abort(state, move)
    return moved


def _finish(state, move: Move) -> None:
    del state.moves[move.move_id]
    move.src.outgoing_bytes -= move.size_bytes
    if move.obj.move is move:
        move.obj.move = None


def abort(state, move: Move) -> None:
    """Give up ``move``: free its destination (the source replica stays as it was)."""
    _finish(state, move)
    if move.dst.alive:
        move.dst.allocator.free(move.dst_offset, move.size_bytes)


def _complete(state, move: Move, now_s: float):
    """The daemon copied: switch the replica to the destination and free the source."""
    obj, src, dst = move.obj, move.src, move.dst
    source = (src, move.src_offset)
    if (state.objects.get(obj.key) is not obj or not src.alive or not dst.alive
            or source not in obj.replicas):
        abort(state, move)       # the object went away meanwhile: the copy is garbage
        return None
    _finish(state, move)
    promoted = dst.tier < src.tier and src.tier is Tier.SSD and obj.shadow is None
    _switch(state, obj, source, dst, move.dst_offset)
    if promoted:
        # NOTE: no free: the SSD range stays allocated as the inclusive copy (module doc)
        obj.shadow = source
        state.shadows[obj] = None
    else:
        state.free_range(obj, src, move.src_offset, now_s)
    return obj


def _switch(state, obj, source, dst, dst_offset: int) -> None:
    """Point ``obj``'s replica ``source`` (segment, offset) at ``dst``/``dst_offset`` and
    tell the node's table; count the demotion or promotion. Frees nothing."""
    src = source[0]
    replicas = obj.replicas
    replicas[replicas.index(source)] = (dst, dst_offset)
    if state.tenants is not None:
        state.tenants.replica_moved(obj, src.tier, dst.tier)
    src.num_replicas -= 1
    dst.num_replicas += 1
    src.node.log_moved(obj.key, dst, dst_offset, obj.size_bytes, obj.checksum, obj.codec)
    if dst.tier > src.tier:
        src.demotions += 1
        state.demotions += 1
    else:
        dst.promotions += 1
        state.promotions += 1
    obj.slow_reads = 0


def demote_to_shadow(state, obj, src, src_offset: int, now_s: float) -> bool:
    """Demote ``obj``'s replica in ``src`` to its shadow (module doc) if the shadow lies
    one tier or more below on the same node: switch, free the ``src`` range (deferred while
    leased). False, changing nothing, if there is no usable shadow."""
    shadow = obj.shadow
    if shadow is None:
        return False
    segment, offset = shadow
    if not segment.alive or segment.node is not src.node or segment.tier <= src.tier:
        return False
    obj.shadow = None
    del state.shadows[obj]
    _switch(state, obj, (src, src_offset), segment, offset)
    # NOTE: the encoder's cached reply row names the old range; None makes it recompute
    # (replies.ReplicaRows), as a heartbeat's settled moves do through ``add``
    obj.reply_row = None
    state.free_range(obj, src, src_offset, now_s)
    return True


def drop_shadow(state, obj, now_s: float) -> None:
    """Free ``obj``'s shadow range (deferred while the object is leased: a reader given the
    SSD replica before the promotion may still read it)."""
    segment, offset = obj.shadow
    obj.shadow = None
    del state.shadows[obj]
    state.free_range(obj, segment, offset, now_s)


def reclaim_shadows(state, tier, need_bytes: int, now_s: float) -> tuple[int, int]:
    """Free shadows in last-tier segments of ``tier``, least recently used first, until
    ``need_bytes`` are freed or none is left; ``(bytes, shadows)`` freed."""
    if not state.shadows or need_bytes <= 0:
        return 0, 0
    freed = count = 0
    for obj in sorted(state.shadows, key=_last_used):
        segment = obj.shadow[0]
        if segment.tier != tier or segment.tier != segment.node.slowest_tier():
            continue
        drop_shadow(state, obj, now_s)
        freed += obj.size_bytes
        count += 1
        if freed >= need_bytes:
            break
    return freed, count


def _last_used(obj) -> int:
    return obj.last_used


def expire(state, now_s: float) -> None:
    """Abort moves past their deadline (never acknowledged: the daemon died or lost them)."""
    if state.moves:
        for move in [m for m in state.moves.values() if m.deadline_s <= now_s]:
            abort(state, move)


def forget_node(state, node) -> None:
    """Drop the moves and shadows of a dropped node (its segments and their space are
    gone)."""
    for move in [m for m in state.moves.values() if m.src.node is node]:
        _finish(state, move)
    node.outbox = []
    for obj in [o for o in state.shadows if o.shadow[0].node is node]:
        obj.shadow = None
        del state.shadows[obj]


def maybe_promote(state, objs, now_s: float) -> None:
    """After a read: queue SSD -> DRAM moves for objects read from SSD on a node whose DRAM
    stays under its high watermark with them (``--promote``: ``on-hit`` at the first such
    read, ``after:N`` at the N-th)."""
    after = state.config.promote_after
    high = state.config.high_watermark
    for obj in objs:
        src, src_offset = obj.replicas[0]
        if src.tier is not Tier.SSD or obj.move is not None:
            continue
        obj.slow_reads += 1
        if obj.slow_reads < after:
            continue
        for dst in src.node.segments.values():
            if (dst.tier is Tier.DRAM and dst.allocator.used_bytes - dst.outgoing_bytes
                    + obj.size_bytes <= high * dst.capacity_bytes):
                schedule(state, obj, src, src_offset, dst, now_s)
                break
