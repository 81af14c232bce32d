"""The in-place copies of a PD handover on one thread and on two (issue 15's engine path,
15e2): the fused gather + XXH3 of a save (``gather_pages_to_rows(checksums=True)``) and the
verified scatter of a load (``scatter_rows_to_pages(checksums=...)``), ``--tokens`` tokens of
the PD demo's KV (8 layers, 4 KV heads, head_dim 64, fp32: 16 KiB a token, 32 MiB for
2,048), against the same run's cold memcpy of those bytes (``pd_worker.copy_gbps``: numpy,
one thread, best of several) and a two-thread memcpy (torch ``copy_`` on 2 threads).

Cold: the pages come from a cache of 4x the request, the rows are 128 separate 256 KiB
buffers (as a reservation's ranges), and each repeat takes the next request's pages, so no
cache level holds them. Rounds interleave the thread counts. Reports the p50 and the best
(min) of each, in ms and as x of the memcpy's time; on a shared machine the best is the
least disturbed figure. No store: the kernels alone. Writes
bench/out/engine_copy_threads_bench.json.

    .venv/bin/python bench/engine_copy_threads_bench.py [--tokens 2048] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvstore.demo.pd_worker import copy_gbps
from kvstore.ops.rows import gather_pages_to_rows, row_nbytes, scatter_rows_to_pages

OUT = Path(__file__).resolve().parent / "out" / "engine_copy_threads_bench.json"
LAYERS, HEADS, HEAD_DIM, BLOCK = 8, 4, 64, 16
NUM_SETS = 4   # requests' worth of pages in the cache: each repeat takes the next set


def two_thread_copy_s(num_bytes: int, repeats: int) -> float:
    """Best seconds of torch ``copy_`` of num_bytes on 2 intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    src, dst = torch.ones(num_bytes, dtype=torch.uint8), torch.zeros(num_bytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(before)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)   # NOTE: the kernels' threads come from num_threads alone
    num_blocks = args.tokens // BLOCK
    layers = [torch.randn(2, NUM_SETS * num_blocks, BLOCK, HEADS, HEAD_DIM)
              for _ in range(LAYERS)]
    row_bytes = row_nbytes(layers)
    rows = [torch.empty(row_bytes, dtype=torch.uint8) for _ in range(num_blocks)]
    views = [memoryview(row.numpy()) for row in rows]
    for row in rows:
        row.fill_(0)
    num_bytes = num_blocks * row_bytes
    load_before = open("/proc/loadavg").read().split()[:3]
    samples: dict[str, list[float]] = {f"{op} {n}t": [] for op in ("gather+hash", "scatter")
                                       for n in (1, 2)}
    ceilings = []
    for r in range(args.rounds):
        for threads in (1, 2) if r % 2 == 0 else (2, 1):
            ids = torch.arange(num_blocks) + (r * 2 + threads) % NUM_SETS * num_blocks
            started = time.perf_counter()
            sums = gather_pages_to_rows(layers, ids, views, checksums=True,
                                        num_threads=threads)
            samples[f"gather+hash {threads}t"].append(time.perf_counter() - started)
            back = torch.arange(num_blocks) + (r * 2 + threads + 1) % NUM_SETS * num_blocks
            started = time.perf_counter()
            ok = scatter_rows_to_pages(views, layers, back, checksums=sums, num_threads=threads)
            samples[f"scatter {threads}t"].append(time.perf_counter() - started)
            if not all(ok):
                raise SystemExit("a verified scatter refused its own rows")
        if r % 3 == 0:
            ceilings.append(copy_gbps(num_bytes))
    two_copy_s = two_thread_copy_s(num_bytes, 10)
    load_after = open("/proc/loadavg").read().split()[:3]
    memcpy_gbps = max(ceilings)
    memcpy_ms = num_bytes / memcpy_gbps / 1e6
    print(f"{args.tokens} tokens = {num_bytes / 2**20:.1f} MiB, load average "
          f"{' '.join(load_before)} -> {' '.join(load_after)}; cold memcpy (1 thread) best "
          f"{memcpy_gbps:.2f} GB/s = {memcpy_ms:.2f} ms, torch copy_ on 2 threads best "
          f"{two_copy_s * 1e3:.2f} ms")
    print(f"{'row':16} {'ms p50':>7} {'ms best':>8} {'x memcpy p50':>13} {'x memcpy best':>14}")
    table = {}
    for name, seconds in samples.items():
        p50_ms, best_ms = 1e3 * statistics.median(seconds), 1e3 * min(seconds)
        table[name] = {"ms_p50": p50_ms, "ms_best": best_ms, "x_memcpy_p50": memcpy_ms / p50_ms,
                       "x_memcpy_best": memcpy_ms / best_ms}
        print(f"{name:16} {p50_ms:7.2f} {best_ms:8.2f} {memcpy_ms / p50_ms:13.2f} "
              f"{memcpy_ms / best_ms:14.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg": [load_before, load_after], "args": vars(args) | {"out": str(args.out)},
        "bytes": num_bytes, "memcpy_gbps": ceilings, "two_thread_copy_ms": two_copy_s * 1e3,
        "rows": table, "samples_s": samples}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
