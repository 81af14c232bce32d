"""kvstore.client.reserve.reserve_puts: a put whose bytes the caller writes straight
into the reserved ranges, against a real master and two daemon processes."""

from __future__ import annotations

import uuid

import pytest

import kvstore
from kvstore import ChecksumError, InvalidArgumentError
from kvstore.client.checksum import checksum
from kvstore.client.reserve import prefault, reserve_puts
from client_cluster import Cluster, payload


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=2, dram="64MiB")
    yield cluster
    cluster.close()


def fresh(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"reserve/{tag}/{i}" for i in range(n)]


def reserved(store) -> tuple[int, int]:
    """(PENDING objects, bytes used) of the cluster."""
    master = store.stats()["master"]
    return master["num_pending"], sum(tier["used_bytes"] for tier in master["tiers"])


def shm_writes(store) -> int:
    return store.stats()["transfers"].get("shm", {}).get("num_writes", 0)


def test_views_are_the_stored_bytes_and_commit_makes_them_visible(cluster):
    with cluster.connect(transport="shm") as store:
        keys, values = fresh(3), [payload(n, seed) for seed, n in enumerate((1, 4096, 70000))]
        writes_before = shm_writes(store)
        with reserve_puts(store, keys, [len(v) for v in values]) as reservation:
            assert [len(view) for view in reservation.views] == [len(v) for v in values]
            for view, value in zip(reservation.views, values):
                view[:] = value
            assert store.batch_exists(keys) == [False] * 3   # PENDING: nobody sees it yet
            assert reserved(store)[0] == 3
            assert reservation.commit() == [None] * 3
        assert [store.get(k) for k in keys] == values
        # NOTE: the bytes were written in place: no transport write copied them again
        assert shm_writes(store) == writes_before
        store.put(fresh(1)[0], b"x")    # while a put's copy counts
        assert shm_writes(store) == writes_before + 1


def test_a_stored_key_gets_no_view_and_succeeds(cluster):
    with cluster.connect(transport="shm") as store:
        keys = fresh(2)
        store.put(keys[0], b"first")
        with reserve_puts(store, keys, [5, 6]) as reservation:
            assert reservation.views[0] is None
            reservation.views[1][:] = b"second"
            assert reservation.commit() == [None, None]
        assert store.batch_get(keys) == [b"first", b"second"]


def test_commit_records_the_checksums_given(cluster):
    """A fused gather's digests: recorded as given (a read verifies against them); None
    entries are hashed by the commit; a wrong one fails every read, returns nothing wrong."""
    with cluster.connect(transport="shm") as store:
        keys, values = fresh(3), [payload(n, seed) for seed, n in enumerate((300, 70000, 9))]
        with reserve_puts(store, keys, [len(v) for v in values]) as reservation:
            for view, value in zip(reservation.views, values):
                view[:] = value
            sums = [checksum(values[0]), None, checksum(b"not the bytes")]
            assert reservation.commit(sums) == [None] * 3
        assert store.batch_get(keys[:2]) == values[:2]
        with pytest.raises(ChecksumError):
            store.get(keys[2])


@pytest.mark.parametrize("checksums,message", [
    ([1, 2], "3 keys but checksums"), ([1, 2, -1], "2\\*\\*64"), ([1, 2, 1 << 64], "2\\*\\*64"),
    ([1, 2, "x"], "2\\*\\*64"), ([1, 2, True], "2\\*\\*64")])
def test_bad_checksums_raise_and_leave_the_reservation_open(cluster, checksums, message):
    with cluster.connect(transport="shm") as store:
        keys = fresh(3)
        with reserve_puts(store, keys, [4, 4, 4]) as reservation:
            for view in reservation.views:
                view[:] = b"abcd"
            with pytest.raises(InvalidArgumentError, match=message):
                reservation.commit(checksums)
            assert store.batch_exists(keys) == [False] * 3
            assert reservation.commit() == [None] * 3   # still open: commits as usual
        assert store.batch_get(keys) == [b"abcd"] * 3


def test_leaving_without_commit_gives_the_space_back(cluster):
    with cluster.connect(transport="shm") as store:
        keys = fresh(2)
        used_before = reserved(store)
        with pytest.raises(RuntimeError, match="engine failed"):
            with reserve_puts(store, keys, [1 << 20, 1 << 20]) as reservation:
                reservation.views[0][:4] = b"half"
                raise RuntimeError("engine failed")
        assert store.batch_exists(keys) == [False, False]
        assert reserved(store) == used_before
        store.batch_put(keys, [b"a", b"b"])           # the keys are free for a real put
        assert store.batch_get(keys) == [b"a", b"b"]


def test_views_die_with_the_reservation(cluster):
    with cluster.connect(transport="shm") as store:
        reservation = reserve_puts(store, fresh(1), [8])
        view = reservation.views[0]
        view[:] = b"12345678"
        reservation.commit()
        with pytest.raises(ValueError):
            view[0] = 0   # released: never a write into space the master may reuse
        assert reservation.views == [None]
        with pytest.raises(InvalidArgumentError, match="committed or aborted"):
            reservation.commit()
        reservation.abort()   # idempotent, and commits stay committed


def test_tcp_and_replicas_write_out_at_commit(cluster):
    with cluster.connect(transport="tcp") as store:
        keys, values = fresh(2), [payload(5000, 7), payload(300, 8)]
        with reserve_puts(store, keys, [5000, 300], replicas=2) as reservation:
            for view, value in zip(reservation.views, values):
                view[:] = value
            assert reservation.commit() == [None, None]
        assert store.batch_get(keys) == values
    with cluster.connect(transport="shm") as store:
        keys, values = fresh(1), [payload(9000, 9)]
        with reserve_puts(store, keys, [9000], replicas=2) as reservation:
            reservation.views[0][:] = values[0]
            assert reservation.commit() == [None]
        assert store.get(keys[0]) == values[0]
        cluster_replicas = store._master.get_replicas(keys)  # both replicas hold it
        assert len(cluster_replicas[0].targets) == 2


@pytest.mark.parametrize("keys,sizes,message", [
    (["a", "b"], [1], "2 keys but sizes"),
    (["a"], [0], "ints >= 1"),
    (["a"], [True], "ints >= 1"),
    (["a", "a"], [1, 1], "distinct"),
    ("ab", [1, 1], "list or tuple"),
    ([""], [1], "key"),
])
def test_bad_reservations_raise_and_reserve_nothing(cluster, keys, sizes, message):
    with cluster.connect() as store:
        used_before = reserved(store)
        with pytest.raises(InvalidArgumentError, match=message):
            reserve_puts(store, keys, sizes)
        assert reserved(store) == used_before


def test_a_closed_store_refuses(cluster):
    store = cluster.connect()
    store.close()
    with pytest.raises(kvstore.ClosedError):
        reserve_puts(store, fresh(1), [1])


def rss_shmem_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    pytest.skip("this kernel reports no RssShmem")


def test_prefault_maps_every_page_of_the_mapped_segments_once():
    with kvstore.local(dram="32MiB") as store:
        assert prefault(store) == 0                    # nothing mapped yet: nothing to do
        store.put("prefault/probe", b"x")              # maps the segment, one chunk
        before = rss_shmem_bytes()
        covered = prefault(store)
        assert covered >= 32 << 20
        assert rss_shmem_bytes() - before >= 28 << 20  # the rest of the segment, resident
        with reserve_puts(store, ["prefault/after"], [3]) as reservation:
            reservation.views[0][:] = b"abc"
            assert reservation.commit() == [None]
        assert store.get("prefault/after") == b"abc"
