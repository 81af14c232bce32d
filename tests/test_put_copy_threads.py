"""Same-host puts whose copy uses two threads (``ClientConfig.copy_threads``, the shm write
and the reserved put's copy + hash; csrc/cpu/copy_split.h), against real master and daemon
processes: every byte lands where it should and reads back under the recorded checksum,
through PutStart and through a reservation, at sizes around the split; such puts survive a
master SIGKILL right after they returned (durable commit); a put whose shm write fails (its
daemon crashed) leaves nothing visible; a bad copy_threads is refused."""

from __future__ import annotations

import pytest

from client_cluster import Cluster, payload
from crash_servers import daemon_process, master_process, wait_adopted

import kvstore
from kvstore._errors import InvalidArgumentError, KVStoreError
from kvstore.client.checksum import checksum

MiB = 1 << 20
# NOTE: under 2 MiB (one thread), at it, odd sizes past it (the last chunk runs to the end)
SIZES = [(2 << 20) - 1, 2 << 20, (4 << 20) + 3, 4 << 20, (9 << 20) + 7]
SLOW_BEAT = ("--heartbeat-interval", "1s", "--node-ttl", "60s")


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=1, dram="512MiB")
    yield cluster
    cluster.close()


@pytest.mark.parametrize("reserve_bytes", [0, 64 * MiB])
@pytest.mark.parametrize("copy_threads", [1, 2])
def test_large_shm_puts_read_back_exactly(cluster, copy_threads, reserve_bytes):
    tag = f"t{copy_threads}-r{reserve_bytes}"
    values = {f"{tag}/{i}": payload(size, seed=i + 10 * copy_threads)
              for i, size in enumerate(SIZES)}
    with cluster.connect(transport="shm", copy_threads=copy_threads,
                         reserve_bytes=reserve_bytes) as store:
        for key, value in values.items():
            store.put(key, value)
        # one batch too: several large values in one copy call
        batch = {f"{tag}/batch/{i}": payload(3 * MiB + i, seed=100 + i) for i in range(4)}
        assert store.batch_put(list(batch), list(batch.values())) == [None] * 4
        values.update(batch)
        if reserve_bytes:
            assert store._reserved.num_reserved >= 1, "the reserved path took the puts"
        for key, value in values.items():
            (replica_set,) = store._master.get_replicas([key])
            assert replica_set.checksum == checksum(value), key
            assert store.get(key, verify=True) == value, key
        store.remove_prefix(f"{tag}/", force=True)


@pytest.mark.parametrize("reserve_bytes", [0, 64 * MiB])
def test_two_thread_puts_survive_a_master_sigkill(reserve_bytes):
    # NOTE: slow heartbeats: the commits must be on the daemon when each put returns
    master = master_process("--heartbeat-interval", "3s", "--node-ttl", "60s")
    daemon = restarted = None
    try:
        daemon = daemon_process(master, "--dram", "128MiB")
        values = {f"durable/{i}": payload((4 << 20) + 64 * i, seed=200 + i) for i in range(6)}
        with kvstore.connect(master.address, transport="shm", copy_threads=2,
                             reserve_bytes=reserve_bytes, timeout_s=10) as store:
            for key, value in values.items():
                store.put(key, value)
            if reserve_bytes:
                assert store._reserved.num_reserved >= 1
            master.kill()                     # right after the last put returned
        restarted = master_process("--heartbeat-interval", "200ms", port=master.port)
        wait_adopted(restarted, "durable/5", daemon)
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert store.batch_get(list(values)) == list(values.values())
    finally:
        for server in (daemon, master, restarted):
            if server is not None:
                server.close()


@pytest.mark.parametrize("reserve_bytes", [0, 64 * MiB])
def test_a_put_into_a_crashed_daemon_leaves_nothing_visible(reserve_bytes):
    cluster = Cluster(num_daemons=1, dram="128MiB", master_args=SLOW_BEAT)
    try:
        value = payload((4 << 20) + 3, seed=7)
        with cluster.connect(transport="shm", copy_threads=2,
                             reserve_bytes=reserve_bytes) as store:
            store.put("before", value)
            cluster.kill_daemon(0)      # its segment is unlinked: every shm write is refused
            with pytest.raises(KVStoreError):
                store.put("during", value)
            assert not store.exists("during")
            assert store.batch_exists(["during"]) == [False]
    finally:
        cluster.close()


def test_copy_threads_is_validated():
    for bad in (0, 3, True, "2", 1.0):
        with pytest.raises(InvalidArgumentError, match="copy_threads"):
            kvstore.local(transport="shm", copy_threads=bad)
