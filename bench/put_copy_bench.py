"""The copy of a same-host 4 MiB put on its own, one thread against two (issue 15, 15q):
one source into ``--dests`` distinct destinations, cycled (a put's pattern), each kernel
beside the memcpy ceilings measured in the same run.

Rows: ``memcpy 1 thread`` (numpy copyto, glibc: client_bench.py's put ceiling),
``memcpy 2 threads`` (two persistent threads, one half each, meeting at a barrier per copy:
client_bench.py's two-thread ceiling), ``copy`` (``kvstore._copy_hash.copy``, the shm
write of a PutStart put: non-temporal stores) with ``num_threads`` 1 and 2 (the helper of
csrc/cpu/copy_split.h), ``put_copy_hash`` (``put_copy_hash_many``, a reserved put's copy +
XXH3) with 1 and 2, and ``copy_hash`` (the reads' build, plain stores). Rounds interleave
the rows; each cell is the median of the rounds' p50 GB/s (min-max over rounds), and p10
(the fastest tenth of the copies: on a loaded machine, the copies that ran undisturbed).
Prints the load average; writes bench/out/put_copy.json.

    .venv/bin/python bench/put_copy_bench.py [--rounds 5] [--copies 128] [--size 4194304]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from kvstore._copy_hash import copy, copy_hash_many, put_copy_hash_many

OUT = Path(__file__).resolve().parent / "out" / "put_copy.json"


def _two_thread_memcpy(src: np.ndarray):
    """A copy function ``fn(dst)`` whose second half a persistent helper copies (numpy
    copyto releases the GIL), and the function that stops the helper."""
    half = src.nbytes // 2
    start, finish = threading.Barrier(2), threading.Barrier(2)
    job: list = [None]

    def helper() -> None:
        while True:
            start.wait()
            if job[0] is None:
                return
            np.copyto(job[0][half:], src[half:])
            finish.wait()

    thread = threading.Thread(target=helper, daemon=True)
    thread.start()

    def run(dst: np.ndarray) -> None:
        job[0] = dst
        start.wait()
        np.copyto(dst[:half], src[:half])
        finish.wait()

    def stop() -> None:
        job[0] = None
        start.wait()
        thread.join()
    return run, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--copies", type=int, default=128, help="timed copies per row per round")
    parser.add_argument("--size", type=int, default=4 << 20)
    parser.add_argument("--dests", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, args.size, dtype=np.uint8)
    dests = [np.ones(args.size, dtype=np.uint8) for _ in range(args.dests)]
    two_memcpy, stop = _two_thread_memcpy(src)
    rows = {
        "memcpy 1 thread": lambda dst: np.copyto(dst, src),
        "memcpy 2 threads": two_memcpy,
        "copy, 1 thread": lambda dst: copy(dst, src, 1),
        "copy, 2 threads": lambda dst: copy(dst, src, 2),
        "put_copy_hash, 1 thread": lambda dst: put_copy_hash_many([dst], [src], 1),
        "put_copy_hash, 2 threads": lambda dst: put_copy_hash_many([dst], [src], 2),
        "copy_hash (reads' build)": lambda dst: copy_hash_many([dst], [src]),
    }
    for fn in rows.values():       # touch every page once, warm the code
        for dst in dests:
            fn(dst)
    p50s: dict[str, list[float]] = {name: [] for name in rows}
    p10s: dict[str, list[float]] = {name: [] for name in rows}
    loads = []
    for _ in range(args.rounds):
        loads.append(Path("/proc/loadavg").read_text().split()[:3])
        for name, fn in rows.items():
            samples = []
            for i in range(args.copies):
                dst = dests[i % len(dests)]
                started = time.perf_counter()
                fn(dst)
                samples.append(time.perf_counter() - started)
            samples.sort()
            p50s[name].append(args.size / samples[len(samples) // 2] / 1e9)
            p10s[name].append(args.size / samples[len(samples) // 10] / 1e9)
    stop()

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"
    print(f"\n{args.size >> 10} KiB from one source into {args.dests} places, GB/s, "
          f"median of {args.rounds} rounds (min-max)")
    print(f"{'row':28s}{'p50':>22s}{'p10':>22s}{'x memcpy 1t':>13s}{'x memcpy 2t':>13s}")
    one = statistics.median(p50s["memcpy 1 thread"])
    two = statistics.median(p50s["memcpy 2 threads"])
    for name in rows:
        p50 = statistics.median(p50s[name])
        print(f"{name:28s}{cell(p50s[name]):>22s}{cell(p10s[name]):>22s}"
              f"{p50 / one:13.2f}{p50 / two:13.2f}")
    print("\nload averages before each round:", loads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"size": args.size, "p50_GBps": p50s, "p10_GBps": p10s,
                               "loadavg": loads}, indent=1))
    print(f"JSON: {OUT}")


if __name__ == "__main__":
    main()
