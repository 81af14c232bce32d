"""replicas=2, one daemon SIGKILLed: every get returns the right bytes or a clear error, never
wrong bytes; reads fall back to the surviving replica while the master still lists the dead
node, and go only to the survivor once the master has dropped it (``--node-ttl``). Over
shm, a client never reads or writes the mapping of a segment whose name is gone."""

from __future__ import annotations

import threading
import time

import pytest

from client_cluster import Cluster, payload
from raw_master import RawMaster
from kvstore import KVStoreError, TransferError
from kvstore._posix_shm import open_shm
from kvstore.v1 import master_pb2

NUM_KEYS = 16
VALUE_BYTES = 256 * 1024


def _num_nodes(cluster: Cluster) -> int:
    with RawMaster.over_grpc(cluster.address) as master:
        return len(master.call("ListNodes", master_pb2.ListNodesRequest()).nodes)


def _shm_names(cluster: Cluster, index: int) -> list[str]:
    with RawMaster.over_grpc(cluster.address) as master:
        nodes = master.call("ListNodes", master_pb2.ListNodesRequest()).nodes
    return [segment.shm_name for node in nodes if node.data_addr == cluster.daemons[index].address
            for segment in node.segments if segment.shm_name]


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_sigkill_of_one_replica_holder_during_gets(transport):
    # a long node TTL: the dead daemon stays listed for the whole test, so every read of a
    # key whose first replica is on it must fail over (see the put below)
    cluster = Cluster(num_daemons=2, dram="64MiB", master_args=("--node-ttl", "60s"))
    try:
        store = cluster.connect(transport=transport, timeout_s=10)
        values = {f"fail/{i}": payload(VALUE_BYTES, seed=i) for i in range(NUM_KEYS)}
        assert store.batch_put(list(values), list(values.values()), replicas=2) == \
            [None] * NUM_KEYS
        used = "shm" if transport == "auto" else "tcp"

        outcomes: list[tuple[bool, str, object]] = []  # (after_kill, key, bytes or error)
        killed = threading.Event()
        started = threading.Event()

        def stream() -> None:
            num_after_kill = 0
            while num_after_kill < 3 * NUM_KEYS:
                for key in values:
                    after = killed.is_set()
                    try:
                        result: object = store.get(key)
                    except KVStoreError as exc:
                        result = exc
                    outcomes.append((after, key, result))
                    num_after_kill += after
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        cluster.kill_daemon(0)
        killed.set()
        reader.join(60)
        assert not reader.is_alive()

        # every get, before and after the kill, returned the object's bytes: the survivor
        # holds a replica of every key, so no error is acceptable either
        failed = [(key, result) for _, key, result in outcomes
                  if not isinstance(result, bytes) or result != values[key]]
        assert failed == [], failed[:3]
        assert sum(after for after, _, _ in outcomes) >= 3 * NUM_KEYS
        # the dead replica was tried and refused (over shm: its name was unlinked), then the
        # survivor served the key
        assert store.stats()["transfers"][used]["num_errors"] >= 1
        # the master still lists the dead node (its TTL has not run out): a put that needs
        # it fails on the write, names the key and leaves nothing behind; over shm too, the
        # client does not write into the orphaned mapping and report success
        with pytest.raises(TransferError) as info:
            store.put("fail/new", payload(1000, seed=99), replicas=2)
        assert info.value.keys == ["fail/new"]
        assert not store.exists("fail/new")
        assert store.stats()["master"]["num_pending"] == 0  # revoked, not left pending
        store.close()
    finally:
        cluster.close()


def test_auto_reads_go_to_the_survivor_through_and_past_node_ttl():
    """After the kill the dead daemon's memory is overwritten through a mapping the test
    keeps: a client that read its own cached mapping of that segment would return these
    wrong bytes (shm reads are not verified here), so every correct get proves it read the
    survivor."""
    cluster = Cluster(num_daemons=2, dram="16MiB",
                      master_args=("--node-ttl", "3s", "--heartbeat-interval", "200ms"))
    try:
        store = cluster.connect(transport="auto", verify=False, timeout_s=10)
        values = {f"ttl/{i}": payload(VALUE_BYTES, seed=i) for i in range(NUM_KEYS)}
        assert store.batch_put(list(values), list(values.values()), replicas=2) == \
            [None] * NUM_KEYS
        assert store.batch_get(list(values)) == list(values.values())  # both segments mapped
        (dead_name,) = _shm_names(cluster, 0)
        dead = open_shm(dead_name)
        try:
            cluster.kill_daemon(0)                       # SIGKILL, then its name is unlinked
            dead.view[:] = b"\xa5" * dead.size_bytes     # what a stale mapping would return

            # through the TTL: the master still names the dead replica; the client refuses
            # its unlinked mapping and falls back to the survivor
            num_during = 0
            while _num_nodes(cluster) == 2:
                assert store.batch_get(list(values)) == list(values.values())
                num_during += 1
            assert num_during >= 1, "the node was dropped before a read could see it listed"
            shm = store.stats()["transfers"]["shm"]
            assert shm["num_errors"] >= 1

            # past the TTL: the master no longer names the dead node, so no read tries it
            for _ in range(3):
                assert store.batch_get(list(values)) == list(values.values())
            after = store.stats()["transfers"]["shm"]
            assert after["num_errors"] == shm["num_errors"]
            assert after["num_reads"] == shm["num_reads"] + 3 * NUM_KEYS
            assert store.stats()["transfers"]["tcp"]["num_reads"] == 0
        finally:
            dead.close()
        store.close()
    finally:
        cluster.close()
