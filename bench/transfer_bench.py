"""Transfer benchmark (``make bench`` runs it; ``kvstore bench transfer`` is the same tool
with options, kvstore/bench/transfer_cli.py).

Starts a master and a daemon process on loopback, then measures put/get GB/s for 64 KiB..64 MiB
values, single and batched, over shm and tcp, at the transport level and through
``kvstore.connect``, beside a single-thread memcpy ceiling measured in the same run, with
p50/p90/p99 latency. Prints the table and writes bench/out/transfer.json, then checks the targets
of issue 3 and prints PASS/MISS for each (exit 0 either way: speed is recorded, not asserted).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kvstore.bench.transfer_cli import command

OUT_PATH = Path(__file__).resolve().parent / "out" / "transfer.json"
MIB = 1024 * 1024


def _row(rows, level, transport, size_bytes, mode, op):
    return next(r for r in rows if (r["level"], r["transport"], r["size_bytes"], r["mode"],
                                    r["op"]) == (level, transport, size_bytes, mode, op))


def check_targets(result: dict) -> list[tuple[str, bool, str]]:
    rows = result["rows"]
    checks = []
    for level in sorted({r["level"] for r in rows}):
        for op in ("put", "get"):
            row = _row(rows, level, "shm", 4 * MIB, "single", op)
            ceiling = row["memcpy_gbps"]
            checks.append((f"{level} shm 4MiB {op} >= 60% memcpy", row["gbps"] >= 0.6 * ceiling,
                           f"{row['gbps']:.2f} GB/s, memcpy {ceiling:.2f} GB/s"))
            row = _row(rows, level, "tcp", 4 * MIB, "single", op)
            checks.append((f"{level} tcp 4MiB {op} >= 3.5 GB/s", row["gbps"] >= 3.5,
                           f"{row['gbps']:.2f} GB/s"))
        for op, limit_us in (("get", 150), ("put", 250)):
            row = _row(rows, level, "shm", 64 * 1024, "single", op)
            checks.append((f"{level} shm 64KiB {op} p50 < {limit_us} us",
                           row["p50_us"] < limit_us, f"{row['p50_us']:.0f} us"))
        for op in ("put", "get"):
            row = _row(rows, level, "shm", 64 * 1024, "batch", op)
            checks.append((f"{level} shm 64KiB x128 {op} >= 2 GB/s", row["gbps"] >= 2.0,
                           f"{row['gbps']:.2f} GB/s"))
    return checks


def _json_path(args: list[str]) -> Path:
    """Where the command writes its JSON: the value of the last --json."""
    path = OUT_PATH
    for i, arg in enumerate(args):
        if arg == "--json" and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--json="):
            path = Path(arg.split("=", 1)[1])
    return path


def main() -> int:
    args = ["--json", str(OUT_PATH), *sys.argv[1:]]
    out_path = _json_path(args)
    started_s = time.time()
    try:
        command.main(args=args, standalone_mode=False, prog_name="transfer_bench.py")
    except SystemExit as exc:
        if exc.code:
            return int(exc.code)
    if not out_path.exists() or out_path.stat().st_mtime < started_s:
        return 0  # --help: nothing was measured
    result = json.loads(out_path.read_text())
    print()
    for name, ok, detail in check_targets(result):
        print(f"{'PASS' if ok else 'MISS'}  {name}: {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
