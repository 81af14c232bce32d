"""What bounds a verified shm read: memcpy alone, XXH3-64 alone, copy then hash (two passes,
the verification before issue 14's fused kernel), and the fused copy + hash
(``kvstore._copy_hash``), at 64 KiB and 4 MiB, on this CPU.

Each method copies from a source ring larger than the L3 (so sources come from memory, as a
get's segment does) into one destination buffer, as a get_into does; ``--pattern put``
copies one source into a ring of distinct destinations instead (a put's pattern: each put
lands in a fresh place of the pool). Beside them, where the tree has it,
``kvstore._copy_hash.copy`` (the shm transport's copy: non-temporal stores from 1 MiB) and
``ctypes.memmove`` (glibc's memcpy, what that transport used before). Methods alternate in
short slices so load drift hits all alike. Rates are bytes per CPU-second of the measuring
thread (``time.thread_time``): on a shared machine, time the thread spends descheduled would
otherwise swamp the differences. The table gives the median slice and range, and each method
against memcpy alone. Writes JSON with ``--json``.

    .venv/bin/python bench/copy_hash_bench.py --seconds 4 [--pattern get|put]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import numpy as np
import xxhash

import kvstore._copy_hash as _copy_hash
from kvstore._copy_hash import copy_hash

KIB, MIB = 1024, 1024 * 1024
RING_BYTES = 256 * MIB  # NOTE: well over the 32 MiB L3 here: sources are cold


def _methods():
    def memcpy(dst, src):
        np.copyto(dst, src)

    def hash_only(dst, src):
        xxhash.xxh3_64_intdigest(src)

    def copy_then_hash(dst, src):
        np.copyto(dst, src)
        xxhash.xxh3_64_intdigest(dst)

    def fused(dst, src):
        copy_hash(dst, src)

    def memmove(dst, src):
        ctypes.memmove(dst.ctypes.data, src.ctypes.data, src.nbytes)

    methods = {"memcpy": memcpy, "xxh3 only": hash_only, "copy then hash": copy_then_hash,
               "fused copy+hash": fused, "ctypes.memmove": memmove}
    if hasattr(_copy_hash, "copy"):   # NOTE: not in trees before issue 15m
        methods["_copy_hash.copy"] = _copy_hash.copy
    return methods


def measure(size: int, seconds: float, pattern: str = "get",
            num_slices: int = 7) -> dict[str, list[float]]:
    ring = np.random.default_rng(0).integers(0, 256, RING_BYTES, np.uint8)
    if pattern == "put":   # one source, distinct destinations (the ring)
        src_of = lambda at: ring[:size]  # noqa: E731
        dsts = np.ones(RING_BYTES, np.uint8)
        dst_of = lambda at: dsts[at * size:(at + 1) * size]  # noqa: E731
    else:                  # distinct sources, one destination
        one = np.empty(size, np.uint8)
        src_of = lambda at: ring[at * size:(at + 1) * size]  # noqa: E731
        dst_of = lambda at: one  # noqa: E731
    num_srcs = RING_BYTES // size
    methods = _methods()
    rates: dict[str, list[float]] = {name: [] for name in methods}
    slice_s = seconds / num_slices / len(methods)
    at = 0
    for _ in range(num_slices):
        for name, method in methods.items():
            n = 0
            t0 = time.thread_time()
            while True:
                src, dst = src_of(at), dst_of(at)
                at = (at + 1) % num_srcs
                method(dst, src)
                n += 1
                elapsed = time.thread_time() - t0
                if elapsed >= slice_s and n >= 3:
                    break
            rates[name].append(n * size / elapsed / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per size, all methods")
    parser.add_argument("--pattern", choices=("get", "put"), default="get",
                        help="get: distinct sources into one buffer; put: one source into "
                             "distinct places")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    results = {"loadavg": load, "pattern": args.pattern, "sizes": {}}
    print(f"load average {' '.join(load)}, pattern {args.pattern}")
    print(f"{'size':>7s} {'method':>16s} {'GB/cpu-s':>8s} {'range':>13s} {'vs memcpy':>9s}")
    for size, label in ((64 * KIB, "64KiB"), (4 * MIB, "4MiB")):
        rates = measure(size, args.seconds, args.pattern)
        base = statistics.median(rates["memcpy"])
        results["sizes"][label] = {}
        for name, values in rates.items():
            median = statistics.median(values)
            results["sizes"][label][name] = {"GB_per_cpu_s": median, "min": min(values),
                                             "max": max(values)}
            print(f"{label:>7s} {name:>16s} {median:8.2f} {min(values):6.2f}-{max(values):<6.2f}"
                  f" {median / base - 1:+8.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
