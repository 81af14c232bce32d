"""A PD load's two ways in one process, interleaved: ``staged`` (one ``batch_get_into`` into
staging rows, its copy fused with the checksum, then the scatter: main's path before issue
15p, two passes) against ``in place`` (``kvstore.engine.in_place.load_in_place``: each block
hashed where it lies in the leased shm segment and scattered from there, one pass), for
both connectors (``paged``: ``PagedKVConnector`` on a ``[2, num_blocks, ...]`` CPU cache;
``dynamic``: ``DynamicCacheConnector`` rebuilding a transformers cache).

The KV is the PD demo's (8 layers, 4 KV heads, head_dim 64, fp32, blocks of 16 tokens) for
``--tokens`` tokens (2,048: 32 MiB), saved once into ``kvstore.local`` and loaded
``--repeats`` times each way, alternating which way goes first. ``thread CPU ms`` is the
loading thread's CPU time (``time.thread_time``), the figure that moves least when other
processes load the cores; wall ms is given too. ``memcpy`` is
``kvstore.demo.pd_worker.copy_gbps`` of the same bytes, between the repeats. Prints a
table, writes bench/out/engine_load_paths_bench.json.

    .venv/bin/python bench/engine_load_paths_bench.py [--tokens 2048] [--repeats 15]
                                                      [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kvstore
from kvstore import ops
from kvstore.client.reserve import prefault
from kvstore.demo.pd_worker import copy_gbps
from kvstore.engine import KeyNamespace, PagedKVConnector
from kvstore.engine.hf_connector import DynamicCacheConnector

OUT = Path(__file__).resolve().parent / "out" / "engine_load_paths_bench.json"
LAYERS, HEADS, HEAD_DIM, BLOCK = 8, 4, 64, 16


def paged_ways(store, num_blocks: int) -> dict:
    layers = [torch.randn(2, 2 * num_blocks, BLOCK, HEADS, HEAD_DIM) for _ in range(LAYERS)]
    paged = PagedKVConnector(store, layers, block_size=BLOCK,
                             namespace=KeyNamespace(model="bench-load-paths"))
    paged.warm_up(num_blocks)
    tokens = list(range(num_blocks * BLOCK))
    assert paged.save(tokens, list(range(num_blocks))) == num_blocks
    keys, pages = paged.keys_for(tokens), torch.arange(num_blocks, 2 * num_blocks)

    def staged() -> None:
        rows = paged._staging_rows(num_blocks)
        results = store.batch_get_into(keys, list(rows))
        assert all(r == paged.format.block_bytes for r in results)
        ops.scatter_rows_to_pages(rows, paged.layers, pages, layout=paged.format.layout)

    def in_place() -> None:
        assert paged._load_in_place(keys, pages) == (num_blocks, [])

    def check() -> None:
        for layer in layers:
            assert torch.equal(layer[:, num_blocks:], layer[:, :num_blocks])

    return {"staged": staged, "in place": in_place, "check": check}


def dynamic_ways(store, num_blocks: int) -> dict:
    from transformers import DynamicCache

    dynamic = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS,
                                    head_dim=HEAD_DIM, dtype=torch.float32, block_size=BLOCK,
                                    namespace=KeyNamespace(model="bench-load-paths-hf"))
    dynamic.warm_up(num_blocks)
    cache = DynamicCache()
    tokens = list(range(num_blocks * BLOCK))
    for layer in range(LAYERS):
        cache.update(torch.randn(1, HEADS, len(tokens), HEAD_DIM),
                     torch.randn(1, HEADS, len(tokens), HEAD_DIM), layer)
    assert dynamic.save_blocks(cache, tokens).failed_keys == []
    keys = dynamic.keys_for(tokens)
    last = {}

    def staged() -> None:
        rows = dynamic._rows(num_blocks)
        store.batch_get_into(keys, list(rows))
        last["cache"] = dynamic._cache_from_rows(rows, None)

    def in_place() -> None:
        last["cache"], result = dynamic._load_in_place(keys, None)
        assert result.num_tokens_loaded == len(tokens)

    def check() -> None:
        assert torch.equal(last["cache"].layers[5].values, cache.layers[5].values)

    return {"staged": staged, "in place": in_place, "check": check}


def measure(ways: dict, repeats: int, ceilings: list[float], num_bytes: int) -> dict:
    samples = {name: ([], []) for name in ("staged", "in place")}
    for r in range(-1, repeats):   # NOTE: repeat -1 is unrecorded: first touch of everything
        order = ("staged", "in place") if r % 2 else ("in place", "staged")
        for name in order:
            wall, cpu = time.perf_counter(), time.thread_time()
            ways[name]()
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            ways["check"]()
            if r >= 0:
                samples[name][0].append(wall * 1e3)
                samples[name][1].append(cpu * 1e3)
        if r >= 0:
            ceilings.append(copy_gbps(num_bytes))
    return {name: {"wall_ms_p50": statistics.median(wall), "wall_ms_min": min(wall),
                   "cpu_ms_p50": statistics.median(cpu), "cpu_ms_min": min(cpu)}
            for name, (wall, cpu) in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch (and kernel) threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_blocks = args.tokens // BLOCK
    num_bytes = num_blocks * LAYERS * 2 * BLOCK * HEADS * HEAD_DIM * 4
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    ceilings: list[float] = []
    rows = {}
    with kvstore.local(dram=f"{max(256, 4 * num_bytes >> 20)}MiB") as store:
        for connector, build in (("paged", paged_ways), ("dynamic", dynamic_ways)):
            ways = build(store, num_blocks)
            prefault(store)
            for way, figures in measure(ways, args.repeats, ceilings, num_bytes).items():
                rows[f"{connector} load, {way}"] = figures
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    memcpy_gbps = statistics.median(ceilings)
    print(f"{args.tokens} tokens = {num_bytes / 2**20:.1f} MiB per load, threads {args.threads}, "
          f"load average {' '.join(load_before)} -> {' '.join(load_after)}")
    print(f"{'row':24s} {'wall ms p50':>11s} {'min':>7s} {'x memcpy':>8s} "
          f"{'thread CPU ms p50':>17s} {'min':>6s}")
    for name, f in rows.items():
        f["x_memcpy"] = num_bytes / (f["wall_ms_p50"] / 1e3) / 1e9 / memcpy_gbps
        print(f"{name:24s} {f['wall_ms_p50']:11.2f} {f['wall_ms_min']:7.2f} "
              f"{f['x_memcpy']:8.2f} {f['cpu_ms_p50']:17.2f} {f['cpu_ms_min']:6.2f}")
    print(f"{'memcpy':24s} {memcpy_gbps:.2f} GB/s p50 (range {min(ceilings):.2f}-"
          f"{max(ceilings):.2f})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "loadavg": [load_before, load_after], "args": vars(args),
                               "bytes": num_bytes, "memcpy_gbps": ceilings, "rows": rows},
                              indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
