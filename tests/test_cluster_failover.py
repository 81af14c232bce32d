"""replicas=2, one daemon SIGKILLed during a stream of gets: every get returns the right bytes
or a clear error, never wrong bytes; reads fall back to the surviving replica."""

from __future__ import annotations

import threading

import pytest

from client_cluster import Cluster, payload
from kvstore import KVStoreError, TransferError

NUM_KEYS = 16
VALUE_BYTES = 256 * 1024


@pytest.mark.parametrize("transport", ["tcp", "auto"])
def test_sigkill_of_one_replica_holder_during_gets(transport):
    # a long node TTL: the dead daemon stays listed for the whole test (see the put below)
    cluster = Cluster(num_daemons=2, dram="64MiB", master_args=("--node-ttl", "60s"))
    try:
        store = cluster.connect(transport=transport, timeout_s=10)
        values = {f"fail/{i}": payload(VALUE_BYTES, seed=i) for i in range(NUM_KEYS)}
        assert store.batch_put(list(values), list(values.values()), replicas=2) == \
            [None] * NUM_KEYS

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

        wrong = [key for _, key, result in outcomes
                 if isinstance(result, bytes) and result != values[key]]
        assert wrong == []
        assert all(isinstance(result, (bytes, KVStoreError)) for _, _, result in outcomes)
        after_kill = [result for after, _, result in outcomes if after]
        # every object has a replica on the survivor, so the fallback serves every get
        assert len(after_kill) >= 3 * NUM_KEYS
        assert all(isinstance(result, bytes) for result in after_kill), \
            [r for r in after_kill if not isinstance(r, bytes)][:3]
        if transport == "tcp":
            assert store.stats()["transfers"]["tcp"]["num_errors"] >= 1
            # the master still lists the dead node (its TTL has not run out): a put that
            # needs it fails on the write, names the key and leaves nothing behind
            with pytest.raises(TransferError) as info:
                store.put("fail/new", payload(1000, seed=99), replicas=2)
            assert info.value.keys == ["fail/new"]
            assert not store.exists("fail/new")
            assert store.stats()["master"]["num_pending"] == 0  # revoked, not left pending
        store.close()
    finally:
        cluster.close()
