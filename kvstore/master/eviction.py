"""Eviction: free space by dropping least recently used objects.

Trigger: (1) after each put_start and each sweep, any tier whose used bytes exceed
``high_watermark`` of its capacity; (2) a put_start that finds no room for a key, before it
answers ITEM_NO_SPACE. Rule: walk the objects in LRU order (``last_used`` oldest first)
and drop COMPLETE objects that are not leased, not hard-pinned and not soft-pinned, and that
hold a replica in a tier under pressure, until each such tier is at ``low_watermark``; for a
put that still does not fit, keep dropping in growing rounds until it fits or nothing
evictable is left. An evicted object loses all its replicas. Leased, pinned and PENDING
objects are never evicted.
"""

from __future__ import annotations

from kvstore.master.nodes import SegmentSpace, tier_usage

#: After a watermark pass that could evict nothing, wait this long before the next one.
PRESSURE_RETRY_S = 1.0


def relieve_pressure(state, now_s: float) -> int:
    """Evict in every tier above the high watermark down to the low one; return the count.

    A pass that finds nothing evictable (everything leased or pinned) pauses these passes for
    ``PRESSURE_RETRY_S``, so a full tier does not cost every put_start a scan of all objects.
    """
    if now_s < state.pressure_idle_until_s:
        return 0
    config = state.config
    need = {tier: u.used_bytes - int(config.low_watermark * u.capacity_bytes)
            for tier, u in tier_usage(state.nodes.values()).items()
            if u.used_bytes > config.high_watermark * u.capacity_bytes}
    if not need:
        return 0
    num_evicted = _evict(state, need, now_s)
    if not num_evicted:
        state.pressure_idle_until_s = now_s + PRESSURE_RETRY_S
    return num_evicted


def make_room(state, classes: list[list[SegmentSpace]], size_bytes: int, num_replicas: int,
              now_s: float) -> bool:
    """Evict until ``num_replicas`` distinct nodes of ``classes`` can take ``size_bytes``.
    Returns True if they now can, False if nothing more may be evicted."""
    tiers = {segment.tier for segments in classes for segment in segments}
    big_enough = {segment.node for segments in classes for segment in segments
                  if segment.allocator.capacity_bytes >= size_bytes}
    if len(big_enough) < num_replicas:
        return False       # no eviction can help: too few nodes, or the object is too big
    low = state.config.low_watermark
    need = {tier: u.used_bytes - int(low * u.capacity_bytes)
            for tier, u in tier_usage(state.nodes.values()).items()
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
    """Drop LRU-first evictable objects with a replica in a tier of ``need`` until each
    tier's need (bytes) is met. Returns how many objects were dropped."""
    need = dict(need)
    victims = []
    # NOTE: sorting on demand keeps the read path free of LRU list updates; eviction runs
    # in rounds that free down to the low watermark, so the sort is amortized over many puts.
    for obj in sorted(state.objects.values(), key=_last_used):
        if not obj.is_evictable(now_s):
            continue
        tiers = [segment.tier for segment, _ in obj.replicas if need.get(segment.tier, 0) > 0]
        if not tiers:
            continue
        victims.append(obj)
        for tier in tiers:
            need[tier] -= obj.size_bytes
        if all(v <= 0 for v in need.values()):
            break
    for obj in victims:
        state.drop_object(obj, now_s)
    state.evictions += len(victims)
    return len(victims)
