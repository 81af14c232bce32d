"""Where a same-host reserved put's time goes (docs/ARCHITECTURE.md, Reservations): p50 of
``--count`` puts of ``--size`` bytes over shm, and of the reserved PutEnd round trip inside
them, for each mode in turn (a fresh master and daemon each), beside a one-key ``exists``
(one bare master round trip) in the same process.

Modes: ``plain`` (reservations off: PutStart + copy + PutEnd), ``ring`` (reserved, commits
through the daemon's commit ring), ``nofuse`` (reserved, hash then copy instead of the fused
copy + hash), ``push`` (reserved, master started with --no-client-commit: PutEnd waits for
the master's push). Prints one line per mode with the load average.

    .venv/bin/python bench/reserved_put_split_bench.py [--modes plain,ring,nofuse,push]
        [--size 4194304] [--count 80]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def run_mode(mode: str, size: int, count: int) -> str:
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess
    from kvstore.client import reservations

    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                            *(["--no-client-commit"] if mode == "push" else [])])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(max(1 << 30, 2 * size * count))])
    try:
        options = {} if mode == "plain" else {"reserve_bytes": max(64 << 20, 4 * size)}
        if mode == "nofuse":
            reservations._copy_hashed = lambda transport, items: None
        with kvstore.connect(master.address, transport="shm", metadata="fast",
                             **options) as store:
            while not store.stats()["master"]["num_nodes"]:
                time.sleep(0.05)   # the daemon's registration: another process's clock
            value = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
            put_ends: list[float] = []
            if mode != "plain":
                end = store._master.put_end_reserved_committing

                def timed_end(*args, **kwargs):
                    started = time.perf_counter()
                    try:
                        return end(*args, **kwargs)
                    finally:
                        put_ends.append(time.perf_counter() - started)
                store._master.put_end_reserved_committing = timed_end
            puts, exists = [], []
            for i in range(count):
                started = time.perf_counter()
                store.put(f"k{i}", value)
                puts.append(time.perf_counter() - started)
            for _ in range(50):
                started = time.perf_counter()
                store.exists("k0")
                exists.append(time.perf_counter() - started)
    finally:
        daemon.close()
        master.close()

    def p50_ms(samples):
        return sorted(samples)[len(samples) // 2] * 1e3 if samples else float("nan")
    return (f"{mode:7} put p50 {p50_ms(puts):7.2f} ms, reserved PutEnd p50 "
            f"{p50_ms(put_ends):6.2f} ms, exists p50 {p50_ms(exists):5.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="plain,ring,nofuse,push")
    parser.add_argument("--size", type=int, default=4 << 20)
    parser.add_argument("--count", type=int, default=80)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(run_mode(args.mode, args.size, args.count))
        return 0
    for mode in args.modes.split(","):
        load = Path("/proc/loadavg").read_text().split()[0]
        # NOTE: one process per mode: "nofuse" replaces a module function
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--size",
                              str(args.size), "--count", str(args.count)], check=True,
                             capture_output=True, text=True).stdout.strip()
        print(f"{out}  (load {load})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
