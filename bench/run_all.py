"""Run every benchmark under bench/ in turn (``make bench``).

Each benchmark prints its own table and writes JSON under bench/out/. This runner only starts
them one after another (never in parallel: they measure the same two cores) and reports which
ones failed, exiting non-zero if any did.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(BENCH_DIR.glob("*_bench.py"))
    failed: list[str] = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        started_s = time.monotonic()
        result = subprocess.run([sys.executable, str(script)], cwd=BENCH_DIR.parent)
        elapsed_s = time.monotonic() - started_s
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"=== {script.name}: {status} in {elapsed_s:.1f}s ===", flush=True)
        if result.returncode != 0:
            failed.append(script.name)
    print(f"\n{len(scripts) - len(failed)}/{len(scripts)} benchmarks ran; JSON in bench/out/")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
