"""One client process of the lease churn case: put / get / remove(force) over its own keys
for a while; prints one JSON line of counts.

``python churn_worker.py MASTER PREFIX NUM_KEYS SIZE SECONDS [--hold-leases]``.
``--hold-leases`` reproduces the clients before leases ended with the read: the get's lease
id is never released, so each lease lasts its whole TTL (for the before/after figure in
bench/RESULTS.md; the test runs without it).
"""

from __future__ import annotations

import json
import sys
import time

import kvstore
from kvstore.client import leases


def main(argv: list[str]) -> None:
    address, prefix, num_keys, size, seconds = argv[:5]
    if "--hold-leases" in argv:
        leases.LeaseReleaser.release = lambda self, lease_id: None
    num_keys, size, seconds = int(num_keys), int(size), float(seconds)
    store = kvstore.connect(address)
    counts = {"cycles": 0, "put_errors": 0, "missing": 0, "wrong": 0}
    values = [bytes([i % 251]) * size for i in range(num_keys)]
    keys = [f"{prefix}/{i}" for i in range(num_keys)]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, value in zip(keys, values):
            try:
                store.put(key, value)
            except kvstore.KVStoreError:
                counts["put_errors"] += 1
                continue
            try:
                if store.get(key) != value:
                    counts["wrong"] += 1
            except kvstore.KeyNotFoundError:
                counts["missing"] += 1
            store.remove(key, force=True)
        counts["cycles"] += 1
    store.close()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
