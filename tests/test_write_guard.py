"""The daemon's write guard on its own (no sockets): which writes a capability allows, and
how committed ranges learnt from the object table refuse stale capabilities. The guard is
the same object the data plane and the tier moves call; the clock is injected."""

from __future__ import annotations

import pytest

from kvstore import capability
from kvstore.daemon.write_guard import CapabilityRefused, RangeCommitted, WriteGuard

NODE = "n1"
NOW_S = 1_000_000.0


@pytest.fixture()
def guard():
    guard = WriteGuard(NODE, wall_clock=lambda: NOW_S)
    guard.set_secret(SECRET)
    return guard


SECRET = capability.new_secret()


def cap(offset: int, length: int, *, node_seq: int = 5, writer: str = "cluster",
        expiry_ms: int = int(NOW_S * 1000) + 1000, secret: bytes = SECRET,
        segment: str = "dram0", node: str = NODE) -> bytes:
    return capability.issue(secret, node, segment, offset, length, "k", writer, expiry_ms,
                            node_seq)


def test_without_a_secret_every_write_is_allowed():
    guard = WriteGuard(NODE)
    assert not guard.enforcing
    guard.check("dram0", 0, 1 << 20, b"", "cluster")


def test_capability_allows_its_range_and_parts_of_it(guard):
    blob = cap(4096, 8192)
    guard.check("dram0", 4096, 8192, blob, "cluster")
    guard.check("dram0", 8192, 4096, blob, "cluster")
    for offset, length in ((0, 4096), (4032, 128), (12224, 128), (4096, 8193)):
        with pytest.raises(CapabilityRefused, match="allows"):
            guard.check("dram0", offset, length, blob, "cluster")


@pytest.mark.parametrize("blob, reason", [
    (b"", "no write capability"),
    (cap(0, 64, secret=b"\1" * 32), "does not verify"),
    (cap(0, 64, segment="dram1"), "does not verify"),
    (cap(0, 64, node="n2"), "does not verify"),
    (cap(0, 64, expiry_ms=int(NOW_S * 1000)), "expired"),
    (cap(0, 64, writer="tenant-b"), "writer"),
    (cap(0, 64)[:-1], "malformed"),
    (cap(0, 64)[:3] + b"\xff" + cap(0, 64)[4:], "does not verify"),   # a tampered offset
])
def test_bad_capabilities_are_refused_with_the_reason(guard, blob, reason):
    with pytest.raises(CapabilityRefused, match=reason):
        guard.check("dram0", 0, 64, blob, "cluster")


def test_committed_after_issue_refuses_and_before_issue_trusts_the_master(guard):
    guard.note_stored("dram0", "old", 0, 4096, seq=3)       # known to the master at seq 5
    guard.note_stored("dram0", "new", 8192, 4096, seq=7)    # committed after seq 5
    guard.check("dram0", 0, 4096, cap(0, 4096), "cluster")
    with pytest.raises(RangeCommitted, match="'new'"):
        guard.check("dram0", 8192, 4096, cap(8192, 4096), "cluster")
    # a range that starts before the object and reaches into it, and one that covers it
    with pytest.raises(RangeCommitted):
        guard.check("dram0", 4096, 4097, cap(4096, 8192), "cluster")
    with pytest.raises(RangeCommitted):
        guard.check("dram0", 9000, 10, cap(8192, 4096), "cluster")
    guard.check("dram0", 4096, 4096, cap(4096, 8192), "cluster")   # just before it
    guard.check("dram0", 12288, 64, cap(12288, 64), "cluster")     # just after it


def test_freed_ranges_and_reused_offsets(guard):
    guard.note_stored("dram0", "a", 0, 4096, seq=7)
    guard.note_stored("dram0", "b", 0, 4096, seq=8)     # same offset, another key (a change
    guard.note_freed("dram0", "a", 0)                   # set adds before it removes)
    with pytest.raises(RangeCommitted, match="'b'"):
        guard.check("dram0", 0, 64, cap(0, 64), "cluster")
    guard.note_freed("dram0", "b", 0)
    guard.check("dram0", 0, 64, cap(0, 64), "cluster")


def test_a_new_registration_voids_old_capabilities_and_ranges(guard):
    blob = cap(0, 64)
    guard.note_stored("dram0", "a", 4096, 64, seq=9)
    guard.set_secret(capability.new_secret())
    with pytest.raises(CapabilityRefused, match="does not verify"):
        guard.check("dram0", 0, 64, blob, "cluster")
    guard.set_secret(SECRET)     # the ranges of the earlier registration were dropped
    guard.check("dram0", 4096, 64, cap(4096, 64, node_seq=1), "cluster")
