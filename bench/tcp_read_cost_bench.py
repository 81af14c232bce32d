"""What one tcp READ costs the daemon and the client, for the daemons of several trees side by
side: the per-request CPU of the data-plane server, beside the wall time of the read.

One standalone ``kvstore daemon`` per tree (``--trees``, each with its own .venv), all
running at once; one client (this tree's ``TcpTransport``, one stream, so a read is one
request on one connection) reads 64 KiB and 4 MiB from each in turn, ``--per-round`` reads
per daemon per round, rounds interleaved so load drifts hit every tree alike. Per round and
tree: the read's p50 wall time, the daemon's CPU per read (the sum over its threads of
/proc/<pid>/task/*/schedstat, nanoseconds) and the client's (``time.thread_time`` of the
reading thread). Printed as the range over rounds of those figures (and their median), with
the load average; written to bench/out/tcp_read_cost.json.

The client code is the same for every tree here, so a difference between the trees' rows is
the daemon's; compare client CPU across runs of this script from different trees.

    .venv/bin/python bench/tcp_read_cost_bench.py --trees /work/base2,. [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kvstore._process as process_module
from kvstore._process import ServerProcess
from kvstore.transport.base import Target
from kvstore.transport.tcp import TcpTransport

OUT_DIR = Path(__file__).resolve().parent / "out"
TOKEN = "read-cost"
SIZES = (64 * 1024, 4 * 1024 * 1024)


def process_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` (schedstat: nanosecond resolution)."""
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total_ns += int(stat.read().split()[0])
        except OSError:
            pass    # a thread that ended meanwhile
    return total_ns / 1e9


def start_daemon(tree: Path, node_id: str) -> ServerProcess:
    executable = tree / ".venv" / "bin" / "kvstore"
    if not executable.exists():
        raise SystemExit(f"{executable} is missing: make install in {tree}")
    process_module.kvstore_executable = lambda: str(executable)
    return ServerProcess(["daemon", "--standalone", "--dram", str(64 << 20), "--node-id",
                          node_id, "--token", TOKEN, "--host", "127.0.0.1", "--port", "0"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trees", default=".", help="comma-separated checkouts with a .venv")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=300,
                        help="64 KiB reads per daemon per round (4 MiB: a tenth)")
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    daemons = [start_daemon(tree, f"node{i}") for i, tree in enumerate(trees)]
    transport = TcpTransport(token=TOKEN, num_streams=1)
    # (tree index, size) -> per-round (p50 wall us, daemon cpu us/read, client cpu us/read)
    rows: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    try:
        targets = {}
        for i, daemon in enumerate(daemons):
            offset = 0
            for size in SIZES:
                value = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
                target = Target(f"node{i}", "elsewhere", daemon.address, "dram0", "", offset,
                                size)
                transport.write(target, memoryview(value), timeout_s=30.0)
                targets[i, size] = (target, value)
                offset += size
        for _ in range(args.rounds):
            for size in SIZES:
                count = args.per_round if size == SIZES[0] else max(10, args.per_round // 10)
                for i, daemon in enumerate(daemons):
                    target, value = targets[i, size]
                    dst = np.empty_like(value)
                    view = memoryview(dst).cast("B")
                    transport.read_into(target, view, timeout_s=30.0)   # warm
                    walls = []
                    daemon_before, client_before = process_cpu_s(daemon.proc.pid), \
                        time.thread_time()
                    for _ in range(count):
                        started = time.perf_counter()
                        transport.read_into(target, view, timeout_s=30.0)
                        walls.append(time.perf_counter() - started)
                    daemon_s = process_cpu_s(daemon.proc.pid) - daemon_before
                    client_s = time.thread_time() - client_before
                    if not np.array_equal(dst, value):
                        raise SystemExit(f"{trees[i]}: read returned wrong bytes")
                    rows.setdefault((i, size), []).append(
                        (statistics.median(walls) * 1e6, daemon_s / count * 1e6,
                         client_s / count * 1e6))
    finally:
        transport.close()
        for daemon in daemons:
            daemon.close()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\ntcp READ cost, {args.rounds} rounds; load {load_before} -> {load_after}; "
          "each cell: min-max over rounds (median)\n")
    print(f"{'tree':28}{'size':>9}{'read p50 us':>24}{'daemon cpu us':>24}"
          f"{'client cpu us':>24}")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_before": load_before, "load_after": load_after, "rows": []}
    for (i, size), samples in rows.items():
        cells = []
        for column in range(3):
            values = [s[column] for s in samples]
            cells.append(f"{min(values):.1f}-{max(values):.1f} "
                         f"({statistics.median(values):.1f})")
        label = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        print(f"{str(trees[i])[-28:]:28}{label:>9}{cells[0]:>24}{cells[1]:>24}{cells[2]:>24}")
        result["rows"].append({"tree": str(trees[i]), "size_bytes": size,
                               "rounds": [dict(zip(("read_p50_us", "daemon_cpu_us",
                                                    "client_cpu_us"), s)) for s in samples]})
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "tcp_read_cost.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
