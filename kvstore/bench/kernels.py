"""``kvstore bench kernels``: GB/s of kvstore.ops on a realistic paged cache (the code of
bench/kernels_bench.py, which now calls this command).

Cache: 32 layers of [num_blocks, 2, 16, 8, 128] (``--layout block_first``, vLLM's; or
``kv_first``: [2, num_blocks, ...]) in ``--dtype`` (bf16 by default), 256 random pages moved
(512 MiB in bf16), on ``--device`` (cpu, cuda, or all: cpu and, where present, cuda). For
gather, scatter, quantize, dequantize and the fused forms it prints GB/s beside references
measured in the same run, interleaved round by round so that load from other processes hits
all of them alike, and the plain-torch way (index_select / index_copy_ / torch arithmetic).

Ceilings (copies of the same bytes between distinct buffers larger than the caches, so every
line is cold): on CPU, torch ``copy_`` and a memcpy split over ``torch.get_num_threads()``
threads (the threads the kernels use), and a single-thread memcpy; on CUDA, a device-to-device
copy. Every figure is shown as a ratio of the best of them ("best copy", the verdict) and as a
percentage of the single-thread memcpy (the figure the one-thread rows are judged by). GB/s
counts the cache-side bytes (read by gather and quantize, written by scatter and dequantize).
Writes ``--json`` and prints PASS/MISS for the targets of issue 15 (exit status 0 either way:
speed is recorded here, not asserted).
"""

from __future__ import annotations

import ctypes
import json
from concurrent.futures import ThreadPoolExecutor
import statistics
import time
from pathlib import Path
from typing import Callable

import click

import torch

from kvstore import ops

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Ops that copy the same bytes between plain buffers: the references every figure is a ratio
# of (the best of them is the verdict's "best copy"; the first one found is the 1-thread
# ceiling of the "% ceiling" column).
ONE_THREAD_CEILINGS = ("memcpy (1 thread)", "device copy (D2D)")
COPY_PREFIXES = ("memcpy", "torch copy_", "device copy")
SETTLE_S = 0.02  # idle before each timed call (see run)

def _cache(args) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    page = (args.block_size, args.num_heads, args.head_dim)
    shape = ((args.num_blocks, 2, *page) if args.layout == "block_first"
             else (2, args.num_blocks, *page))
    layers = [torch.randn(shape, generator=gen).to(DTYPES[args.dtype]).to(args.device)
              for _ in range(args.num_layers)]
    ids = torch.randperm(args.num_blocks, generator=gen)[: args.num_pages]
    return layers, ids


def _ops(layers, ids, args) -> tuple[dict[str, Callable[[], object]], int]:
    """name -> one call; and the cache-side bytes each call moves."""
    device = args.device
    buf = ops.gather_pages(layers, ids)                    # also the scatter source
    out = torch.empty_like(buf)
    q, scales = ops.gather_quantize(layers, ids)
    q_out, s_out = torch.empty_like(q), torch.empty_like(scales)
    deq_out = torch.empty_like(buf)
    src, dst = buf.clone(), torch.empty_like(buf)
    dev_ids = ids.to(device)
    group = args.head_dim
    kv_views = ([t.transpose(0, 1) for t in layers]        # [2, blocks, ...] for index_select
                if args.layout == "block_first" else layers)
    torch_out = torch.empty_like(buf)
    calls = {
        "gather": lambda: ops.gather_pages(layers, ids, out=out),
        "scatter": lambda: ops.scatter_pages(buf, layers, ids),
        "quantize": lambda: torch.ops.kvstore.quantize_int8(buf, q_out, s_out),
        "dequantize": lambda: torch.ops.kvstore.dequantize_int8(q, scales, deq_out),
        "gather_quantize": lambda: ops.gather_quantize(layers, ids, q_out=q_out, scales_out=s_out),
        "dequantize_scatter": lambda: ops.dequantize_scatter(q, scales, layers, ids),
        "torch gather (index_select)": lambda: [
            torch.index_select(v, 1, dev_ids, out=torch_out[i]) for i, v in enumerate(kv_views)],
        "torch scatter (index_copy_)": lambda: [
            v.index_copy_(1, dev_ids, buf[i]) for i, v in enumerate(kv_views)],
        "torch quantize": lambda: _torch_quantize(buf, group),
    }
    if device == "cpu":  # the same kernels held to one thread, beside the 1-thread ceiling
        calls["gather (1 thread)"] = _one_thread(calls["gather"])
        calls["gather_quantize (1 thread)"] = _one_thread(calls["gather_quantize"])
        calls["scatter (1 thread)"] = _one_thread(calls["scatter"])
        num_threads = torch.get_num_threads()
        calls["memcpy (1 thread)"] = _threaded_memcpy(dst, src, 1)
        if num_threads > 1:
            calls[f"memcpy ({num_threads} threads)"] = _threaded_memcpy(dst, src, num_threads)
        calls["torch copy_"] = lambda: dst.copy_(src)
    else:
        calls["device copy (D2D)"] = lambda: dst.copy_(src)
    return calls, buf.nbytes


def _threaded_memcpy(dst: torch.Tensor, src: torch.Tensor,
                     num_threads: int) -> Callable[[], None]:
    """libc memcpy of src into dst in num_threads contiguous slices, the last on the calling
    thread (ctypes releases the GIL, so the slices run in parallel). NOTE: the pool starts
    once, here, so no round pays for thread start-up; each slice is copied the way glibc
    picks for its size."""
    libc = ctypes.CDLL(None)
    memcpy = libc.memcpy
    memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    step = -(-src.nbytes // num_threads // 64) * 64  # cache-line aligned slices
    slices = [(dst.data_ptr() + o, src.data_ptr() + o, min(step, src.nbytes - o))
              for o in range(0, src.nbytes, step)]
    if len(slices) == 1:
        return lambda: memcpy(*slices[0])
    pool = ThreadPoolExecutor(len(slices) - 1, thread_name_prefix="bench-memcpy")

    def run():
        futures = [pool.submit(memcpy, *args) for args in slices[:-1]]
        memcpy(*slices[-1])
        for f in futures:
            f.result()
    return run


def _one_thread(call: Callable[[], object]) -> Callable[[], object]:
    def run():
        num_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # kvstore.ops sizes its CPU thread count from torch's
        try:
            return call()
        finally:
            torch.set_num_threads(num_threads)
    return run


def _torch_quantize(x: torch.Tensor, group: int):
    xf = x.float().reshape(-1, group)
    scale = xf.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(xf / scale.clamp_min(1e-30)).clamp(-127, 127).to(torch.int8), scale


def _time_s(call: Callable[[], object], device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread of this process) of one call."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def run(args, progress=None, partial: list | None = None) -> dict:
    """Measure every op of ``args.device`` and return the result document. The samples are
    kept in ``partial`` (appended before the first round) as they come, so that a Ctrl-C
    can still report them (``summarize``); ``progress`` gets ``update(1)`` per op timed."""
    layers, ids = _cache(args)
    calls, num_bytes = _ops(layers, ids, args)
    if args.only:  # the ceilings always run: every figure is compared with them
        keep = set(args.only.split(",")) | {"memcpy", "torch copy_", "device copy"}
        calls = {name: call for name, call in calls.items() if name.split(" (")[0] in keep}
    for call in calls.values():  # warm up: first touch, thread start, lazy loads
        call()
    times_s: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    state = {"args": args, "num_bytes": num_bytes, "times_s": times_s}
    if partial is not None:
        partial.append(state)
    for _ in range(args.rounds):
        for name, call in calls.items():
            # NOTE: torch's OpenMP workers spin for a while after each parallel region (torch
            # copy_, index_select, ...): timed right after one, an op shared the cores with
            # them (measured: 15% fewer GB per CPU-second for a gather after torch copy_ than
            # after a memcpy). Idle time, untimed, lets them sleep first.
            time.sleep(SETTLE_S)
            times_s[name].append(_time_s(call, args.device))
            if progress is not None:
                progress.update(1)
    return summarize(state)


def summarize(state: dict) -> dict:
    """The result document of ``run`` from the samples so far (ops not yet timed left out;
    ``pct_of_ceiling`` None while the ceiling has no sample)."""
    args, num_bytes = state["args"], state["num_bytes"]
    rows = []
    for name, samples in state["times_s"].items():
        if not samples:
            continue
        wall = [w for w, _ in samples]
        best, median = min(wall), statistics.median(wall)
        # NOTE: GB per CPU-second (all threads) stays comparable when other processes take
        # the cores: a preempted round loses wall time, not CPU time. Threads that spin
        # waiting (torch's OpenMP pool) count too, so it favours nothing over the kernels.
        cpu_s = statistics.median(c for _, c in samples)
        rows.append({"op": name, "best_s": best, "median_s": median, "rounds": len(samples),
                     "gbps": num_bytes / best / 1e9, "median_gbps": num_bytes / median / 1e9,
                     "median_cpu_s": cpu_s, "gb_per_cpu_s": num_bytes / max(cpu_s, 1e-9) / 1e9})
    ceiling = next((r for r in rows if r["op"] in ONE_THREAD_CEILINGS), None)
    copies = [r for r in rows if r["op"].startswith(COPY_PREFIXES)]
    best = max(copies, key=lambda r: r["gbps"]) if copies else None
    best_median = max((r["median_gbps"] for r in copies), default=None)
    for r in rows:   # None while a Ctrl-C came before the ceiling or the copies had a sample
        r["pct_of_ceiling"] = None if ceiling is None else 100.0 * r["gbps"] / ceiling["gbps"]
        r["of_best_copy"] = None if best is None else r["gbps"] / best["gbps"]
        r["median_of_best_copy"] = None if best is None else r["median_gbps"] / best_median
    return {"device": args.device, "layout": args.layout, "dtype": args.dtype,
            "num_bytes": num_bytes, "threads": torch.get_num_threads(),
            "config": {k: getattr(args, k) for k in ("num_layers", "num_blocks", "block_size",
                                                     "num_heads", "head_dim", "num_pages",
                                                     "rounds")},
            "ceiling": None if ceiling is None else ceiling["op"],
            "best_copy": None if best is None else best["op"], "rows": rows}


def check_targets(result: dict) -> list[tuple[str, bool, str]]:
    """Issue 15's targets, as ratios of the best copy measured in the same run."""
    ratio = {r["op"]: r["of_best_copy"] for r in result["rows"]
             if r["of_best_copy"] is not None}
    if result["device"] == "cpu":
        goals = [("gather", 0.8), ("scatter", 0.8), ("gather_quantize", 0.6)]
    else:
        goals = [("gather", 0.8), ("scatter", 0.8)]
    return [(f"{op} >= {goal:.1f}x {result['best_copy']}", ratio[op] >= goal,
             f"{ratio[op]:.2f}x") for op, goal in goals if op in ratio]  # --only may omit ops


def _print(result: dict, rounds: int) -> None:
    print(f"kvstore.ops on {result['device']}, {result['layout']} {result['dtype']}, "
          f"{result['threads']} threads, {result['num_bytes'] / 2**20:.0f} MiB per call, "
          f"best (median) of {rounds}")
    print(f"best copy: {result['best_copy']}; ceiling: {result['ceiling']}")
    print(f"{'op':<30}{'GB/s':>8}{'median':>9}{'x best copy':>13}{'(median)':>10}"
          f"{'% ceiling':>11}{'GB/cpu-s':>10}")
    for r in result["rows"]:
        def fmt(value, spec, suffix=""):
            return "" if value is None else f"{value:{spec}}{suffix}"
        print(f"{r['op']:<30}{r['gbps']:>8.2f}{r['median_gbps']:>9.2f}"
              f"{fmt(r['of_best_copy'], '.2f', 'x'):>13}"
              f"{fmt(r['median_of_best_copy'], '.2f', 'x'):>10}"
              f"{fmt(r['pct_of_ceiling'], '.0f', '%'):>11}{r['gb_per_cpu_s']:>10.2f}")
    for name, ok, detail in check_targets(result):
        print(f"{'PASS' if ok else 'MISS'}  {name}: {detail}")
    print()


@click.command("kernels")
@click.option("--device", type=click.Choice(["cpu", "cuda", "all"]), default="cpu",
              show_default=True, help="all: cpu, and cuda where present.")
@click.option("--layout", type=click.Choice(["block_first", "kv_first"]), default="block_first",
              show_default=True, help="Per-layer cache layout.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bfloat16",
              show_default=True, help="Cache dtype.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds per op (best and median kept).")
@click.option("--num-layers", type=click.IntRange(min=1), default=32, show_default=True,
              help="Layers of the cache.")
@click.option("--num-blocks", type=click.IntRange(min=1), default=320, show_default=True,
              help="Blocks per layer.")
@click.option("--block-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens per block.")
@click.option("--num-heads", type=click.IntRange(min=1), default=8, show_default=True,
              help="KV heads.")
@click.option("--head-dim", type=click.IntRange(min=1), default=128, show_default=True,
              help="Head dimension (also the INT8 group).")
@click.option("--num-pages", type=click.IntRange(min=1), default=256, show_default=True,
              help="Random pages moved per call (at most --num-blocks).")
@click.option("--only", default="", help="Comma-separated op names (default: all).")
@click.option("--json", "json_path", default="bench/out/kernels.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write every figure.")
def command(json_path: str, **options) -> None:
    """GB/s of gather/scatter/quantize by layout and dtype, beside the best plain copy."""
    import argparse
    import sys

    if options["num_pages"] > options["num_blocks"]:
        raise click.BadParameter("--num-pages must be at most --num-blocks")
    if options["device"] == "all":
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    else:
        devices = [options["device"]]
    if "cuda" in devices and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device (or a CPU build of torch)")
    from tqdm import tqdm

    results, partial = [], []
    interrupted = False
    progress = tqdm(total=None, desc="bench kernels", unit="op", leave=False)
    try:
        for device in devices:
            args = argparse.Namespace(**{**options, "device": device})
            results.append(run(args, progress, partial))
    except KeyboardInterrupt:
        # NOTE: like `bench transfer`: what was measured is printed and written, exit 130
        interrupted = True
        if len(partial) > len(results):
            results.append(summarize(partial[-1]))
        results = [r for r in results if r["rows"]]
        progress.write(f"\ninterrupted: {sum(len(r['rows']) for r in results)} op(s) "
                       "measured so far")
    finally:
        progress.close()
    for result in results:
        _print(result, options["rounds"])
    out = {"command": sys.argv, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "interrupted": interrupted, "results": results,
           **(results[0] if results else {})}  # NOTE: results[0] flat: older readers of the JSON
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(out, indent=2))
    print(f"wrote {json_path}")
    if interrupted:
        raise SystemExit(130)
