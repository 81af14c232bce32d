"""``kvstore bench kernels``: GB/s of kvstore.ops on a realistic paged cache (the code of
bench/kernels_bench.py, which now calls this command).

Cache: 32 layers of [num_blocks, 2, 16, 8, 128] (``--layout block_first``, vLLM's; or
``kv_first``: [2, num_blocks, ...]) in ``--dtype`` (bf16 by default), 256 random pages moved
(512 MiB in bf16), on ``--device`` (cpu, cuda, or all: cpu and, where present, cuda). For
gather, scatter, quantize, dequantize and the fused forms it prints GB/s beside two references
measured in the same run, interleaved round by round so that load from other processes hits
all of them alike: a single-thread memcpy of the same bytes (the ceiling; a device-to-device
copy on CUDA), as a ratio, and the plain-torch way (index_select / index_copy_ / torch
arithmetic). GB/s counts the cache-side bytes (read by gather and quantize, written by scatter
and dequantize). Writes ``--json`` and prints PASS/MISS for the targets of issue 4 (exit
status 0 either way: speed is recorded here, not asserted).
"""

from __future__ import annotations

import ctypes
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import click

import torch

from kvstore import ops

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}



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
        libc = ctypes.CDLL(None)
        libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        calls["memcpy (1 thread)"] = lambda: libc.memcpy(dst.data_ptr(), src.data_ptr(), src.nbytes)
    else:
        calls["device copy (D2D)"] = lambda: dst.copy_(src)
    return calls, buf.nbytes


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


def _time_s(call: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(args, progress=None, partial: list | None = None) -> dict:
    """Measure every op of ``args.device`` and return the result document. The samples are
    kept in ``partial`` (appended before the first round) as they come, so that a Ctrl-C
    can still report them (``summarize``); ``progress`` gets ``update(1)`` per op timed."""
    layers, ids = _cache(args)
    calls, num_bytes = _ops(layers, ids, args)
    if args.only:  # the ceiling always runs: every figure is compared with it
        keep = set(args.only.split(",")) | {"memcpy", "device copy"}
        calls = {name: call for name, call in calls.items() if name.split(" (")[0] in keep}
    for call in calls.values():  # warm up: first touch, thread start, lazy loads
        call()
    times_s: dict[str, list[float]] = {name: [] for name in calls}
    state = {"args": args, "num_bytes": num_bytes, "times_s": times_s}
    if partial is not None:
        partial.append(state)
    for _ in range(args.rounds):
        for name, call in calls.items():
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
        best, median = min(samples), statistics.median(samples)
        rows.append({"op": name, "best_s": best, "median_s": median, "rounds": len(samples),
                     "gbps": num_bytes / best / 1e9, "median_gbps": num_bytes / median / 1e9})
    ceiling = next((r for r in rows if r["op"] in ("memcpy (1 thread)", "device copy (D2D)")),
                   None)
    for r in rows:
        r["pct_of_ceiling"] = None if ceiling is None else 100.0 * r["gbps"] / ceiling["gbps"]
    return {"device": args.device, "layout": args.layout, "dtype": args.dtype,
            "num_bytes": num_bytes, "threads": torch.get_num_threads(),
            "config": {k: getattr(args, k) for k in ("num_layers", "num_blocks", "block_size",
                                                     "num_heads", "head_dim", "num_pages",
                                                     "rounds")},
            "ceiling": None if ceiling is None else ceiling["op"], "rows": rows}


def check_targets(result: dict) -> list[tuple[str, bool, str]]:
    pct = {r["op"]: r["pct_of_ceiling"] for r in result["rows"]
           if r["pct_of_ceiling"] is not None}
    if result["device"] == "cpu":
        goals = [("gather", 70), ("scatter", 70), ("gather_quantize", 50)]
    else:
        goals = [("gather", 80), ("scatter", 80)]
    return [(f"{op} >= {goal}% of {result['ceiling']}", pct[op] >= goal, f"{pct[op]:.0f}%")
            for op, goal in goals if op in pct]  # ops left out with --only are not judged


def _print(result: dict, rounds: int) -> None:
    print(f"kvstore.ops on {result['device']}, {result['layout']} {result['dtype']}, "
          f"{result['threads']} threads, {result['num_bytes'] / 2**20:.0f} MiB per call, "
          f"best (median) of {rounds}")
    print(f"{'op':<30}{'GB/s':>8}{'median':>9}{'% ceiling':>11}")
    for r in result["rows"]:
        pct = "" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.0f}%"
        print(f"{r['op']:<30}{r['gbps']:>8.2f}{r['median_gbps']:>9.2f}{pct:>11}")
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
    """GB/s of gather/scatter/quantize by layout and dtype, beside the memcpy ceiling."""
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
