"""Whose CPU a batched put costs: client, master and daemon CPU microseconds per key of
``batch_put`` (BATCH x 64 KiB over shm, fast metadata path), each process's own figure
(the client's ``process_time``; the servers' /proc utime + stime), for several trees side
by side (issue 10, 10p). bench/client_bench.py's ``batch128_put_cpu_us_per_key`` is the
sum of the three; this splits it.

    .venv/bin/python bench/put_cpu_split_bench.py --python /work/base/.venv/bin/python \\
        --python .venv/bin/python [--rounds 3] [--batches 100] [--json out.json]

Each round runs every interpreter once, interleaved; each run is a fresh master and daemon
(2 GiB DRAM, prefaulted, so nothing is evicted while timed). Prints medians (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import _rounds
from _daemon_ready import wait_registered

MiB = 1 << 20
POOL_MIB = 2048
SIZE = 64 * 1024


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(batches: int, batch: int) -> dict:
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(POOL_MIB * MiB)])
    try:
        with kvstore.connect(master.address, transport="shm", lease_ttl_s=1.0,
                             metadata="fast") as store:
            wait_registered(store, 10)
            chunk = np.ones(4 * MiB, dtype=np.uint8)
            num_chunks = POOL_MIB // 4 * 9 // 10       # touch the pool's pages once
            for start in range(0, num_chunks, 64):
                count = min(num_chunks, start + 64) - start
                store.batch_put([f"pf/{start + i}" for i in range(count)], [chunk] * count)
            store.remove_prefix("pf/", force=True)
            value = np.random.default_rng(2).integers(0, 256, SIZE, dtype=np.uint8)
            values = [value] * batch
            for w in range(10):
                store.batch_put([f"w/{w}/{j}" for j in range(batch)], values)
            store.remove_prefix("w/", force=True)
            keysets = [[f"b/{i}/{j}" for j in range(batch)] for i in range(batches)]
            pids = (master.proc.pid, daemon.proc.pid)
            started = (time.process_time(), *map(_cpu_s, pids))
            for keys in keysets:
                store.batch_put(keys, values)
            ended = (time.process_time(), *map(_cpu_s, pids))
    finally:
        daemon.close()
        master.close()
    num_keys = batches * batch
    return {name: (end - start) / num_keys * 1e6 for name, start, end
            in zip(("client", "master", "daemon"), started, ended)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=[],
                        help="an interpreter whose kvstore to measure (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", default="")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.batches, args.batch)))
        return
    if args.batches * args.batch * SIZE > POOL_MIB * MiB * 8 // 10:
        parser.error("--batches x --batch x 64 KiB must stay under 80% of the 2 GiB pool")
    pythons = args.python or [sys.executable]
    runs, loads = _rounds.run_rounds(__file__, pythons, args.rounds,
                                     ["--batches", str(args.batches), "--batch", str(args.batch)])
    print(f"CPU us per key, {args.batch} x 64 KiB batch_put over shm, median of "
          f"{args.rounds} rounds (min-max)")
    print(f"{'tree':40} {'client':>18} {'master':>18} {'daemon':>18} {'all three':>18}")
    table = {}
    for python, results in runs.items():
        for r in results:
            r["all three"] = r["client"] + r["master"] + r["daemon"]
        cells = {}
        for name in ("client", "master", "daemon", "all three"):
            values = [r[name] for r in results]
            cells[name] = values
        table[python] = cells
        print(f"{python:40} " + " ".join(
            f"{statistics.median(v):6.1f} ({min(v):4.1f}-{max(v):4.1f})".rjust(18)
            for v in cells.values()))
    print(f"load averages before each run: {loads}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"loads": loads, "rows": table}, out, indent=1)


if __name__ == "__main__":
    main()
