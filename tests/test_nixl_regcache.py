"""nixl_regcache: which registrations the nixl transport keeps across calls, and which it
releases (pure: the spans and descriptor lists are plain objects, no NIXL needed; the
transport's use of it against a real daemon is in test_nixl.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvstore.transport.nixl_regcache import RegistrationCache

MiB = 1024 * 1024


def span(start: int, length: int, descs: object) -> SimpleNamespace:
    return SimpleNamespace(start=start, end=start + length, descs=descs,
                           items=[SimpleNamespace(view=memoryview(bytearray(1)))])


def test_a_span_inside_a_cached_one_hits_and_others_miss():
    cache = RegistrationCache()
    (entry,), evicted = cache.add([span(10 * MiB, 4 * MiB, "d1")])
    assert evicted == []
    cache.give(entry)
    assert cache.take(11 * MiB, 12 * MiB) is entry          # inside
    assert cache.take(9 * MiB, 11 * MiB) is None            # reaches outside
    assert cache.take(13 * MiB, 15 * MiB) is None
    assert entry.users == 1


def test_least_recently_used_is_evicted_never_one_in_use_or_abandoned():
    cache = RegistrationCache(max_entries=2)
    a, b = cache.add([span(0, MiB, "a")])[0][0], cache.add([span(MiB, MiB, "b")])[0][0]
    cache.give(a)
    # b is in use: adding c must evict a (the only free one), not b
    (c,), evicted = cache.add([span(2 * MiB, MiB, "c")])
    assert evicted == ["a"] and len(cache) == 2
    cache.give(c, abandoned=True)    # its transfer passed the deadline
    (d,), evicted = cache.add([span(3 * MiB, MiB, "d")])
    assert evicted == [] and len(cache) == 3                # b in use, c abandoned: kept
    assert cache.give(b) == ["b"] and len(cache) == 2       # evicted once free
    assert sorted(cache.clear()) == ["c", "d"] and len(cache) == 0 and cache.num_bytes == 0


def test_spans_sharing_one_descriptor_list_are_evicted_together_and_bytes_bound():
    cache = RegistrationCache(max_bytes=4 * MiB)
    shared = object()
    entries, _ = cache.add([span(0, MiB, shared), span(8 * MiB, MiB, shared)])
    for entry in entries:
        cache.give(entry)
    assert cache.num_bytes == 2 * MiB
    (big,), evicted = cache.add([span(16 * MiB, 3 * MiB, "big")])
    assert evicted == [shared] and cache.num_bytes == 3 * MiB   # the list once, both spans
    assert not cache.fits(4 * MiB + 1) and cache.fits(4 * MiB)
    assert not RegistrationCache(max_entries=0).fits(1)


def test_an_entry_holds_its_memory():
    cache = RegistrationCache()
    buffer = bytearray(MiB)
    (entry,), _ = cache.add([SimpleNamespace(start=0, end=MiB, descs="d", items=[
        SimpleNamespace(view=memoryview(buffer))])])   # the call's items go away
    with pytest.raises(BufferError):
        buffer.extend(b"x")
    cache.give(entry)
    cache.clear()
    del entry
    buffer.extend(b"x")      # released: the memory is the caller's again
