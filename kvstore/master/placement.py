"""Placement: which segments receive the replicas of a new object.

Rule: segments are ranked once per put_start request into preference classes, best first:
the preferred tier (when one is named), then the remaining tiers fastest first (HBM, DRAM,
SSD); inside a tier, segments of the ``near_node_id`` node first (e.g. the decode node a
prefill engine writes for), then of nodes on ``near_host_id``, then the others. Each key takes
its replicas from the best classes that have room, at most one replica per node; inside a
class the starting segment rotates key by key, so equal nodes fill evenly.
"""

from __future__ import annotations

from typing import Iterable

from kvstore.master.nodes import Node, SegmentSpace
from kvstore.tiers import TIERS_FASTEST_FIRST, Tier


def rank_segments(nodes: Iterable[Node], preferred_tier: Tier | None, near_host_id: str,
                  near_node_id: str = "") -> list[list[SegmentSpace]]:
    """The preference classes (lists of segments), best first; empty classes omitted."""
    tier_order = list(TIERS_FASTEST_FIRST)
    if preferred_tier is not None:
        tier_order.remove(preferred_tier)
        tier_order.insert(0, preferred_tier)
    rank_of_tier = {tier: i for i, tier in enumerate(tier_order)}
    classes: dict[tuple[int, int], list[SegmentSpace]] = {}
    for node in nodes:
        far = (0 if near_node_id and node.node_id == near_node_id else
               1 if near_host_id and node.host_id == near_host_id else 2)
        for segment in node.segments.values():
            classes.setdefault((rank_of_tier[segment.tier], far), []).append(segment)
    ranked = []
    for rank in sorted(classes):
        # most free space first: the rotation then starts from the emptiest node
        ranked.append(sorted(classes[rank], key=lambda s: -s.allocator.free_bytes))
    return ranked


def place(classes: list[list[SegmentSpace]], size_bytes: int, num_replicas: int, turn: int,
          ) -> list[tuple[SegmentSpace, int]] | None:
    """Allocate ``num_replicas`` ranges of ``size_bytes`` on distinct nodes.

    Returns ``[(segment, offset), ...]``, or None, with nothing left allocated, when fewer
    than ``num_replicas`` nodes have room. ``turn`` rotates the starting segment.
    """
    if num_replicas == 1:                                   # the common case, no node checks
        for segments in classes:
            count = len(segments)
            for j in range(count):
                segment = segments[(turn + j) % count]
                offset = segment.allocator.allocate(size_bytes)
                if offset is not None:
                    return [(segment, offset)]
        return None
    picks: list[tuple[SegmentSpace, int]] = []
    used_nodes: list[Node] = []
    for segments in classes:
        count = len(segments)
        for j in range(count):
            segment = segments[(turn + j) % count]
            if segment.node in used_nodes:
                continue
            offset = segment.allocator.allocate(size_bytes)
            if offset is None:
                continue
            picks.append((segment, offset))
            if len(picks) == num_replicas:
                return picks
            used_nodes.append(segment.node)
    for segment, offset in picks:
        segment.allocator.free(offset, size_bytes)
    return None


def place_at_home(classes: list[list[SegmentSpace]], home_node_id: str, size_bytes: int,
                  num_replicas: int, turn: int) -> list[tuple[SegmentSpace, int]] | None:
    """``place`` with the first replica on ``home_node_id`` (the key's home node,
    ``kvstore.home``): in the best class, when that node has a segment there with room; the
    other replicas as ``place`` picks them on other nodes. None, with nothing allocated,
    when the home is not in the best class (a hint ranked other nodes first), has no room
    there, or the other replicas find none: the caller then places as ``place`` does.

    Why only the best class: a get goes to the home first; a key the home holds on a slower
    tier than the others offer would cost every put that tier, and a hint (near host)
    that ranks other nodes first keeps its meaning.
    """
    if not classes or not home_node_id:
        return None
    first = classes[0]
    for segment in first:             # most free space first
        if segment.node.node_id != home_node_id:
            continue
        offset = segment.allocator.allocate(size_bytes)
        if offset is None:
            continue
        if num_replicas == 1:
            return [(segment, offset)]
        others = [[s for s in segments if s.node is not segment.node] for segments in classes]
        rest = place([c for c in others if c], size_bytes, num_replicas - 1, turn)
        if rest is None:
            segment.allocator.free(offset, size_bytes)
            return None
        return [(segment, offset)] + rest
    return None
