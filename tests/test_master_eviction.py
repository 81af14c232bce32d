"""Leases, pins, eviction and liveness, driven by a ManualClock (no sleeps)."""

from __future__ import annotations

from kvstore.v1 import master_pb2 as pb
from master_helpers import MiB, embedded, exists, get, put, register, replicas_of  # noqa: F401

BLOCK = 64 * 1024
SEGMENT = 16 * BLOCK     # 16 blocks per node


def _fill(m, prefix: str, count: int):
    reply = put(m.client, [f"{prefix}{i}" for i in range(count)], [BLOCK] * count)
    assert list(reply.statuses) == [pb.ITEM_OK] * count
    return reply


def test_lease_only_lengthens_and_blocks_remove_until_it_ends(embedded):
    m = embedded(lease_ttl_s=10.0)
    register(m.client, "n1")
    put(m.client, ["k"])
    assert get(m.client, ["k"], lease_ttl_ms=20_000).lease_expires_in_s == 20.0
    get(m.client, ["k"], lease_ttl_ms=1_000)                     # must not shorten it
    m.tick(15.0, "n1")
    assert list(m.client.call("Remove", pb.RemoveRequest(keys=["k"])).statuses) == \
        [pb.ITEM_LEASED]
    renewed = m.client.call("RenewLease", pb.RenewLeaseRequest(keys=["k", "x"],
                                                               lease_ttl_ms=10_000))
    assert list(renewed.statuses) == [pb.ITEM_OK, pb.ITEM_NOT_FOUND]
    m.tick(9.0, "n1")
    assert list(m.client.call("Remove", pb.RemoveRequest(keys=["k"])).statuses) == \
        [pb.ITEM_LEASED]
    m.tick(1.5, "n1")
    assert list(m.client.call("Remove", pb.RemoveRequest(keys=["k"])).statuses) == \
        [pb.ITEM_OK]


def test_forced_remove_of_leased_object_defers_reuse_of_its_space(embedded):
    m = embedded(lease_ttl_s=10.0)
    register(m.client, "n1", segments=[("d", pb.TIER_DRAM, 2 * BLOCK)])
    first = put(m.client, ["a"], [BLOCK])
    get(m.client, ["a"])
    m.client.call("Remove", pb.RemoveRequest(keys=["a"], force=True))
    assert exists(m.client, ["a"]) == [False]
    b = put(m.client, ["b"], [BLOCK])
    get(m.client, ["b"], lease_ttl_ms=60_000)                   # b may not be evicted either
    assert replicas_of(b, 0)[0][2] != replicas_of(first, 0)[0][2]
    assert list(put(m.client, ["c"], [BLOCK]).statuses) == [pb.ITEM_NO_SPACE]
    m.tick(10.5, "n1")                                          # the reader's lease ended
    c = put(m.client, ["c"], [BLOCK])
    assert replicas_of(c, 0)[0][2] == replicas_of(first, 0)[0][2]


def test_put_evicts_least_recently_used_first(embedded):
    m = embedded(high_watermark=1.0, low_watermark=0.85)   # only the put triggers eviction
    register(m.client, "n1", segments=[("d", pb.TIER_DRAM, SEGMENT)])
    _fill(m, "old", 16)
    m.tick(11.0, "n1")                 # the reads' leases below must be over by eviction
    get(m.client, ["old0", "old1"], lease_ttl_ms=1)             # recently used now
    m.tick(1.0, "n1")
    reply = put(m.client, ["new"], [BLOCK])
    assert list(reply.statuses) == [pb.ITEM_OK]
    present = exists(m.client, [f"old{i}" for i in range(16)])
    assert present[0] and present[1]                            # touched: kept
    assert not present[2]                                       # least recently used: gone
    stats = m.client.call("Stats", pb.StatsRequest())
    assert stats.evictions >= 1 and stats.evictions == 16 - sum(present)


def test_leased_and_pinned_objects_are_never_evicted(embedded):
    m = embedded(lease_ttl_s=100.0)
    register(m.client, "n1", segments=[("d", pb.TIER_DRAM, 4 * BLOCK)])
    _fill(m, "k", 4)
    get(m.client, ["k0"])
    m.client.call("Pin", pb.PinRequest(keys=["k1"], hard=True))
    m.client.call("Pin", pb.PinRequest(keys=["k2"], ttl_ms=50_000))
    m.client.call("Pin", pb.PinRequest(keys=["k3"], ttl_ms=50_000))
    m.client.call("Unpin", pb.UnpinRequest(keys=["k3"]))
    assert list(put(m.client, ["new1"], [BLOCK], hard_pin=True).statuses) == [pb.ITEM_OK]
    assert exists(m.client, ["k0", "k1", "k2", "k3"]) == [True, True, True, False]
    refused = put(m.client, ["new2"], [BLOCK], end=False)
    assert list(refused.statuses) == [pb.ITEM_NO_SPACE]
    assert "even after eviction" in refused.error_messages[0]
    m.tick(51.0, "n1")                                          # soft pin expired
    assert list(put(m.client, ["new2"], [BLOCK]).statuses) == [pb.ITEM_OK]
    assert exists(m.client, ["k0", "k1", "k2", "new1"]) == [True, True, False, True]


def test_soft_pin_from_put_start_lasts_its_ttl_after_put_end(embedded):
    m = embedded()
    register(m.client, "n1", segments=[("d", pb.TIER_DRAM, 2 * BLOCK)])
    put(m.client, ["pinned"], [BLOCK], soft_pin_ttl_ms=30_000)
    put(m.client, ["plain"], [BLOCK])
    put(m.client, ["new"], [BLOCK])
    assert exists(m.client, ["pinned", "plain", "new"]) == [True, False, True]


def test_high_watermark_evicts_down_to_low(embedded):
    m = embedded(high_watermark=0.9, low_watermark=0.5)
    register(m.client, "n1", segments=[("d", pb.TIER_DRAM, 10 * BLOCK)])
    _fill(m, "k", 9)
    assert all(exists(m.client, [f"k{i}" for i in range(9)]))
    put(m.client, ["k9"], [BLOCK])                             # 100% > 90%: evict to 50%
    tier = m.client.call("Stats", pb.StatsRequest()).tiers[0]
    assert tier.used_bytes == 5 * BLOCK
    assert exists(m.client, [f"k{i}" for i in range(10)]) == [False] * 5 + [True] * 5


def test_silent_node_is_dropped_at_once_and_its_space_freed(embedded):
    m = embedded(node_ttl_s=3.0, heartbeat_interval_s=1.0)
    register(m.client, "n1")
    register(m.client, "n2")
    reply = put(m.client, [f"k{i}" for i in range(6)], replicas=1)
    both = put(m.client, ["both"], replicas=2)
    on_n1 = [f"k{i}" for i in range(6) if replicas_of(reply, i)[0][0] == "n1"]
    assert 0 < len(on_n1) < 6
    m.tick(3.5, "n2")                                           # n1 stays silent
    assert exists(m.client, on_n1) == [False] * len(on_n1)
    assert [r[0] for r in replicas_of(get(m.client, ["both"]), 0)] == ["n2"]
    assert len(replicas_of(both, 0)) == 2
    nodes = m.client.call("ListNodes", pb.ListNodesRequest()).nodes
    assert [n.node_id for n in nodes] == ["n2"]
    assert m.heartbeat("n1").known is False
    # after expiry the node may register again, with fresh space
    register(m.client, "n1")
    again = put(m.client, ["after"], near_host_id="host-a", replicas=2)
    assert sorted(r[0] for r in replicas_of(again, 0)) == ["n1", "n2"]


def test_node_expiry_runs_without_any_request(embedded):
    """The sweeper thread drops a silent node even when nobody calls the master."""
    import time
    m = embedded(node_ttl_s=2.0)
    register(m.client, "n1")
    m.clock.advance(2.5)
    deadline = time.monotonic() + 5
    while m.state.nodes and time.monotonic() < deadline:
        time.sleep(0.02)      # waits for the real sweeper thread, not for the master's clock
    assert not m.state.nodes


def test_full_tier_of_pinned_objects_fails_fast_and_recovers(embedded):
    m = embedded(high_watermark=0.5, low_watermark=0.25)
    register(m.client, "n1", segments=[("d", pb.TIER_DRAM, 4 * BLOCK)])
    put(m.client, [f"p{i}" for i in range(4)], [BLOCK] * 4, hard_pin=True)
    keys = [f"x{i}" for i in range(200)]
    reply = put(m.client, keys, [BLOCK] * 200, end=False)
    assert list(reply.statuses) == [pb.ITEM_NO_SPACE] * 200
    assert m.client.call("Stats", pb.StatsRequest()).evictions == 0
    m.client.call("Unpin", pb.UnpinRequest(keys=["p0", "p1", "p2", "p3"]))
    m.tick(1.5, "n1")                        # the paused watermark pass runs again
    assert exists(m.client, [f"p{i}" for i in range(4)]).count(True) == 1   # down to 25%


def test_puts_that_eviction_cannot_help_evict_nothing(embedded):
    m = embedded(high_watermark=1.0, low_watermark=0.5)     # only a failing put may evict
    register(m.client, "n1", segments=[("d", pb.TIER_DRAM, 4 * BLOCK)])
    register(m.client, "n2", segments=[("d", pb.TIER_DRAM, 4 * BLOCK)])
    _fill(m, "k", 8)                                             # both nodes full
    for keys, sizes, replicas in ((["wide"], [BLOCK], 3), (["huge"], [5 * BLOCK], 1)):
        reply = put(m.client, keys, sizes, replicas=replicas, end=False)
        assert list(reply.statuses) == [pb.ITEM_NO_SPACE]
        assert "of 2 live" in reply.error_messages[0]
    assert exists(m.client, [f"k{i}" for i in range(8)]) == [True] * 8
    assert m.client.call("Stats", pb.StatsRequest()).evictions == 0
