"""A 4 MiB SSD put's disk part into unwritten against written extents (issue 9, 9s: why a
fresh data file is pre-written, kvstore/daemon/ssd_prewrite.py).

In ``--dir``, one O_DIRECT data file is preallocated (``posix_fallocate``: unwritten extents,
as ``kvstore-ssd.data`` is) and its second half written once (written extents). Each round
then "puts" one object of 4 MiB into each half, in turn (the order alternating per round):
the write as the SSD tier's stream does it (1 MiB pieces, 4 in flight on a thread pool), then
one 64-byte record appended to an index file and the data file and the index fdatasync'ed at
once (``SsdBackend.sync``). Prints the medians and quartiles of the write, the sync and the
total per kind, and the load average; writes bench/out/ssd_extents.json. Speed is recorded,
not asserted.

    .venv/bin/python bench/ssd_extents_bench.py --dir /var/tmp/kvstore-extents --rounds 60
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIB = 1 << 20
OBJECT_BYTES = 4 * MIB
PIECE_BYTES = MIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="a directory on the disk to measure")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "out" /
                                              "ssd_extents.json"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    data_path, index_path = Path(args.dir) / "extents.data", Path(args.dir) / "extents.index"
    load = open("/proc/loadavg").read().split()[:3]
    data = os.open(data_path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_DIRECT, 0o600)
    index = os.open(index_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_APPEND, 0o600)
    half = args.rounds * OBJECT_BYTES
    pieces = [mmap.mmap(-1, PIECE_BYTES) for _ in range(OBJECT_BYTES // PIECE_BYTES)]
    for piece in pieces:
        piece.write(os.urandom(PIECE_BYTES))
    pool = ThreadPoolExecutor(8)
    times: dict[str, dict[str, list[float]]] = {
        kind: {"write_ms": [], "sync_ms": [], "total_ms": []} for kind in ("unwritten", "written")}
    try:
        os.posix_fallocate(data, 0, 2 * half)
        for offset in range(half, 2 * half, PIECE_BYTES):     # the written half
            os.pwritev(data, [pieces[0]], offset)
        os.fdatasync(data)

        def put(kind: str, offset: int) -> None:
            t0 = time.perf_counter()
            list(pool.map(lambda i: os.pwritev(data, [pieces[i]], offset + i * PIECE_BYTES),
                          range(len(pieces))))
            t1 = time.perf_counter()
            os.write(index, b"r" * 64)
            data_synced = pool.submit(os.fdatasync, data)
            os.fdatasync(index)
            data_synced.result()
            t2 = time.perf_counter()
            for name, seconds in (("write_ms", t1 - t0), ("sync_ms", t2 - t1),
                                  ("total_ms", t2 - t0)):
                times[kind][name].append(seconds * 1e3)

        for r in range(args.rounds):
            order = (("unwritten", 0), ("written", half))
            for kind, base in (order if r % 2 else order[::-1]):
                put(kind, base + r * OBJECT_BYTES)
    finally:
        pool.shutdown()
        os.close(data)
        os.close(index)
        data_path.unlink(missing_ok=True)
        index_path.unlink(missing_ok=True)
    print(f"load average {' '.join(load)}; {args.rounds} rounds, 4 MiB each, ms: median "
          f"(quartiles)")
    summary = {}
    for kind, stages in times.items():
        summary[kind] = {}
        cells = []
        for name, values in stages.items():
            q1, median, q3 = statistics.quantiles(values, n=4)
            summary[kind][name] = {"median": median, "q1": q1, "q3": q3}
            cells.append(f"{name[:-3]} {median:.2f} ({q1:.2f}-{q3:.2f})")
        print(f"{kind:10s} " + "  ".join(cells))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"load_avg": load, "summary": summary,
                                           "times": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
