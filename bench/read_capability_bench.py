"""Cost of read capabilities (issue 14): a tcp reader's get p50 at 64 KiB and a batched get
of 256 x 4 KiB (one GetReplicas issuing 256 capabilities, 256 checked READs), against a
daemon that checks them and one started with ``--no-read-capabilities`` (the master then
issues none), side by side, same code, rounds interleaved.

    .venv/bin/python bench/read_capability_bench.py --rounds 5

Prints median and min-max per side with the load average, writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

KIB = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="bench/out/read_capabilities.json")
    parser.add_argument("--swap", action="store_true",
                        help="start the --no-read-capabilities cluster first")
    args = parser.parse_args()

    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    servers, stores = [], {}
    loads = [open("/proc/loadavg").read().split()[:3]]
    try:
        sides = [("read capabilities", []),
                 ("no read capabilities", ["--no-read-capabilities"])]
        for name, extra in (sides[::-1] if args.swap else sides):
            master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
            servers.append(master)
            servers.append(ServerProcess(["daemon", "--master", master.address, "--host",
                                          "127.0.0.1", "--port", "0", "--dram", "256MiB",
                                          *extra]))
            stores[name] = kvstore.connect(master.address, transport="tcp")
        time.sleep(1.0)  # NOTE: registration is asynchronous; a bench, not a test
        value = np.random.default_rng(1).integers(0, 256, 64 * KIB, np.uint8)
        small = np.random.default_rng(2).integers(0, 256, 4 * KIB, np.uint8)
        batch_keys = [f"b-{i}" for i in range(256)]
        for store in stores.values():
            store.put("one", value)
            assert not any(store.batch_put(batch_keys, [small] * len(batch_keys)))
        p50s = {n: [] for n in stores}
        batch_s = {n: [] for n in stores}
        for r in range(args.rounds):
            # NOTE: the sides swap order each round, so drift in the load hits both alike
            for name, store in (list(stores.items()) if r % 2 == 0
                                else list(stores.items())[::-1]):
                latencies = []
                for _ in range(100):
                    t0 = time.perf_counter()
                    store.get("one")
                    latencies.append(time.perf_counter() - t0)
                p50s[name].append(statistics.median(latencies) * 1e6)
                t0 = time.perf_counter()
                for _ in range(5):
                    results = store.batch_get(batch_keys)
                batch_s[name].append((time.perf_counter() - t0) / 5)
                assert all(isinstance(r, bytes) for r in results)
        loads.append(open("/proc/loadavg").read().split()[:3])
        print(f"load average before/after: {loads}")
        for name in stores:
            p, b = sorted(p50s[name]), sorted(batch_s[name])
            print(f"{name:22s} get 64KiB p50 {statistics.median(p):7.0f} us ({p[0]:.0f}-"
                  f"{p[-1]:.0f})   batch_get 256 x 4KiB {statistics.median(b) * 1e3:6.1f} ms "
                  f"({b[0] * 1e3:.1f}-{b[-1] * 1e3:.1f})")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"get_64KiB_p50_us": p50s, "batch_get_256x4KiB_s":
                                               batch_s, "loadavg": loads}, indent=1))
    finally:
        for store in stores.values():
            store.close()
        for server in reversed(servers):
            server.close()


if __name__ == "__main__":
    main()
