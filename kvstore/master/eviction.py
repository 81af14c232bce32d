"""Pressure relief: demote least recently used objects one tier down, and evict them from
the last tier.

Trigger: (1) after each put_start and each sweep, any segment or tier whose used bytes exceed
``high_watermark`` of its capacity; (2) a put_start that finds no room for a key, before it
answers ITEM_NO_SPACE.

Rule: walk the objects in LRU order (``last_used`` oldest first), taking only COMPLETE
objects that are not leased, not hard-pinned and not soft-pinned.
- Demotion: a segment that is not its node's slowest (HBM, or DRAM above an SSD) sends such
  objects one tier down on the same node (``tiering``: copy, then switch) until its used
  bytes, less those already moving out, are at ``low_watermark``. A lower tier without room
  stops that segment's pass (its own pass evicts and makes room). Never evicts.
- Eviction: in each tier, over the segments that are their node's slowest (the last tier),
  drop such objects until the tier is at ``low_watermark``; for a put that still does not
  fit, keep dropping in growing rounds until it fits or nothing evictable is left. An evicted
  object loses all its replicas.
- Inclusive copies (``tiering``: the SSD range a promoted object keeps) go first: a demotion
  to an object's own shadow is a metadata switch, and a tier's eviction pass frees its
  shadows (LRU first) before it evicts anything.
Leased, pinned, PENDING and moving objects are never demoted; leased, pinned and PENDING ones
never evicted.
"""

from __future__ import annotations

from kvstore.master import tiering
from kvstore.master.nodes import SegmentSpace, tier_usage

#: After a watermark pass that could evict nothing, wait this long before the next one.
PRESSURE_RETRY_S = 1.0


def relieve_pressure(state, now_s: float) -> int:
    """Demote out of every segment above the high watermark that has a lower tier, and evict
    in every last tier above it, down to the low one; return how many objects were demoted
    (moves queued) or evicted.

    A pass that finds nothing to move or evict (everything leased or pinned, lower tiers
    full) pauses these passes for ``PRESSURE_RETRY_S``, so a full tier does not cost every
    put_start a scan of all objects.
    """
    if now_s < state.pressure_idle_until_s:
        return 0
    config = state.config
    pressed = _pressed_upper_segments(state) if state.tiered else {}
    need = {tier: u.used_bytes - int(config.low_watermark * u.capacity_bytes)
            for tier, u in tier_usage(state.nodes.values(), last_only=True).items()
            if u.used_bytes > config.high_watermark * u.capacity_bytes}
    if not need and not pressed:
        return 0
    num_done = _evict(state, need, now_s) if need else 0
    if pressed:
        num_done += _demote(state, pressed, now_s)
    if not num_done:
        state.pressure_idle_until_s = now_s + PRESSURE_RETRY_S
    return num_done


def _pressed_upper_segments(state) -> dict[SegmentSpace, int]:
    """Segment -> bytes to move out, for segments above the high watermark (less what is
    moving out already) that are not their node's slowest."""
    high, low = state.config.high_watermark, state.config.low_watermark
    pressed = {}
    for node in state.nodes.values():
        slowest = node.slowest_tier()
        for segment in node.segments.values():
            if segment.tier == slowest:
                continue
            used = segment.allocator.used_bytes - segment.outgoing_bytes
            if used > high * segment.capacity_bytes:
                pressed[segment] = used - int(low * segment.capacity_bytes)
    return pressed


def _demote(state, pressed: dict[SegmentSpace, int], now_s: float) -> int:
    """Queue LRU-first moves out of ``pressed`` segments until each has moved its share.
    Returns how many moves were queued."""
    num_moves = 0
    for obj in sorted(state.objects.values(), key=_last_used):
        if obj.move is not None or not obj.is_evictable(now_s):
            continue
        for segment, offset in obj.replicas:
            if pressed.get(segment, 0) <= 0:
                continue
            if tiering.demote_to_shadow(state, obj, segment, offset, now_s):
                pressed[segment] -= obj.size_bytes
                num_moves += 1
                break
            target = tiering.demotion_target(obj, segment)
            if target is None or not tiering.schedule(state, obj, segment, offset, target,
                                                      now_s):
                del pressed[segment]       # no room below: its own pass must make some
                continue
            pressed[segment] -= obj.size_bytes
            num_moves += 1
            break
        if not pressed or all(v <= 0 for v in pressed.values()):
            break
    return num_moves


def make_room(state, classes: list[list[SegmentSpace]], size_bytes: int, num_replicas: int,
              now_s: float) -> bool:
    """Evict until ``num_replicas`` distinct nodes of ``classes`` can take ``size_bytes``.
    Returns True if they now can, False if nothing more may be evicted."""
    tiers = {segment.tier for segments in classes for segment in segments
             if segment.tier == segment.node.slowest_tier()}
    big_enough = {segment.node for segments in classes for segment in segments
                  if segment.allocator.capacity_bytes >= size_bytes}
    if len(big_enough) < num_replicas:
        return False       # no eviction can help: too few nodes, or the object is too big
    low = state.config.low_watermark
    need = {tier: u.used_bytes - int(low * u.capacity_bytes)
            for tier, u in tier_usage(state.nodes.values(), last_only=True).items()
            if tier in tiers and u.used_bytes > low * u.capacity_bytes}
    round_bytes = size_bytes * num_replicas
    while True:
        evicted = _evict(state, need, now_s) if need else 0
        if _fits(classes, size_bytes, num_replicas):
            return True
        if not evicted and need:
            return False
        need = {tier: round_bytes for tier in tiers}
        round_bytes *= 2


def _fits(classes: list[list[SegmentSpace]], size_bytes: int, num_replicas: int) -> bool:
    nodes = {segment.node for segments in classes for segment in segments
             if segment.alive and segment.allocator.can_allocate(size_bytes)}
    return len(nodes) >= num_replicas


def _last_used(obj) -> int:
    return obj.last_used


def _evict(state, need: dict[int, int], now_s: float) -> int:
    """Free shadows (``tiering.reclaim_shadows``), then drop LRU-first evictable objects with
    a replica in a last-tier segment of a tier of ``need``, until each tier's need (bytes) is
    met. Returns how many shadows were freed plus objects dropped."""
    need = dict(need)
    num_reclaimed = 0
    if state.shadows:
        for tier in need:
            freed, count = tiering.reclaim_shadows(state, tier, need[tier], now_s)
            need[tier] -= freed
            num_reclaimed += count
        if all(v <= 0 for v in need.values()):
            return num_reclaimed
    victims = []
    # NOTE: sorting on demand keeps the read path free of LRU list updates; eviction runs
    # in rounds that free down to the low watermark, so the sort is amortized over many puts.
    for obj in sorted(state.objects.values(), key=_last_used):
        if not obj.is_evictable(now_s):
            continue
        tiers = [segment.tier for segment, _ in obj.replicas if need.get(segment.tier, 0) > 0
                 and segment.tier == segment.node.slowest_tier()]
        if not tiers:
            continue
        victims.append(obj)
        for tier in tiers:
            need[tier] -= obj.size_bytes
        if all(v <= 0 for v in need.values()):
            break
    for obj in victims:
        for segment, _ in obj.replicas:
            segment.evictions += 1
        state.drop_object(obj, now_s)
    state.evictions += len(victims)
    return num_reclaimed + len(victims)
