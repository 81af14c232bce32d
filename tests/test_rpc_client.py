"""The typed metadata API (kvstore.rpc.MasterClient) against a real ``kvstore master``
process, over both carriers: every verb gives the same results on gRPC and on the fast path,
one result per key, errors naming their keys."""

from __future__ import annotations

import pytest

from kvstore import (AuthenticationError, CapacityError, InvalidArgumentError,
                     KeyNotFoundError, KVStoreError)
from kvstore.rpc import Inventory, NodeSpec, SegmentSpec, connect_master
from kvstore.tiers import Tier
from servers import ServerProcess

TOKEN = "t0k3n"
SEGMENT = SegmentSpec("dram0", Tier.DRAM, 1 << 20, shm_name="/kv-n1-dram0")
NODE = NodeSpec("n1", "host-a", "127.0.0.1:7000", [SEGMENT])


@pytest.fixture(scope="module")
def master():
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                        "--token", TOKEN]) as server:
        client, _ = connect_master(server.address, token=TOKEN, metadata="grpc")
        with client:
            client.register_node(NODE, Inventory())
        yield server


@pytest.fixture(params=["grpc", "fast"])
def client(request, master):
    client, stats = connect_master(master.address, token=TOKEN, metadata=request.param)
    assert client.path == request.param and stats.num_nodes == 1
    yield client
    client.close()


def test_put_get_and_metadata_verbs_give_one_result_per_key(client):
    p = f"{client.path}/"
    keys, sizes = [p + "a", p + "b", ""], [100, 200, 10]
    slots = client.put_start(keys, sizes, client_id="w")
    assert [t.length for t in slots[0]] == [100] and [t.length for t in slots[1]] == [200]
    assert slots[0][0].node_id == "n1" and slots[0][0].shm_name == SEGMENT.shm_name
    assert isinstance(slots[2], InvalidArgumentError) and slots[2].keys == [""]
    assert client.put_start([p + "a"], [100], client_id="w") == [None]   # exists (pending)
    assert client.get_replicas([p + "a"])[0].keys == [p + "a"]           # pending: not found
    assert client.put_end([p + "a", p + "b"], [11, 22], client_id="w") == [None, None]
    found = client.get_replicas([p + "a", p + "missing"], client_host_id="host-a")
    assert (found[0].size_bytes, found[0].checksum, found[0].targets) == (100, 11, slots[0])
    assert isinstance(found[1], KeyNotFoundError) and found[1].keys == [p + "missing"]
    assert client.exists([p + "a", p + "missing"]) == [True, False]
    assert client.match_prefix([p + "a", p + "b", p + "missing", p + "a"]) == 2
    assert client.renew_leases([p + "a", p + "missing"], 5.0)[0] is None
    assert client.pin([p + "a"], hard=True) == [None]
    pinned, absent = client.remove([p + "a", p + "missing"])
    assert isinstance(pinned, KVStoreError) and "hard-pinned" in str(pinned) and absent is False
    assert client.unpin([p + "a"]) == [None]
    assert client.remove([p + "a"], force=True) == [True]
    assert client.remove_prefix(p, force=True) == (1, 0)
    big = client.put_start([p + "huge"], [1 << 30], client_id="w")[0]
    assert isinstance(big, CapacityError) and big.keys == [p + "huge"]


def test_revoke_membership_and_observability(client):
    p = f"{client.path}-m/"
    assert isinstance(client.put_start([p + "r"], [64], client_id="w")[0], list)
    assert isinstance(client.put_revoke([p + "r"], client_id="other")[0], KeyNotFoundError)
    assert client.put_revoke([p + "r"], client_id="w") == [None]
    node = NodeSpec(f"{client.path}-n2", "host-b", "127.0.0.1:7001",
                    [SegmentSpec("s", Tier.SSD, 1 << 20, path="/data/s.seg")])
    inventory = Inventory([p + "adopted"], ["s"], [0], [128], [7], [0])
    registration = client.register_node(node, inventory)
    assert registration.num_objects_adopted == 1 and registration.heartbeat_interval_s > 0
    changes = client.heartbeat(node.node_id, 0)
    assert changes.full_resync and changes.added.keys == [p + "adopted"]
    assert client.get_replicas([p + "adopted"])[0].targets[0].segment_id == "s"
    listed = {n.node_id: n for n in client.list_nodes()}
    assert listed[node.node_id].segments[0].tier is Tier.SSD
    assert {t.tier for t in client.stats().tiers} >= {Tier.DRAM, Tier.SSD}
    assert client.unregister_node(node.node_id) == 1
    assert client.heartbeat(node.node_id, 0) is None                  # forgotten: re-register
    with pytest.raises(KeyNotFoundError, match="unknown node"):
        client.unregister_node(node.node_id)


@pytest.mark.parametrize("metadata", ["grpc", "fast"])
def test_a_wrong_token_is_refused_on_either_path(master, metadata):
    with pytest.raises(AuthenticationError):
        connect_master(master.address, token="wrong", metadata=metadata)


def test_a_call_cancelled_by_a_stopping_master_is_a_lost_connection():
    # a master that stops mid-call (a leader stepping down) cancels it: the call may or may
    # not have run, which the call policy handles like a broken connection (idempotent calls
    # are retried, on the new leader once there is one)
    import grpc

    from kvstore import MasterUnavailableError
    from kvstore.rpc.errors import ConnectionLostError, status_error

    error = status_error(grpc.StatusCode.CANCELLED, "CANCELLED", "PutStart")
    assert isinstance(error, ConnectionLostError) and isinstance(error, MasterUnavailableError)
    assert error.code == grpc.StatusCode.CANCELLED and "PutStart" in str(error)
    assert type(status_error(grpc.StatusCode.INTERNAL, "boom", "Exists")) is KVStoreError
