"""CPU an idle ``kvstore daemon --nixl`` uses, per tree, interleaved: for each round and each
tree given, a fresh master and ``--nixl`` daemon of that tree's .venv, left alone for a
settling time, then its user + system CPU (/proc/PID/stat) over ``--window-s``.

    .venv/bin/python bench/nixl_idle_bench.py /work/base2 . --rounds 2

Prints one line per measurement (share of one core, load average) and writes JSON. Before
NIXL's progress thread was given a poll timeout (kvstore/transport/nixl_lib.py) an idle daemon
spun ~0.64 of a core on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(tree: Path, settle_s: float, window_s: float) -> float:
    """Share of one core the tree's idle --nixl daemon used over ``window_s``."""
    kvstore = str(tree / ".venv" / "bin" / "kvstore")
    master = subprocess.Popen([kvstore, "master", "--host", "127.0.0.1", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    daemon = None
    try:
        address = None
        for line in master.stdout:
            if "listening on" in line:
                address = line.rsplit("listening on", 1)[1].split()[0]
                break
        if address is None:
            raise SystemExit(f"{tree}: the master did not start")
        daemon = subprocess.Popen([kvstore, "daemon", "--master", address, "--host",
                                   "127.0.0.1", "--dram", "256MiB", "--nixl"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(settle_s)  # NOTE: a bench: start-up work (prefault, registration) settles
        start_s, start_wall_s = _cpu_s(daemon.pid), time.monotonic()
        time.sleep(window_s)
        return (_cpu_s(daemon.pid) - start_s) / (time.monotonic() - start_wall_s)
    finally:
        for proc in (daemon, master):
            if proc is not None:
                proc.terminate()
                proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle-s", type=float, default=6.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--json", default="bench/out/nixl_idle.json")
    args = parser.parse_args()
    results = []
    for round_index in range(args.rounds):
        for tree in args.trees:
            load = os.getloadavg()
            core = _measure(tree.resolve(), args.settle_s, args.window_s)
            results.append({"tree": str(tree), "round": round_index, "core_fraction": core,
                            "load": load})
            print(f"{tree}: idle --nixl daemon {core * 100:.1f}% of a core over "
                  f"{args.window_s:.0f} s (load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
