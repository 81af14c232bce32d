"""The SSD tier's durable-commit sync, three ways (issue 9: which fdatasyncs an SSD put needs).

Each round writes an object of ``--object-mib`` with O_DIRECT into a preallocated data file
(``posix_fallocate``: unwritten extents, as ``kvstore-ssd.data`` is), appends one 64-byte
record to an index file, then times the sync, per variant, ``--puts`` times:

- ``both at once``: fdatasync of the data file on a thread and of the index at the same time
  (what ``SsdBackend.sync`` does);
- ``index only``: the index's fdatasync alone (relies on the filesystem's single journal
  carrying the data file's extent conversion and on its device flush; not a POSIX
  guarantee, see docs/ARCHITECTURE.md, "SSD durability");
- ``data then index``: the two in turn.

Each variant runs on fresh unwritten extents and on extents written once before (a reused
range: no conversion). Variants interleave within each round. Prints medians and p90 per
round and variant, writes bench/out/ssd_sync.json. Speed is recorded, not asserted.

    .venv/bin/python bench/ssd_sync_bench.py --dir /var/tmp/kvstore-sync --rounds 5
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OUT_PATH = Path(__file__).resolve().parent / "out" / "ssd_sync.json"
MIB = 1 << 20


def _both_at_once(pool, data_fd: int, index_fd: int) -> None:
    data_synced = pool.submit(os.fdatasync, data_fd)
    os.fdatasync(index_fd)
    data_synced.result()


def _index_only(pool, data_fd: int, index_fd: int) -> None:
    os.fdatasync(index_fd)


def _data_then_index(pool, data_fd: int, index_fd: int) -> None:
    os.fdatasync(data_fd)
    os.fdatasync(index_fd)


VARIANTS = {"both at once": _both_at_once, "index only": _index_only,
            "data then index": _data_then_index}


def run_variant(directory: str, sync, object_bytes: int, puts: int, fresh: bool,
                buffer: mmap.mmap, pool) -> list[float]:
    """Sync times (ms) of ``puts`` object writes + record appends into new files."""
    data_path, index_path = os.path.join(directory, "data"), os.path.join(directory, "index")
    for path in (data_path, index_path):
        if os.path.exists(path):
            os.unlink(path)
    fd = os.open(data_path, os.O_CREAT | os.O_RDWR, 0o600)
    os.posix_fallocate(fd, 0, puts * object_bytes)
    os.close(fd)
    data_fd = os.open(data_path, os.O_RDWR | os.O_DIRECT)
    index_fd = os.open(index_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        if not fresh:       # every extent written once: no unwritten-extent conversion left
            for i in range(puts):
                os.pwritev(data_fd, [buffer], i * object_bytes)
            os.fsync(data_fd)
        times_ms = []
        for i in range(puts):
            os.pwritev(data_fd, [buffer], i * object_bytes)
            start = time.perf_counter()
            os.write(index_fd, b"r" * 64)
            sync(pool, data_fd, index_fd)
            times_ms.append((time.perf_counter() - start) * 1e3)
        return times_ms
    finally:
        os.close(data_fd)
        os.close(index_fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="a directory on the filesystem to test "
                                                     "(created, and removed at the end)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--puts", type=int, default=30, help="syncs per variant and round")
    parser.add_argument("--object-mib", type=int, default=4)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    object_bytes = args.object_mib * MIB
    buffer = mmap.mmap(-1, object_bytes)      # page-aligned, as O_DIRECT requires
    buffer.write(os.urandom(object_bytes))
    load = open("/proc/loadavg").read().split()[:3]
    results = []
    try:
        with ThreadPoolExecutor(1) as pool:
            for round_index in range(args.rounds):
                for fresh in (True, False):
                    for name, sync in VARIANTS.items():
                        times_ms = run_variant(args.dir, sync, object_bytes, args.puts, fresh,
                                               buffer, pool)
                        row = {"round": round_index, "extents": "fresh" if fresh else
                               "written before", "variant": name,
                               "median_ms": statistics.median(times_ms),
                               "p90_ms": sorted(times_ms)[int(len(times_ms) * 0.9)]}
                        results.append(row)
                        print(f"round {round_index} {row['extents']:>14} {name:>16}: median "
                              f"{row['median_ms']:6.2f} ms, p90 {row['p90_ms']:6.2f} ms",
                              flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    end_load = open("/proc/loadavg").read().split()[:3]
    print(f"load average {' '.join(load)} -> {' '.join(end_load)}")
    OUT_PATH.parent.mkdir(exist_ok=True)
    OUT_PATH.write_text(json.dumps({"load_avg": [load, end_load], "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
