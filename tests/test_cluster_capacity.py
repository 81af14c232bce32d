"""A small pool fills up: puts beyond it evict least-recently-used objects, leased objects
survive, and when everything is leased a put fails with CapacityError, losing nothing."""

from __future__ import annotations

import pytest

import kvstore.rpc
from client_cluster import Cluster, payload
from kvstore import CapacityError

MiB = 1 << 20


@pytest.fixture
def small_cluster():
    cluster = Cluster(num_daemons=1, dram="8MiB")
    yield cluster
    cluster.close()


def _hold_leases(cluster, keys) -> None:
    """A reader that took the replicas of ``keys`` and has not finished (a get releases its
    lease when its reads are done)."""
    reader = kvstore.rpc.grpc_client(cluster.address)
    assert all(isinstance(r, kvstore.rpc.ReplicaSet)
               for r in reader.get_replicas(keys, lease_ttl_s=300))
    reader.close()


def test_puts_beyond_capacity_evict_lru_and_spare_leased(small_cluster):
    store = small_cluster.connect()
    store.put("cap/leased", payload(MiB, seed=1))
    _hold_leases(small_cluster, ["cap/leased"])
    old = [f"cap/old/{i}" for i in range(4)]
    for i, key in enumerate(old):
        store.put(key, payload(MiB, seed=10 + i))
    # touch old/0 (a negligible lease): it becomes the most recently used of the old ones
    assert store.get(old[0], lease_ttl_s=0.001) == payload(MiB, seed=10)

    evicted_at: dict[str, int] = {}  # key -> index of the put that evicted it
    for i in range(16):
        store.put(f"cap/new/{i}", payload(MiB, seed=100 + i))  # never fails: eviction
        evicted_at.update({key: i for key in old
                           if key not in evicted_at and not store.exists(key)})
    assert set(evicted_at) == set(old)
    # least recently used first: old/1 before old/2 before old/3; the touched old/0 last
    assert evicted_at[old[1]] <= evicted_at[old[2]] <= evicted_at[old[3]], evicted_at
    assert evicted_at[old[0]] >= evicted_at[old[3]] > evicted_at[old[1]], evicted_at
    assert store.get("cap/leased") == payload(MiB, seed=1)  # oldest, but leased
    assert store.get("cap/new/15") == payload(MiB, seed=115)
    assert store.stats()["master"]["evictions"] >= 4
    store.close()


def test_put_fails_cleanly_when_everything_is_leased(small_cluster):
    store = small_cluster.connect()
    keys = [f"full/{i}" for i in range(7)]
    assert store.batch_put(keys, [payload(MiB, seed=i) for i in range(7)]) == [None] * 7
    _hold_leases(small_cluster, keys)
    with pytest.raises(CapacityError) as info:
        store.put("full/one-too-many", payload(2 * MiB, seed=99))
    assert info.value.keys == ["full/one-too-many"]
    assert not store.exists("full/one-too-many")
    assert store.batch_get(keys) == [payload(MiB, seed=i) for i in range(7)]
    store.close()
