"""Home placement (master/placement.py place_at_home, master/state.py _place) and
GetHomeNodes (master/home_nodes.py) against a real embedded master spoken to over gRPC: a
put free to choose puts its first replica on its key's home node (kvstore/home.py), falls
back to the old placement when the home has no room or a hint ranks other nodes first, and
GetHomeNodes lists exactly the nodes the master hashes over."""

from __future__ import annotations

from kvstore.home import home_of, node_seeds
from kvstore.v1 import master_pb2 as pb
from master_helpers import MiB, embedded, put, register, replicas_of  # noqa: F401

NODES = ("n1", "n2", "n3")


def _home(key: str, nodes=NODES) -> str:
    return home_of(key, node_seeds(list(nodes)))


def test_a_free_put_lands_on_its_home_and_a_second_replica_elsewhere(embedded):
    m = embedded()
    for node in NODES:
        register(m.client, node, host_id="h")
    keys = [f"k{i}" for i in range(30)]
    reply = put(m.client, keys)
    placed = [replicas_of(reply, i)[0][0] for i in range(len(keys))]
    assert placed == [_home(key) for key in keys]
    assert len(set(placed)) == 3                 # the hash spreads keys over every node
    two = put(m.client, ["r2"], replicas=2)
    nodes = [node for node, _, _ in replicas_of(two, 0)]
    assert nodes[0] == _home("r2") and nodes[1] != nodes[0]


def test_a_full_home_and_hints_fall_back_to_the_old_placement(embedded):
    m = embedded()
    for node in NODES:
        register(m.client, node, host_id=f"h-{node}",
                 segments=[("dram", pb.TIER_DRAM, MiB)])
    key = "fills"
    home = _home(key)
    assert replicas_of(put(m.client, [key], [MiB]), 0)[0][0] == home    # home now full
    other = next(k for k in (f"o{i}" for i in range(100)) if _home(k) == home)
    landed = replicas_of(put(m.client, [other], [4096]), 0)[0][0]
    assert landed != home                        # no room at home: placed as before
    near = next(n for n in NODES if n not in (_home("hinted"), home))
    hinted = put(m.client, ["hinted"], near_host_id=f"h-{near}")
    assert replicas_of(hinted, 0)[0][0] == near  # the near-host hint keeps its meaning
    named = next(n for n in NODES if n not in (_home("named"), home))   # home is full
    assert replicas_of(put(m.client, ["named"], near_node_id=named), 0)[0][0] == named


def test_get_home_nodes_lists_the_nodes_hashed_over_and_their_membership(embedded):
    m = embedded()
    register(m.client, "n1", host_id="h")
    first = m.client.call("GetHomeNodes", pb.GetHomeNodesRequest())
    assert [n.node_id for n in first.nodes] == ["n1"] and first.key_prefix == ""
    assert first.nodes[0].keyed_read_capability == b""   # this node checks no reads
    assert first.expiry_ms > 0
    register(m.client, "n2", host_id="h")
    second = m.client.call("GetHomeNodes", pb.GetHomeNodesRequest())
    assert sorted(n.node_id for n in second.nodes) == ["n1", "n2"]
    assert second.membership != first.membership
    again = m.client.call("GetHomeNodes", pb.GetHomeNodesRequest())
    assert again.membership == second.membership
