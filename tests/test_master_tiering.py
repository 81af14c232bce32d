"""The master's side of tier moves, spoken through its real API by a test playing the daemon:
demotion over the high watermark (copy ordered in a heartbeat, switch only after the ack,
source freed after the lease), failed and never-acknowledged moves, promotion on a read
from SSD, and the per-node tier counters."""

from __future__ import annotations

import grpc
import pytest

import kvstore
from master_helpers import MiB, embedded, exists, get, put, register, replicas_of  # noqa: F401
from kvstore.v1 import master_pb2 as pb

DRAM_SSD = [("dram0", pb.TIER_DRAM, 8 * MiB), ("ssd0", pb.TIER_SSD, 64 * MiB)]
KEYS = [f"k{i}" for i in range(8)]


def _fill(m) -> None:
    """One node with 8 MiB DRAM + 64 MiB SSD, filled with 8 objects of 1 MiB: DRAM is at
    100% > 95%, so the two least recently used (k0, k1) are demoted down to 85%."""
    register(m.client, "n1", segments=DRAM_SSD)
    for key in KEYS:
        put(m.client, [key], [MiB])


def _beat(m, *, done=(), failed=(), acked_seq=0) -> pb.HeartbeatResponse:
    return m.client.call("Heartbeat", pb.HeartbeatRequest(
        node_id="n1", acked_seq=acked_seq, moves_done=done, moves_failed=failed))


def _tiers(m) -> dict[int, pb.TierStats]:
    node = m.client.call("ListNodes", pb.ListNodesRequest()).nodes[0]
    return {t.tier: t for t in node.tiers}


def _where(m, key) -> tuple[str, int]:
    reply = get(m.client, [key], lease_ttl_ms=1)
    _, segment_id, offset = replicas_of(reply, 0)[0]
    return segment_id, offset


def test_demotion_copies_first_and_switches_only_after_the_ack(embedded):
    m = embedded(promote="off")      # the reads below would promote k0 back
    _fill(m)
    moves = _beat(m).moves
    assert [mv.key for mv in moves] == ["k0", "k1"]          # least recently used first
    assert all(mv.src_segment_id == "dram0" and mv.dst_segment_id == "ssd0"
               and mv.length == MiB for mv in moves)
    assert _tiers(m)[pb.TIER_SSD].used_bytes == 2 * MiB      # destinations allocated
    m.clock.advance(0.01)
    assert _where(m, "k0") == ("dram0", moves[0].src_offset)  # not acked: still the source
    assert _beat(m).moves == []                                # each move is sent once

    reply = _beat(m, done=[moves[0].move_id, moves[1].move_id])
    m.clock.advance(0.01)                                      # the 1 ms lease above ended
    assert _where(m, "k0") == ("ssd0", moves[0].dst_offset)
    assert _where(m, "k1") == ("ssd0", moves[1].dst_offset)
    # the daemon's table learns the new ranges in the same reply
    added = dict(zip(reply.added.keys, zip(reply.added.segment_ids, reply.added.offsets)))
    assert added["k0"] == ("ssd0", moves[0].dst_offset)
    tiers = _tiers(m)
    assert tiers[pb.TIER_DRAM].used_bytes == 6 * MiB and tiers[pb.TIER_DRAM].demotions == 2
    assert tiers[pb.TIER_DRAM].num_objects == 6 and tiers[pb.TIER_SSD].num_objects == 2
    assert tiers[pb.TIER_DRAM].evictions == 0 and tiers[pb.TIER_SSD].evictions == 0
    stats = m.client.call("Stats", pb.StatsRequest())
    assert stats.num_objects == 8 and stats.evictions == 0
    assert m.state.demotions == 2 and not m.state.moves        # the metrics' counters
    assert _beat(m, done=[moves[0].move_id]).moves == []       # a replayed ack: no effect
    assert _tiers(m)[pb.TIER_SSD].used_bytes == 2 * MiB


def test_a_leased_source_is_freed_only_when_its_reader_releases(embedded):
    m = embedded(lease_ttl_s=10.0)
    _fill(m)
    moves = _beat(m).moves
    lease_id = get(m.client, ["k0"]).lease_id                  # a reader of the DRAM copy
    _beat(m, done=[mv.move_id for mv in moves])
    assert _tiers(m)[pb.TIER_DRAM].used_bytes == 7 * MiB       # k0's source still held
    released = m.client.call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=[lease_id]))
    assert released.num_released == 1
    assert _tiers(m)[pb.TIER_DRAM].used_bytes == 6 * MiB


def test_a_failed_move_frees_its_destination_and_keeps_the_source(embedded):
    m = embedded()
    _fill(m)
    moves = _beat(m).moves
    _beat(m, failed=[mv.move_id for mv in moves])
    tiers = _tiers(m)
    assert tiers[pb.TIER_SSD].used_bytes == 0 and tiers[pb.TIER_DRAM].demotions == 0
    m.clock.advance(0.01)
    assert _where(m, "k0") == ("dram0", moves[0].src_offset)


def test_a_move_never_acknowledged_is_given_up_after_the_timeout(embedded):
    m = embedded(move_timeout_s=5.0)
    _fill(m)
    first = _beat(m).moves
    m.clock.advance(6.0)
    again = _beat(m).moves          # the timed-out moves were dropped and scheduled anew
    assert {mv.key for mv in again} == {"k0", "k1"}
    assert not {mv.move_id for mv in first} & {mv.move_id for mv in again}
    assert _tiers(m)[pb.TIER_SSD].used_bytes == 2 * MiB      # old destinations freed
    _beat(m, done=[mv.move_id for mv in first])               # too late: ignored
    m.clock.advance(0.01)
    assert _where(m, "k0")[0] == "dram0"


def test_an_object_removed_during_its_move_frees_the_copy(embedded):
    m = embedded()
    _fill(m)
    moves = _beat(m).moves
    removed = m.client.call("Remove", pb.RemoveRequest(keys=["k0"], force=True))
    assert removed.statuses == [pb.ITEM_OK]
    _beat(m, done=[mv.move_id for mv in moves])
    tiers = _tiers(m)
    assert tiers[pb.TIER_SSD].used_bytes == MiB                # only k1's copy is kept
    assert tiers[pb.TIER_DRAM].used_bytes == 6 * MiB


def test_a_read_from_ssd_promotes_back_to_dram_when_it_has_room(embedded):
    m = embedded(promote="on-hit")
    _fill(m)
    moves = _beat(m).moves
    _beat(m, done=[mv.move_id for mv in moves])
    lease_id = get(m.client, ["k0"]).lease_id                  # served from SSD
    promotion = _beat(m).moves
    assert [(mv.key, mv.src_segment_id, mv.dst_segment_id) for mv in promotion] == [
        ("k0", "ssd0", "dram0")]
    _beat(m, done=[promotion[0].move_id])
    m.client.call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=[lease_id]))
    m.clock.advance(0.01)
    assert _where(m, "k0") == ("dram0", promotion[0].dst_offset)
    tiers = _tiers(m)
    assert tiers[pb.TIER_DRAM].promotions == 1 and tiers[pb.TIER_SSD].hits >= 1
    # k1, and k0's inclusive copy: promotion keeps the SSD range (tiering.py)
    assert tiers[pb.TIER_SSD].used_bytes == 2 * MiB
    assert tiers[pb.TIER_SSD].num_objects == 1                 # the copy is no replica


def test_promotion_after_n_reads_and_off(embedded):
    m = embedded(promote="after:2")
    _fill(m)
    _beat(m, done=[mv.move_id for mv in _beat(m).moves])
    get(m.client, ["k0"], lease_ttl_ms=1)
    assert _beat(m).moves == []                                # one read of 2
    get(m.client, ["k0"], lease_ttl_ms=1)
    assert [mv.key for mv in _beat(m).moves] == ["k0"]
    off = embedded(promote="off")
    _fill(off)
    _beat(off, done=[mv.move_id for mv in _beat(off).moves])
    for _ in range(3):
        get(off.client, ["k0"], lease_ttl_ms=1)
    assert _beat(off).moves == []


def test_a_node_with_one_tier_still_evicts(embedded):
    m = embedded()
    register(m.client, "n1", segments=[("dram0", pb.TIER_DRAM, 4 * MiB)])
    for i in range(4):
        put(m.client, [f"d{i}"], [MiB])
    assert _beat(m).moves == []
    assert m.client.call("Stats", pb.StatsRequest()).evictions == 1
    assert _tiers(m)[pb.TIER_DRAM].evictions == 1


# -- leases that end with the read -------------------------------------------------------------

def test_each_reader_holds_its_lease_until_it_releases(embedded):
    m = embedded(lease_ttl_s=10.0)
    register(m.client, "n1")
    put(m.client, ["x"], [MiB])
    first, second = get(m.client, ["x"]).lease_id, get(m.client, ["x"]).lease_id
    assert first and second and first != second

    def remove(force=False):
        return m.client.call("Remove", pb.RemoveRequest(keys=["x"], force=force)).statuses[0]

    release = lambda ids: m.client.call(  # noqa: E731
        "ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=ids)).num_released
    assert release([first]) == 1
    assert remove() == pb.ITEM_LEASED                       # the second reader still holds it
    assert release([first]) == 0                            # a replay releases nothing
    assert release([second, 12345]) == 1                    # unknown ids are ignored
    assert remove() == pb.ITEM_OK


def test_a_force_removed_object_is_freed_when_its_last_reader_releases(embedded):
    m = embedded(lease_ttl_s=10.0)
    register(m.client, "n1")
    put(m.client, ["x"], [MiB])
    ids = [get(m.client, ["x"]).lease_id for _ in range(2)]
    used = lambda: m.client.call("Stats", pb.StatsRequest()).tiers[0].used_bytes  # noqa: E731
    assert m.client.call("Remove", pb.RemoveRequest(keys=["x"], force=True)).statuses == [0]
    m.client.call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=ids[:1]))
    assert used() == MiB                                     # one reader left
    m.client.call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=ids[1:]))
    assert used() == 0


def test_a_release_after_the_ttl_cannot_end_a_newer_readers_lease(embedded):
    m = embedded(lease_ttl_s=10.0)
    register(m.client, "n1")
    put(m.client, ["x"], [MiB])
    old = get(m.client, ["x"]).lease_id
    m.tick(11.0, "n1")                                       # the old lease expired
    get(m.client, ["x"])                                     # a new reader, no release yet
    m.client.call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=[old]))
    assert m.client.call("Remove", pb.RemoveRequest(keys=["x"])).statuses == [pb.ITEM_LEASED]


# -- registration of a restarted daemon, placement near a node --------------------------------

def test_a_new_incarnation_replaces_a_live_node_at_once(embedded):
    m = embedded()

    def register_as(incarnation):
        info = pb.NodeInfo(node_id="n1", host_id="h", data_addr="127.0.0.1:7000",
                           incarnation=incarnation,
                           segments=[pb.SegmentInfo(segment_id="dram0", tier=pb.TIER_DRAM,
                                                    capacity_bytes=4 * MiB)])
        return m.client.call("RegisterNode", pb.RegisterNodeRequest(node=info))

    register_as("first")
    put(m.client, ["old"], [MiB])
    with pytest.raises(Exception) as info:
        register_as("first")                                  # the same process again
    assert getattr(info.value, "code", None) == grpc.StatusCode.ALREADY_EXISTS
    register_as("second")                                     # restarted: replaces it
    stats = m.client.call("Stats", pb.StatsRequest())
    assert stats.num_nodes == 1 and stats.num_objects == 0    # no inventory brought back
    node = m.client.call("ListNodes", pb.ListNodesRequest()).nodes[0]
    assert node.incarnation == "second" and node.used_bytes == 0


def test_near_node_places_on_that_node_first(embedded):
    m = embedded()
    register(m.client, "n1")
    register(m.client, "n2")
    for i in range(6):
        reply = put(m.client, [f"p{i}"], [1000], near_node_id="n2")
        assert replicas_of(reply, 0)[0][0] == "n2"
    with pytest.raises(kvstore.InvalidArgumentError, match="near_node_id"):
        put(m.client, ["q"], [1000], near_node_id="x" * 300)
    assert m.client.call("Stats", pb.StatsRequest()).num_objects == 6


def test_a_put_with_no_room_anywhere_evicts_only_in_the_last_tier(embedded):
    # watermarks at 100%: no pressure pass runs, only the put's own search for room
    m = embedded(promote="off", high_watermark=1.0, low_watermark=1.0)
    register(m.client, "n1", segments=[("dram0", pb.TIER_DRAM, 8 * MiB),
                                       ("ssd0", pb.TIER_SSD, 8 * MiB)])
    for key in KEYS:                                   # DRAM full
        put(m.client, [key], [MiB])
    spilled = [f"s{i}" for i in range(8)]              # they land in SSD at once
    for key in spilled:
        reply = put(m.client, [key], [MiB])
        assert replicas_of(reply, 0)[0][1] == "ssd0"
    get(m.client, KEYS[:1] + spilled[:1], lease_ttl_ms=1)   # k0 and s0 used again
    m.clock.advance(0.01)
    reply = put(m.client, ["last"], [MiB])             # no room in any tier
    assert reply.statuses == [pb.ITEM_OK] and replicas_of(reply, 0)[0][1] == "ssd0"
    tiers = _tiers(m)
    assert tiers[pb.TIER_SSD].evictions == 1 and tiers[pb.TIER_DRAM].evictions == 0
    found = m.client.call("Exists", pb.ExistsRequest(keys=KEYS + spilled)).exists
    # k1, the coldest object, is in DRAM: kept; s1, the coldest in SSD, was evicted
    assert list(found) == [True] * 8 + [True, False] + [True] * 6


def _promote_k0(m) -> tuple[int, int]:
    """_fill, demote k0 and k1, read k0 so it is promoted; (k0's SSD offset, DRAM offset)."""
    _fill(m)
    moves = _beat(m).moves
    _beat(m, done=[mv.move_id for mv in moves])
    get(m.client, ["k0"], lease_ttl_ms=1)
    promotion = _beat(m).moves
    assert [mv.key for mv in promotion] == ["k0"]
    _beat(m, done=[promotion[0].move_id])
    m.clock.advance(0.01)
    return moves[0].dst_offset, promotion[0].dst_offset


def test_a_promoted_object_demotes_back_to_its_ssd_copy_without_a_copy(embedded):
    m = embedded(promote="on-hit")
    ssd_offset, dram_offset = _promote_k0(m)
    assert _where(m, "k0") == ("dram0", dram_offset)
    get(m.client, KEYS[2:], lease_ttl_ms=1)                    # k0 the coldest in DRAM
    m.clock.advance(0.01)
    assert _tiers(m)[pb.TIER_DRAM].used_bytes == 7 * MiB
    put(m.client, ["n0"], [MiB])                               # DRAM at 100% again
    # k0 switched back at once (no move sent for it), the next coldest is copied
    reply = _beat(m)
    assert [mv.key for mv in reply.moves] == ["k2"]
    added = dict(zip(reply.added.keys, zip(reply.added.segment_ids, reply.added.offsets)))
    assert added["k0"] == ("ssd0", ssd_offset)                 # the daemon's table told
    tiers = _tiers(m)
    assert tiers[pb.TIER_DRAM].demotions == 3 and tiers[pb.TIER_DRAM].promotions == 1
    # SSD: k1, k0 (its copy again its replica), k2's destination; DRAM: k0's range freed
    assert tiers[pb.TIER_SSD].used_bytes == 3 * MiB
    assert tiers[pb.TIER_DRAM].used_bytes == 7 * MiB
    assert not m.state.shadows and m.state.objects["k0"].shadow is None
    assert _where(m, "k0") == ("ssd0", ssd_offset)             # readers are sent there


def test_ssd_copies_are_reclaimed_before_anything_is_evicted(embedded):
    m = embedded(promote="on-hit")
    register(m.client, "n1", segments=[("dram0", pb.TIER_DRAM, 8 * MiB),
                                       ("ssd0", pb.TIER_SSD, 4 * MiB)])
    for key in KEYS:
        put(m.client, [key], [MiB])
    _beat(m, done=[mv.move_id for mv in _beat(m).moves])      # k0, k1 on SSD
    get(m.client, ["k0"], lease_ttl_ms=1)
    _beat(m, done=[mv.move_id for mv in _beat(m).moves])      # k0 promoted, copy kept
    m.clock.advance(0.01)
    assert _tiers(m)[pb.TIER_SSD].used_bytes == 2 * MiB
    for key in ("s0", "s1"):                                   # SSD at 100% > 95%
        reply = put(m.client, [key], [MiB], preferred_tier=pb.TIER_SSD)
        assert replicas_of(reply, 0)[0][1] == "ssd0"
    tiers = _tiers(m)
    assert tiers[pb.TIER_SSD].used_bytes == 3 * MiB            # the copy went, nothing else
    assert tiers[pb.TIER_SSD].evictions == 0 and tiers[pb.TIER_DRAM].evictions == 0
    assert m.client.call("Stats", pb.StatsRequest()).evictions == 0
    assert exists(m.client, KEYS + ["s0", "s1"]) == [True] * 10
    assert _where(m, "k0")[0] == "dram0" and not m.state.shadows


def test_a_removed_object_frees_its_ssd_copy_and_its_key_can_be_put_again(embedded):
    m = embedded(promote="on-hit")
    _promote_k0(m)
    assert _tiers(m)[pb.TIER_SSD].used_bytes == 2 * MiB
    reply = put(m.client, ["k0"], [MiB])                       # objects are immutable
    assert reply.statuses == [pb.ITEM_ALREADY_EXISTS]
    m.client.call("Remove", pb.RemoveRequest(keys=["k0"]))
    m.clock.advance(0.01)
    assert _tiers(m)[pb.TIER_SSD].used_bytes == MiB and not m.state.shadows
    assert put(m.client, ["k0"], [MiB]).statuses == [pb.ITEM_OK]
    assert m.state.objects["k0"].shadow is None


def test_a_dropped_node_takes_its_ssd_copies_with_it(embedded):
    m = embedded(promote="on-hit")
    _promote_k0(m)
    assert m.state.shadows
    m.client.call("UnregisterNode", pb.UnregisterNodeRequest(node_id="n1"))
    assert not m.state.shadows
