"""A tenant's usage follows its objects through every way they come and go (put, remove,
revoke, pending reclaim, a tier move, a dropped node, adoption), and its quota steers
placement: a master in this process on a ManualClock, spoken to over gRPC by a cluster
client (playing the daemons) and a tenant's client."""

from __future__ import annotations

import pytest

import kvstore
from kvstore.master.clock import ManualClock
from kvstore.master.config import MasterConfig
from kvstore.master.server import run_in_thread
from kvstore.master.tenants import Tenant
from kvstore.tiers import Tier
from kvstore.v1 import master_pb2 as pb
from kvstore.rpc.errors import item_error
from master_helpers import put, register, replicas_of
from raw_master import RawMaster

BLOCK = 64 * 1024


@pytest.fixture
def master():
    tenants = (Tenant("alpha", "alpha-token", "alpha", {Tier.DRAM: 4 * BLOCK}),
               Tenant("beta", "beta-token", "beta", {}))
    clock = ManualClock()
    running = run_in_thread(MasterConfig(port=0, token="cluster", tenants=tenants,
                                         pending_timeout_s=30.0), clock=clock)
    admin = RawMaster.over_grpc(running.address, token="cluster")
    alpha = RawMaster.over_grpc(running.address, token="alpha-token")
    beta = RawMaster.over_grpc(running.address, token="beta-token")
    yield running, clock, admin, alpha, beta
    for client in (admin, alpha, beta):
        client.close()
    running.stop()


def _usage(running, name: str):
    usage = running.state.tenants.usages[name]
    return usage.num_objects, {t: n for t, n in usage.tier_to_used_bytes.items() if n}


def test_usage_follows_put_remove_revoke_and_reclaim(master):
    running, clock, admin, alpha, _ = master
    register(admin, "n1", segments=[("d", pb.TIER_DRAM, 64 * BLOCK)])
    put(alpha, ["a", "b"], [BLOCK, BLOCK])
    assert _usage(running, "alpha") == (2, {Tier.DRAM: 2 * BLOCK})
    alpha.call("Remove", pb.RemoveRequest(keys=["a"]))
    assert _usage(running, "alpha") == (1, {Tier.DRAM: BLOCK})
    put(alpha, ["c"], [BLOCK], end=False)
    alpha.call("PutRevoke", pb.PutRevokeRequest(keys=["c"], client_id="w1"))
    assert _usage(running, "alpha") == (1, {Tier.DRAM: BLOCK})
    put(alpha, ["d"], [BLOCK], end=False)                       # never ended: reclaimed
    assert _usage(running, "alpha") == (2, {Tier.DRAM: 2 * BLOCK})
    for _ in range(4):                     # past the pending timeout, the node kept alive
        clock.advance(8.0)
        admin.call("Heartbeat", pb.HeartbeatRequest(node_id="n1"))  # runs the due sweep
    assert _usage(running, "alpha") == (1, {Tier.DRAM: BLOCK})
    # keys the cluster principal writes under a namespace count for that tenant
    put(admin, ["alpha/by-admin", "nobody/x"], [BLOCK, BLOCK])
    assert _usage(running, "alpha") == (2, {Tier.DRAM: 2 * BLOCK})
    assert _usage(running, "beta") == (0, {})


def test_a_full_quota_places_in_the_next_tier_then_refuses(master):
    running, _, admin, alpha, beta = master
    register(admin, "n1", segments=[("d", pb.TIER_DRAM, 64 * BLOCK),
                                    ("s", pb.TIER_SSD, 2 * BLOCK)])
    reply = put(alpha, [f"k{i}" for i in range(4)], [BLOCK] * 4)
    assert list(reply.statuses) == [pb.ITEM_OK] * 4
    reply = put(alpha, ["k4", "k5", "k6"], [BLOCK] * 3)
    assert list(reply.statuses) == [pb.ITEM_OK, pb.ITEM_OK, pb.ITEM_NO_SPACE]
    assert [replicas_of(reply, i)[0][1] for i in range(2)] == ["s", "s"]   # DRAM quota full
    assert "tenant 'alpha' over its quota" in reply.error_messages[2]
    assert f"dram {4 * BLOCK} of {4 * BLOCK} bytes" in reply.error_messages[2]
    assert _usage(running, "alpha") == (6, {Tier.DRAM: 4 * BLOCK, Tier.SSD: 2 * BLOCK})
    # beta has no quota and fills DRAM past alpha's share; alpha's objects are untouched
    assert list(put(beta, [f"b{i}" for i in range(20)], [BLOCK] * 20).statuses) == \
        [pb.ITEM_OK] * 20
    assert all(admin.call("Exists", pb.ExistsRequest(
        keys=[f"alpha/k{i}" for i in range(6)])).exists)
    assert running.state.tenants.usages["alpha"].num_refused == 1


def test_a_dropped_node_releases_usage_and_adoption_counts_it_again(master):
    running, _, admin, alpha, _ = master
    register(admin, "n1", segments=[("d", pb.TIER_DRAM, 64 * BLOCK)])
    register(admin, "n2", segments=[("d", pb.TIER_DRAM, 64 * BLOCK)])
    put(alpha, ["two"], [BLOCK], replicas=2)
    put(alpha, ["one"], [1000])
    assert _usage(running, "alpha") == (2, {Tier.DRAM: 2 * BLOCK + 1000})
    holder = replicas_of(alpha.call("GetReplicas", pb.GetReplicasRequest(keys=["one"])), 0)
    other = "n2" if holder[0][0] == "n1" else "n1"
    admin.call("UnregisterNode", pb.UnregisterNodeRequest(node_id=holder[0][0]))
    assert _usage(running, "alpha") == (1, {Tier.DRAM: BLOCK})
    admin.call("UnregisterNode", pb.UnregisterNodeRequest(node_id=other))
    assert _usage(running, "alpha") == (0, {})
    inventory = pb.Inventory(keys=["alpha/back", "beta/also"], segment_ids=["d", "d"],
                             offsets=[0, BLOCK], lengths=[4096, 4096])
    register(admin, "n3", segments=[("d", pb.TIER_DRAM, 64 * BLOCK)], inventory=inventory)
    assert _usage(running, "alpha") == (1, {Tier.DRAM: 4096})
    assert _usage(running, "beta") == (1, {Tier.DRAM: 4096})
    got = alpha.call("GetReplicas", pb.GetReplicasRequest(keys=["back"]))
    assert list(got.statuses) == [pb.ITEM_OK]


def test_a_tier_move_moves_usage(master):
    running, clock, admin, alpha, _ = master
    register(admin, "n1", segments=[("d", pb.TIER_DRAM, 8 * BLOCK),
                                    ("s", pb.TIER_SSD, 64 * BLOCK)])
    put(alpha, ["m0", "m1", "m2", "m3"], [BLOCK] * 4)
    assert _usage(running, "alpha") == (4, {Tier.DRAM: 4 * BLOCK})
    # the cluster fills DRAM past its high watermark: the pass demotes LRU objects (alpha's)
    put(admin, [f"fill{i}" for i in range(4)], [BLOCK] * 4, preferred_tier=pb.TIER_DRAM)
    beat = admin.call("Heartbeat", pb.HeartbeatRequest(node_id="n1"))
    moves = list(beat.moves)
    assert moves, "DRAM above its high watermark must order demotions"
    admin.call("Heartbeat", pb.HeartbeatRequest(node_id="n1",
                                                moves_done=[m.move_id for m in moves]))
    num_alpha_moved = sum(1 for m in moves if m.key.startswith("alpha/"))
    assert num_alpha_moved >= 1
    assert _usage(running, "alpha") == (4, {Tier.DRAM: (4 - num_alpha_moved) * BLOCK,
                                            Tier.SSD: num_alpha_moved * BLOCK})


def test_over_quota_is_a_capacity_error_in_the_client(master):
    _, _, admin, alpha, _ = master
    register(admin, "n1", segments=[("d", pb.TIER_DRAM, 64 * BLOCK)])
    reply = put(alpha, ["big"], [5 * BLOCK])
    assert list(reply.statuses) == [pb.ITEM_NO_SPACE]
    error = item_error(reply.statuses[0], "big", "put", reply.error_messages[0])
    assert isinstance(error, kvstore.CapacityError)
    assert "tenant 'alpha' over its quota" in str(error)
