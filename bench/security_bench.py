"""Cost of issue 14's protections: write capabilities (put p50 at 64 KiB, batched put GB/s,
over tcp and shm) and shm read verification (get GB/s at 64 KiB and 4 MiB, verify on/off).

Interleaved before/after: ``--python`` names the interpreters to compare (e.g. the venv of a
main worktree, then this one's); each round runs every interpreter once, in turn, each on a
fresh master + daemon of its own. Prints a table of the median of the rounds with the
min-max range, writes JSON, and records the load average before each run. Timing starts
once the daemon registered and its segment is allocated (``bench/_daemon_ready.py``); the
batched put figure times only the ``batch_put`` calls (the per-key removes between batches
are reported apart, ``remove_after_batch_us_per_key``).

    .venv/bin/python bench/security_bench.py \
        --python /work/base/.venv/bin/python --python .venv/bin/python --rounds 3

Run with ``--child`` by the driver: measures one interpreter's kvstore and prints JSON.
``--capability-ab``: same code, a daemon with and one without ``--no-write-capabilities``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import _rounds

KIB = 1024
MIB = 1024 * KIB


def _child(duration_s: float) -> dict:
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    from _daemon_ready import wait_allocated, wait_registered

    results: dict[str, float] = {}
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                           "--port", "0", "--dram", "2GiB"]):
        wait_allocated()
        for transport in ("tcp", "shm"):
            with kvstore.connect(master.address, transport=transport) as store:
                wait_registered(store)
                value = np.random.default_rng(1).integers(0, 256, 64 * KIB, np.uint8)
                latencies = []
                end = time.perf_counter() + duration_s
                i = 0
                while time.perf_counter() < end or i < 50:
                    t0 = time.perf_counter()
                    store.put(f"p64-{transport}-{i}", value)
                    latencies.append(time.perf_counter() - t0)
                    i += 1
                store_keys = [f"p64-{transport}-{j}" for j in range(i)]
                store.batch_remove(store_keys) if hasattr(store, "batch_remove") else [
                    store.remove(k) for k in store_keys]
                results[f"put_64KiB_p50_us_{transport}"] = statistics.median(latencies) * 1e6
                big = np.random.default_rng(2).integers(0, 256, 1 * MIB, np.uint8)
                batch = 32
                moved = 0
                elapsed = removing = 0.0
                r = 0
                # NOTE: only the batch_put calls are timed; the per-key removes that make
                # room between them are timed apart (a durable remove waits for the
                # daemon's confirmation: counted in the put figure, it read as a put cost)
                while elapsed < duration_s or r < 3:
                    keys = [f"b-{transport}-{r}-{j}" for j in range(batch)]
                    t0 = time.perf_counter()
                    errors = store.batch_put(keys, [big] * batch)
                    elapsed += time.perf_counter() - t0
                    assert not any(errors), errors
                    moved += batch * big.nbytes
                    r += 1
                    t0 = time.perf_counter()
                    for k in keys:
                        store.remove(k)
                    removing += time.perf_counter() - t0
                results[f"batch_put_1MiBx32_GBps_{transport}"] = moved / elapsed / 1e9
                results[f"remove_after_batch_us_per_key_{transport}"] = \
                    removing / (r * batch) * 1e6
        with kvstore.connect(master.address, transport="shm") as store:
            for size, label in ((64 * KIB, "64KiB"), (4 * MIB, "4MiB")):
                value = np.random.default_rng(3).integers(0, 256, size, np.uint8)
                store.put(f"g-{label}", value)
                out = np.empty(size, np.uint8)
                store.get_into(f"g-{label}", out)   # warm: mapping, pages, connections
                # NOTE: off and on alternate in short slices, so drift in the machine's
                # load hits both alike; the figure is the median slice
                slice_s = duration_s / 5
                rates: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(5):
                    for verify in (False, True):
                        n = 0
                        t0 = time.perf_counter()
                        while time.perf_counter() - t0 < slice_s or n < 5:
                            store.get_into(f"g-{label}", out, verify=verify)
                            n += 1
                        rates[verify].append(n * size / (time.perf_counter() - t0) / 1e9)
                for verify, values in rates.items():
                    key = f"get_{label}_GBps_shm_verify_{'on' if verify else 'off'}"
                    results[key] = statistics.median(values)
                assert np.array_equal(out, value)
    return results


def _capability_ab(rounds: int) -> None:
    """Same code, two clusters: one daemon checks capabilities, one runs with
    ``--no-write-capabilities``; interleaved rounds of 60 single 64 KiB puts and one batched
    put of 32 x 1 MiB each, over tcp. Prints median and range per side."""
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    servers, stores = [], {}
    try:
        for name, extra in (("capabilities", []), ("no-capabilities",
                                                   ["--no-write-capabilities"])):
            master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
            servers.append(master)
            servers.append(ServerProcess(["daemon", "--master", master.address, "--host",
                                          "127.0.0.1", "--port", "0", "--dram", "1GiB",
                                          *extra]))
            stores[name] = master.address
        time.sleep(1.0)  # NOTE: registration is asynchronous; a bench, not a test
        value = np.random.default_rng(1).integers(0, 256, 64 * KIB, np.uint8)
        big = np.random.default_rng(2).integers(0, 256, MIB, np.uint8)
        p50s: dict[str, list[float]] = {n: [] for n in stores}
        rates: dict[str, list[float]] = {n: [] for n in stores}
        opened = {n: kvstore.connect(a, transport="tcp") for n, a in stores.items()}
        for r in range(rounds):
            for name, store in opened.items():
                latencies = []
                for i in range(60):
                    t0 = time.perf_counter()
                    store.put(f"k{r}-{i}", value)
                    latencies.append(time.perf_counter() - t0)
                    store.remove(f"k{r}-{i}")
                p50s[name].append(statistics.median(latencies) * 1e6)
                keys = [f"b{r}-{j}" for j in range(32)]
                t0 = time.perf_counter()
                assert not any(store.batch_put(keys, [big] * 32))
                rates[name].append(32 * MIB / (time.perf_counter() - t0) / 1e9)
                for key in keys:
                    store.remove(key)
        for name in stores:
            p, g = sorted(p50s[name]), sorted(rates[name])
            print(f"{name:16s} put 64KiB p50 {statistics.median(p):7.0f} us ({p[0]:.0f}-"
                  f"{p[-1]:.0f})   batched 32 x 1MiB {statistics.median(g):5.2f} GB/s "
                  f"({g[0]:.2f}-{g[-1]:.2f})")
        for store in opened.values():
            store.close()
    finally:
        for server in servers:
            server.close()
    print("load average:", open("/proc/loadavg").read().split()[:3])


def _driver(args) -> None:
    runs, loads = _rounds.run_rounds(__file__, args.python, args.rounds,
                                     ["--duration", str(args.duration)])
    names = list(next(iter(runs.values()))[0])
    header = f"{'measure':40s}" + "".join(f"{_rounds.tree_name(p):>26s}" for p in args.python)
    print(header)
    for name in names:
        print(f"{name:40s}" + "".join(_rounds.spread((r[name] for r in runs[python]), 12, 2)
                                      for python in args.python))
    print("load averages before each run:", loads)
    _rounds.write_json(args.json, runs, loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _rounds.add_flags(parser, "bench/out/security.json")
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--capability-ab", action="store_true",
                        help="this interpreter only: daemons with and without capability "
                             "checks side by side")
    args = parser.parse_args()
    if args.capability_ab:
        _capability_ab(args.rounds)
        return
    if args.child:
        print(json.dumps(_child(args.duration)))
        return
    args.python = args.python or [sys.executable]
    os.environ.pop("KVSTORE_TOKEN", None)
    _driver(args)


if __name__ == "__main__":
    main()
