"""Batches longer than the master's max_batch are split by the client, transparently."""

from __future__ import annotations

from client_cluster import Cluster, payload
from kvstore import KeyNotFoundError


def test_batches_beyond_max_batch_are_split():
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=("--max-batch", "8"))
    try:
        with cluster.connect() as store:
            assert store.stats()["master"]["max_batch"] == 8
            keys = [f"split/{i:02d}" for i in range(21)]
            values = [payload(100 + i, seed=i) for i in range(21)]
            assert store.batch_put(keys[:20], values[:20]) == [None] * 20
            assert store.batch_exists(keys) == [True] * 20 + [False]
            assert store.match_prefix(keys) == 20
            assert store.match_prefix(keys[:9] + ["split/none"] + keys[9:]) == 9
            got = store.batch_get(keys)
            assert got[:20] == values[:20] and isinstance(got[20], KeyNotFoundError)
            outs = [bytearray(200) for _ in keys]
            results = store.batch_get_into(keys, outs)
            assert results[:20] == [len(v) for v in values[:20]]
            assert all(bytes(o[:len(v)]) == v for o, v in zip(outs, values[:20]))
    finally:
        cluster.close()
