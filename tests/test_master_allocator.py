"""SegmentAllocator: alignment, best fit, coalescing, adoption; hypothesis properties."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from kvstore.master.allocator import SegmentAllocator, aligned_size


def _assert_consistent(alloc: SegmentAllocator, live: dict[int, int]) -> None:
    """No two live ranges overlap, none overlaps free space, and free + used = capacity."""
    ranges = sorted([(o, aligned_size(s)) for o, s in live.items()] + alloc.free_extents())
    for (o1, l1), (o2, _) in zip(ranges, ranges[1:]):
        assert o1 + l1 <= o2, f"overlap at {o1}+{l1} > {o2}"
    assert all(o % 64 == 0 for o, _ in ranges)
    assert ranges == [] or ranges[-1][0] + ranges[-1][1] <= alloc.capacity_bytes
    assert sum(l for _, l in alloc.free_extents()) + alloc.used_bytes == alloc.capacity_bytes


def test_offsets_are_aligned_and_sizes_rounded():
    alloc = SegmentAllocator(10_000)
    assert alloc.capacity_bytes == 9984          # trailing sliver below 64 B is unusable
    a, b = alloc.allocate(1), alloc.allocate(65)
    assert (a, b) == (0, 64)
    assert alloc.used_bytes == 64 + 128


def test_full_segment_refuses_and_free_merges_neighbours():
    alloc = SegmentAllocator(64 * 4)
    offsets = [alloc.allocate(64) for _ in range(4)]
    assert alloc.allocate(1) is None
    alloc.free(offsets[1], 64)
    alloc.free(offsets[2], 64)
    assert alloc.free_extents() == [(64, 128)]     # coalesced into one hole
    assert alloc.allocate(128) == 64
    for offset in (offsets[0], 64, offsets[3]):
        alloc.free(offset, 128 if offset == 64 else 64)
    assert alloc.free_extents() == [(0, 256)] and alloc.used_bytes == 0


def test_fixed_size_churn_does_not_fragment():
    """Fixed-size KV blocks: after heavy random alloc/free, a full segment still fits the
    number of blocks its capacity allows."""
    import random
    rng = random.Random(7)
    block = 16 * 1024
    alloc = SegmentAllocator(block * 256)
    live = []
    for _ in range(5000):
        if live and (rng.random() < 0.5 or not alloc.can_allocate(block)):
            alloc.free(live.pop(rng.randrange(len(live))), block)
        else:
            offset = alloc.allocate(block)
            if offset is not None:
                live.append(offset)
    while (offset := alloc.allocate(block)) is not None:
        live.append(offset)
    assert len(live) == 256
    assert alloc.free_bytes == 0


def test_best_fit_picks_the_smallest_hole():
    alloc = SegmentAllocator(64 * 10)
    offs = [alloc.allocate(64) for _ in range(10)]
    alloc.free(offs[1], 64)          # hole of 64 at 64
    alloc.free(offs[4], 64)
    alloc.free(offs[5], 64)
    alloc.free(offs[6], 64)          # hole of 192 at 256
    assert alloc.allocate(64) == 64
    assert alloc.allocate(100) == 256


def test_reserve_many_adopts_valid_ranges_and_refuses_bad_ones():
    alloc = SegmentAllocator(64 * 100)
    accepted = alloc.reserve_many([(0, 100), (64, 10), (128, 64), (130, 10), (6400, 1),
                                   (6336, 64), (256, 0)])
    # (64,10) overlaps (0,100) which covers 128 bytes; unaligned, out of range, empty refused
    assert accepted == [True, False, True, False, False, True, False]
    assert alloc.used_bytes == 128 + 64 + 64
    _assert_consistent(alloc, {0: 100, 128: 64, 6336: 64})
    assert alloc.allocate(64) == 192


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000), st.integers(0, 10_000)),
                max_size=120))
def test_property_no_overlap_and_everything_returns(ops):
    alloc = SegmentAllocator(64 * 1024)
    live: dict[int, int] = {}
    for is_alloc, size, pick in ops:
        if is_alloc or not live:
            offset = alloc.allocate(size)
            if offset is None:
                assert not alloc.can_allocate(size)
                continue
            assert offset not in live
            live[offset] = size
        else:
            offset = sorted(live)[pick % len(live)]
            alloc.free(offset, live.pop(offset))
        _assert_consistent(alloc, live)
    for offset, size in list(live.items()):
        alloc.free(offset, size)
    assert alloc.used_bytes == 0
    assert alloc.free_extents() == [(0, alloc.capacity_bytes)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 700)), max_size=40))
def test_property_reserve_many_never_overlaps(ranges):
    alloc = SegmentAllocator(64 * 100)
    accepted = alloc.reserve_many([(o * 64 if o % 7 else o, s) for o, s in ranges])
    live = {(o * 64 if o % 7 else o): s for (o, s), ok in zip(ranges, accepted) if ok}
    assert len(live) == sum(accepted)
    _assert_consistent(alloc, live)
    for offset, size in live.items():
        alloc.free(offset, size)
    assert alloc.free_extents() == [(0, alloc.capacity_bytes)]
