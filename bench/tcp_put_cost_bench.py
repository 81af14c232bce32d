"""What one small tcp put costs each process: p50 latency and the CPU per put of the client,
the master and the daemon, for several kvstore trees, rounds interleaved.

Each round runs every tree given (``--trees``: repository roots with a built .venv, e.g. the
tree before a change and the one after) in turn; each run starts its own ``kvstore master``
and ``kvstore daemon`` (from that tree) on loopback and a client with ``transport="tcp"``
and the fast metadata path, warms up with 100 puts, then times ``--per-round`` puts of
``--size`` bytes (distinct keys). CPU is read from /proc (the client: ``process_time``, all
its threads), so it holds on a loaded machine better than latency does. Prints one line per
run and the range over rounds per tree, with the load average; writes
bench/out/tcp_put_cost.json.

A tree written ``PATH+reserve`` runs that tree's client with ``reserve_bytes`` set to
``--reserve-bytes`` (puts into space reserved ahead: one master call per put, see
docs/ARCHITECTURE.md, Reservations); ``--transport shm`` times same-host puts instead.

    .venv/bin/python bench/tcp_put_cost_bench.py [--trees /work/base2,.,.+reserve]
        [--rounds 3] [--per-round 2000] [--size 65536] [--reserve-bytes 67108864]
        [--transport tcp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(size: int, count: int, reserve_bytes: int = 0, transport: str = "tcp") -> dict:
    """One run in the tree whose python runs this: p50 us and CPU us per put."""
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(max(1 << 30, 2 * size * count))])
    try:
        options = {"reserve_bytes": reserve_bytes} if reserve_bytes else {}
        with kvstore.connect(master.address, transport=transport, metadata="fast",
                             **options) as store:
            for _ in range(200):
                if store.stats()["master"]["num_nodes"]:
                    break
                time.sleep(0.05)  # the daemon's registration: another process's clock
            value = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
            for i in range(100):
                store.put(f"warm/{i}", value)
            pids = (master.proc.pid, daemon.proc.pid)
            client0, master0, daemon0 = time.process_time(), _cpu_s(pids[0]), _cpu_s(pids[1])
            latencies = []
            for i in range(count):
                started = time.perf_counter()
                store.put(f"put/{i}", value)
                latencies.append(time.perf_counter() - started)
            client1, master1, daemon1 = time.process_time(), _cpu_s(pids[0]), _cpu_s(pids[1])
    finally:
        daemon.close()
        master.close()
    return {"p50_us": statistics.median(latencies) * 1e6,
            "client_cpu_us": (client1 - client0) / count * 1e6,
            "master_cpu_us": (master1 - master0) / count * 1e6,
            "daemon_cpu_us": (daemon1 - daemon0) / count * 1e6}


class _Tree:
    """One ``--trees`` entry: a repository root, and whether its client reserves space."""

    def __init__(self, path: Path, reserve: bool):
        self.path, self.reserve = path, reserve
        self.label = f"{path}+reserve" if reserve else str(path)
        self.name = f"{path.name}+reserve" if reserve else path.name


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trees", default=".", help="comma-separated kvstore repository "
                        "roots, each with a built .venv")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--reserve-bytes", type=int, default=64 << 20,
                        help="reserve_bytes of the trees written PATH+reserve")
    parser.add_argument("--transport", default="tcp", choices=("tcp", "shm"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.size, args.per_round, args.reserve_bytes,
                                args.transport)))
        return 0
    specs = args.trees.split(",")
    trees = [_Tree(Path(t.removesuffix("+reserve")).resolve(), t.endswith("+reserve"))
             for t in specs]
    runs: list[dict] = []
    for round_index in range(args.rounds):
        for tree in trees:
            load_before = Path("/proc/loadavg").read_text().split()[0]
            out = subprocess.run(
                [str(tree.path / ".venv/bin/python"), str(Path(__file__).resolve()),
                 "--worker", "--per-round", str(args.per_round), "--size", str(args.size),
                 "--reserve-bytes", str(args.reserve_bytes if tree.reserve else 0),
                 "--transport", args.transport],
                cwd=tree.path, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row.update(tree=tree.label, round=round_index + 1, load_before=load_before,
                       load_after=Path("/proc/loadavg").read_text().split()[0])
            runs.append(row)
            print(f"round {row['round']} {tree.name:20} load {load_before}->"
                  f"{row['load_after']}: put p50 {row['p50_us']:8.1f} us, CPU us/put "
                  f"client {row['client_cpu_us']:6.1f} master {row['master_cpu_us']:6.1f} "
                  f"daemon {row['daemon_cpu_us']:6.1f}", flush=True)
    print(f"\n{args.size}-byte {args.transport} put, {args.rounds} rounds x {args.per_round}: range over "
          "rounds")
    for tree in trees:
        mine = [r for r in runs if r["tree"] == tree.label]
        cells = []
        for field in ("p50_us", "client_cpu_us", "master_cpu_us", "daemon_cpu_us"):
            values = [r[field] for r in mine]
            cells.append(f"{field} {min(values):.0f}-{max(values):.0f}")
        print(f"  {tree.name:20} " + ", ".join(cells))
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "tcp_put_cost.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "size": args.size,
         "transport": args.transport, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
