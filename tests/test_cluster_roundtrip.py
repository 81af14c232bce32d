"""Real cluster on loopback: one master, two daemons, two client processes. What one client
puts, the other gets byte-for-byte, over shared memory and over TCP."""

from __future__ import annotations

import pytest
import xxhash

from client_cluster import Cluster, Peer, payload
from kvstore import ChecksumError
from kvstore.rpc import grpc_client
from kvstore.transport.shm import ShmTransport

SIZES = [0, 1, 4095, 64 * 1024, (1 << 20) + 1, 64 << 20]


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=2, dram="192MiB")
    yield cluster
    cluster.close()


@pytest.fixture(scope="module", params=[("shm", "fast"), ("tcp", "grpc")],
                ids=["shm-fast", "tcp-grpc"])
def clients(request, cluster):
    """(this process's store, a peer process), both forced onto one transport; this
    process's master calls forced onto one metadata path (each path, each transport once)."""
    transport, metadata = request.param
    store = cluster.connect(transport=transport, metadata=metadata)
    assert store.stats()["metadata"] == metadata
    peer = Peer(cluster.address, transport)
    yield transport, store, peer
    peer.close()
    store.close()


@pytest.mark.parametrize("size", SIZES)
def test_put_here_get_there_and_back(clients, size):
    transport, store, peer = clients
    key_out, key_back = f"{transport}/out/{size}", f"{transport}/back/{size}"
    data = payload(size, seed=size)
    store.put(key_out, data)
    answer = peer.ask(op="get", key=key_out)
    assert answer == {"ok": True, "size": size, "xxh3": xxhash.xxh3_64_intdigest(data)}

    assert peer.ask(op="put", key=key_back, size=size, seed=size + 1) == {"ok": True}
    expected = payload(size, seed=size + 1)
    assert store.get(key_back) == expected
    out = bytearray(size + 7)
    assert store.get_into(key_back, out) == size
    assert out[:size] == expected and out[size:] == bytes(7)
    # two keys of this size, so they might be evicted only by much bigger puts: remove them
    assert store.remove(key_out, force=True) and store.remove(key_back, force=True)


def test_transfers_went_through_the_forced_transport(clients):
    transport, store, peer = clients
    store.put(f"{transport}/counted", payload(4096, seed=3))
    assert store.get(f"{transport}/counted") == payload(4096, seed=3)
    transfers = store.stats()["transfers"]
    assert list(transfers) == [transport]
    assert transfers[transport]["num_writes"] >= 1 and transfers[transport]["num_reads"] >= 1
    assert transfers[transport]["write_bytes"] >= 4096
    peer_transfers = peer.ask(op="get", key=f"{transport}/counted")
    assert peer_transfers["ok"]
    assert list(peer.ask(op="stats")["transfers"]) == [transport]


def test_auto_uses_shared_memory_on_this_host(cluster):
    with cluster.connect() as store:
        store.put("auto/key", payload(100_000, seed=9))
        assert store.get("auto/key") == payload(100_000, seed=9)
        transfers = store.stats()["transfers"]
        assert transfers["shm"]["num_reads"] == 1 and transfers["shm"]["num_writes"] == 1
        assert transfers["tcp"]["num_reads"] == 0 and transfers["tcp"]["num_writes"] == 0


def test_replicas_land_on_both_daemons_and_each_serves_reads(cluster):
    with cluster.connect(transport="tcp") as store:
        data = payload(300_000, seed=11)
        store.put("replicated/key", data, replicas=2)
        master = store.stats()["master"]
        assert master["num_nodes"] == 2
        assert store.get("replicated/key") == data
        store.put("replicated/key", b"other bytes", replicas=2)  # content-addressed: no-op
        assert store.get("replicated/key") == data


def _replica_targets(cluster, key):
    with grpc_client(cluster.address) as master:
        return master.get_replicas([key])[0].targets


def _flip_first_byte(target):
    with ShmTransport() as shm:
        data = bytearray(target.length)
        shm.read_into(target, memoryview(data), timeout_s=5)
        data[0] ^= 0xFF
        shm.write(target, memoryview(data), timeout_s=5)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_corrupt_replica_is_skipped_for_the_next_one(cluster, transport):
    key, data = f"corrupt/{transport}", payload(200_000, seed=21)
    with cluster.connect(transport=transport, verify=True) as store:
        store.put(key, data, replicas=2)
        targets = _replica_targets(cluster, key)
        assert len({t.node_id for t in targets}) == 2
        _flip_first_byte(targets[0])
        for _ in range(3):  # whichever replica is tried first, the right bytes come back
            assert store.get(key) == data
        _flip_first_byte(targets[1])
        with pytest.raises(ChecksumError) as info:
            store.get(key)
        assert info.value.keys == [key]
        assert store.stats()["transfers"][transport]["num_errors"] >= 2
