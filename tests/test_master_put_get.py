"""Two-phase put, get, exists, remove, placement: against a real master (embedded, with a
ManualClock) spoken to over gRPC."""

from __future__ import annotations

import pytest

from kvstore.v1 import master_pb2 as pb
from master_helpers import MiB, embedded, exists, get, put, register, replicas_of  # noqa: F401


def _used(client) -> int:
    return sum(t.used_bytes for t in client.call("Stats", pb.StatsRequest()).tiers)


@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_pending_is_invisible_until_put_end(embedded, mode):
    m = embedded(grpc_mode=mode)
    register(m.client, "n1")
    reply = put(m.client, ["k1", "k2"], [100, 5000], end=False)
    assert list(reply.statuses) == [pb.ITEM_OK, pb.ITEM_OK]
    (node, segment, off1), = replicas_of(reply, 0)
    (_, _, off2), = replicas_of(reply, 1)
    assert (node, segment) == ("n1", "dram0") and off1 % 64 == 0 and off2 % 64 == 0
    assert off1 + 100 <= off2 or off2 + 5000 <= off1
    assert list(get(m.client, ["k1"]).statuses) == [pb.ITEM_PENDING]
    assert exists(m.client, ["k1", "k2"]) == [False, False]
    assert m.client.call("MatchPrefix", pb.MatchPrefixRequest(keys=["k1"])).num_matched == 0
    ended = m.client.call("PutEnd", pb.PutEndRequest(keys=["k1", "k2"], client_id="w1",
                                                     checksums=[11, 22]))
    assert list(ended.statuses) == [pb.ITEM_OK, pb.ITEM_OK]
    reply = get(m.client, ["k2", "nope", "k1"])
    assert list(reply.statuses) == [pb.ITEM_OK, pb.ITEM_NOT_FOUND, pb.ITEM_OK]
    assert list(reply.sizes) == [5000, 0, 100] and list(reply.checksums) == [22, 0, 11]
    assert replicas_of(reply, 0) == [("n1", "dram0", off2)]
    assert replicas_of(reply, 1) == []
    assert replicas_of(reply, 2) == [("n1", "dram0", off1)]
    assert reply.segments[0].shm_name == "/kv-n1-dram0"
    assert reply.nodes[0].data_addr == "127.0.0.1:7000"
    assert exists(m.client, ["k1", "k2", "nope"]) == [True, True, False]


def test_put_of_existing_key_is_already_exists_and_allocates_nothing(embedded):
    m = embedded()
    register(m.client, "n1")
    put(m.client, ["done"])
    put(m.client, ["pending"], client_id="other", end=False)
    used = _used(m.client)
    reply = put(m.client, ["done", "pending", "new", "new"], end=False)
    assert list(reply.statuses) == [pb.ITEM_ALREADY_EXISTS, pb.ITEM_ALREADY_EXISTS,
                                    pb.ITEM_OK, pb.ITEM_ALREADY_EXISTS]
    assert list(reply.replica_count) == [0, 0, 1, 0]
    assert _used(m.client) == used + 1024


def test_put_end_needs_the_writer_and_is_idempotent(embedded):
    m = embedded()
    register(m.client, "n1")
    put(m.client, ["k"], client_id="alice", end=False)
    wrong = m.client.call("PutEnd", pb.PutEndRequest(keys=["k", "ghost"], client_id="bob"))
    assert list(wrong.statuses) == [pb.ITEM_NOT_FOUND, pb.ITEM_NOT_FOUND]
    assert exists(m.client, ["k"]) == [False]
    for _ in range(2):
        ok = m.client.call("PutEnd", pb.PutEndRequest(keys=["k"], client_id="alice"))
        assert list(ok.statuses) == [pb.ITEM_OK]
    assert exists(m.client, ["k"]) == [True]


def test_put_revoke_frees_space_and_only_touches_pending(embedded):
    m = embedded()
    register(m.client, "n1")
    put(m.client, ["done"])
    used = _used(m.client)
    first = put(m.client, ["p"], [4096], end=False)
    revoke = m.client.call("PutRevoke", pb.PutRevokeRequest(keys=["p", "done", "ghost"],
                                                            client_id="w1"))
    assert list(revoke.statuses) == [pb.ITEM_OK, pb.ITEM_NOT_FOUND, pb.ITEM_NOT_FOUND]
    assert _used(m.client) == used and exists(m.client, ["done"]) == [True]
    again = put(m.client, ["p"], [4096], end=False)
    assert list(again.statuses) == [pb.ITEM_OK]
    assert replicas_of(again, 0) == replicas_of(first, 0)     # the space was reused


def test_pending_writer_that_vanished_is_reclaimed_after_timeout(embedded):
    m = embedded(pending_timeout_s=30.0)
    register(m.client, "n1")
    put(m.client, ["orphan"], end=False)
    m.tick(29.0, "n1")
    assert list(get(m.client, ["orphan"]).statuses) == [pb.ITEM_PENDING]
    m.tick(1.5, "n1")
    assert list(get(m.client, ["orphan"]).statuses) == [pb.ITEM_NOT_FOUND]
    assert _used(m.client) == 0
    late = m.client.call("PutEnd", pb.PutEndRequest(keys=["orphan"], client_id="w1"))
    assert list(late.statuses) == [pb.ITEM_NOT_FOUND]


def test_replicas_land_on_distinct_nodes(embedded):
    m = embedded()
    for node_id in ("n1", "n2", "n3"):
        register(m.client, node_id)
    reply = put(m.client, [f"k{i}" for i in range(20)], replicas=2)
    for i in range(20):
        nodes = [r[0] for r in replicas_of(reply, i)]
        assert len(nodes) == 2 and len(set(nodes)) == 2
    got = get(m.client, ["k0"])
    assert len(replicas_of(got, 0)) == 2
    too_many = put(m.client, ["x"], replicas=4, end=False)
    assert list(too_many.statuses) == [pb.ITEM_NO_SPACE]
    assert "4 distinct node" in too_many.error_messages[0]
    # equal nodes share the load
    counts = {}
    for i in range(20):
        for node_id, _, _ in replicas_of(reply, i):
            counts[node_id] = counts.get(node_id, 0) + 1
    assert min(counts.values()) >= 10


def test_placement_prefers_tier_then_faster_then_near_host(embedded):
    m = embedded()
    register(m.client, "far", host_id="h-far",
             segments=[("hbm", pb.TIER_HBM, MiB), ("dram", pb.TIER_DRAM, MiB),
                       ("ssd", pb.TIER_SSD, 8 * MiB)])
    register(m.client, "near", host_id="h-near", segments=[("dram", pb.TIER_DRAM, MiB)])
    assert replicas_of(put(m.client, ["a"]), 0)[0][:2] == ("far", "hbm")
    assert replicas_of(put(m.client, ["b"], preferred_tier=pb.TIER_SSD), 0)[0][:2] == \
        ("far", "ssd")
    near = put(m.client, ["c"], preferred_tier=pb.TIER_DRAM, near_host_id="h-near")
    assert replicas_of(near, 0)[0][:2] == ("near", "dram")
    # a full preferred tier spills to the next tier instead of failing
    big = put(m.client, ["d"], [3 * MiB], preferred_tier=pb.TIER_DRAM)
    assert replicas_of(big, 0)[0][:2] == ("far", "ssd")


def test_remove_respects_leases_and_pins_unless_forced(embedded):
    m = embedded(lease_ttl_s=5.0)
    register(m.client, "n1")
    put(m.client, ["leased", "pinned", "plain"])
    put(m.client, ["pending"], end=False)
    m.client.call("Pin", pb.PinRequest(keys=["pinned"], hard=True))
    get(m.client, ["leased"])
    reply = m.client.call("Remove", pb.RemoveRequest(keys=["leased", "pinned", "plain",
                                                           "pending", "ghost", ""]))
    assert list(reply.statuses) == [pb.ITEM_LEASED, pb.ITEM_PINNED, pb.ITEM_OK,
                                    pb.ITEM_PENDING, pb.ITEM_NOT_FOUND, pb.ITEM_INVALID]
    assert reply.error_messages[5] == "key must not be empty"
    assert exists(m.client, ["leased", "pinned", "plain"]) == [True, True, False]
    forced = m.client.call("Remove", pb.RemoveRequest(keys=["leased", "pinned", "pending"],
                                                      force=True))
    # force never ends a put in flight: the writer (or the pending timeout) does
    assert list(forced.statuses) == [pb.ITEM_OK, pb.ITEM_OK, pb.ITEM_PENDING]
    assert exists(m.client, ["leased", "pinned"]) == [False, False]
    ended = m.client.call("PutEnd", pb.PutEndRequest(keys=["pending"], client_id="w1"))
    assert list(ended.statuses) == [pb.ITEM_OK] and exists(m.client, ["pending"]) == [True]


def test_a_soft_pin_blocks_eviction_but_not_remove(embedded):
    m = embedded()
    register(m.client, "n1")
    put(m.client, ["soft"])
    m.client.call("Pin", pb.PinRequest(keys=["soft"], ttl_ms=60_000))
    reply = m.client.call("Remove", pb.RemoveRequest(keys=["soft"]))
    assert list(reply.statuses) == [pb.ITEM_OK] and exists(m.client, ["soft"]) == [False]


def test_remove_prefix_and_match_prefix(embedded):
    m = embedded()
    register(m.client, "n1")
    register(m.client, "n2")
    put(m.client, ["ns/a/0", "ns/a/1", "ns/a/2", "ns/b/0"])
    matched = m.client.call("MatchPrefix", pb.MatchPrefixRequest(
        keys=["ns/a/0", "ns/a/1", "ns/a/9", "ns/a/2"]))
    assert matched.num_matched == 2 and len(matched.node_index) == 2
    assert {matched.nodes[i].node_id for i in matched.node_index} <= {"n1", "n2"}
    get(m.client, ["ns/a/1"])                                    # leased: skipped
    removed = m.client.call("RemovePrefix", pb.RemovePrefixRequest(prefix="ns/a/"))
    assert (removed.num_removed, removed.num_skipped) == (2, 1)
    assert exists(m.client, ["ns/a/0", "ns/a/1", "ns/a/2", "ns/b/0"]) == \
        [False, True, False, True]
    with pytest.raises(Exception, match="prefix must not be empty"):
        m.client.call("RemovePrefix", pb.RemovePrefixRequest(prefix=""))


def test_same_host_replica_is_listed_first_for_the_reader(embedded):
    m = embedded()
    register(m.client, "n1", host_id="h1")
    register(m.client, "n2", host_id="h2")
    put(m.client, ["k", "single"], replicas=2)
    for host, first in (("h1", "n1"), ("h2", "n2")):
        reply = get(m.client, ["k", "missing"], client_host_id=host)
        assert [r[0] for r in replicas_of(reply, 0)][0] == first
        assert list(reply.statuses) == [pb.ITEM_OK, pb.ITEM_NOT_FOUND]
    # the all-found fast path and the general path agree on a single-replica batch
    put(m.client, ["one"], near_host_id="h2")
    fast = get(m.client, ["one"])
    slow = get(m.client, ["one", "missing"])
    assert replicas_of(fast, 0) == replicas_of(slow, 0)
    assert fast.sizes[0] == slow.sizes[0] == 1000
