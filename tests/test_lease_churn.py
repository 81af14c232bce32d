"""Leases end with the read: under put/remove/get churn on a working set of 1/8 of the pool,
nothing is evicted, because a removed object's space is freed as soon as its reader is done
(before leases were released, each removed object's space stayed held for the whole lease
TTL and the pool filled with it: figures in bench/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from client_cluster import Cluster

WORKER = Path(__file__).with_name("churn_worker.py")
NUM_WORKERS = 4
POOL = 256 << 20
KEYS_PER_WORKER, SIZE = 8, 1 << 20          # 4 x 8 MiB = 32 MiB: 1/8 of the pool
SECONDS = 8


def run_churn(cluster, *extra: str) -> list[dict]:
    workers = [subprocess.Popen([sys.executable, str(WORKER), cluster.address, f"churn{i}",
                                 str(KEYS_PER_WORKER), str(SIZE), str(SECONDS), *extra],
                                stdout=subprocess.PIPE, text=True)
               for i in range(NUM_WORKERS)]
    results = []
    for worker in workers:
        out, _ = worker.communicate(timeout=SECONDS + 60)
        assert worker.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_churn_on_an_eighth_of_the_pool_evicts_nothing():
    cluster = Cluster(num_daemons=1, dram="256MiB")
    try:
        results = run_churn(cluster)
        store = cluster.connect()
        stats = store.stats()["master"]
        store.close()
        cycles = sum(r["cycles"] for r in results)
        # enough churn that held leases would have filled the pool: removed bytes per TTL
        assert cycles * KEYS_PER_WORKER * SIZE > POOL, results
        assert all(r["wrong"] == 0 and r["missing"] == 0 and r["put_errors"] == 0
                   for r in results), results
        assert stats["evictions"] == 0, (stats, results)
    finally:
        cluster.close()
