"""The measured inputs of docs/SCALING.md: the master's metadata bytes per object, and its
in-process key rates on one core.

For each object count it builds the master's state in this process (``MasterService`` over
``MasterState``, the code ``kvstore master`` runs, no transport), registers ``--nodes`` nodes,
stores the objects through PutStart/PutEnd in batches of 1024 with engine-style keys
(``vllm/<model>/<layout>/b2v1c16/<32 hex>``, 82 characters, what ``kvstore.engine.keys``
makes), drains each node's change log with heartbeats (as the daemons' acknowledgements do),
reads every key once with GetReplicas (which caches a reply row per object) and reports:

- ``tracemalloc`` bytes per object (Python allocations still held, counted exactly; slow:
  only for counts up to ``--tracemalloc-max``), and
- RSS growth per object (/proc/self/statm: what the operating system sees, allocator slack
  included; the figure to size a machine with),
- the in-process keys/s of put_start+put_end, get_replicas and exists at batch 1024 on one
  core (``kvstore.bench.master.in_process_ceiling``: the most one master process can do).

Usage: ``.venv/bin/python bench/scaling_bench.py`` (10^5 and 10^6 objects, about a minute
on a quiet machine; ``--objects 100000`` for a quick run). Prints a table, writes ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import sys
import time
import tracemalloc
from pathlib import Path

BATCH_KEYS = 1024
VALUE_BYTES = 256 * 1024   # one KV block of 16 tokens of a 7B-class model in bf16 (~8 MiB/32)


def engine_key(i: int) -> str:
    """A key of the shape kvstore.engine.keys produces (prefix, namespace, scheme, digest)."""
    return f"vllm/llama-3-8b/paged-bfloat16-raw-tp0of1/b2v1c16/{i:032x}"


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def build(num_objects: int, num_nodes: int) -> tuple[object, float]:
    """A master service holding ``num_objects`` COMPLETE objects, read once; and the
    seconds the puts took."""
    from kvstore.master.config import MasterConfig
    from kvstore.master.service import MasterService
    from kvstore.master.state import MasterState
    from kvstore.v1 import master_pb2 as pb

    service = MasterService(MasterState(MasterConfig(), 0.0))
    for n in range(num_nodes):
        service.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(
            node_id=f"node{n}", host_id=f"host{n}", data_addr=f"10.0.0.{n}:7000",
            segments=[pb.SegmentInfo(segment_id="dram0", tier=pb.TIER_DRAM,
                                     capacity_bytes=1 << 50, shm_name=f"/kv{n}")])), 0.0)
    started_s = time.perf_counter()
    for lo in range(0, num_objects, BATCH_KEYS):
        keys = [engine_key(i) for i in range(lo, min(num_objects, lo + BATCH_KEYS))]
        service.PutStart(pb.PutStartRequest(keys=keys, sizes=[VALUE_BYTES] * len(keys),
                                            client_id="bench"), 1.0)
        service.PutEnd(pb.PutEndRequest(keys=keys, client_id="bench",
                                        checksums=[i + 1 for i in range(len(keys))]), 1.0)
    put_s = time.perf_counter() - started_s
    for n in range(num_nodes):            # the daemons acknowledge: the change logs empty
        acked = 0
        while True:
            reply = service.Heartbeat(pb.HeartbeatRequest(node_id=f"node{n}",
                                                          acked_seq=acked), 1.0)
            if reply.seq == acked:
                break
            acked = reply.seq
    for lo in range(0, num_objects, BATCH_KEYS):
        keys = [engine_key(i) for i in range(lo, min(num_objects, lo + BATCH_KEYS))]
        service.GetReplicas(pb.GetReplicasRequest(keys=keys), 1.0)
    return service, put_s


def measure(num_objects: int, num_nodes: int, use_tracemalloc: bool) -> dict:
    """One count's figures (run in a process of its own: see main)."""
    # NOTE: the master process runs with these GC thresholds (kvstore/master/cli.py)
    gc.set_threshold(100_000, 50, 100)
    import kvstore.master.service  # noqa: F401  (imports are not the objects' memory)
    gc.collect()
    rss_before = rss_bytes()
    if use_tracemalloc:
        tracemalloc.start()
    service, put_s = build(num_objects, num_nodes)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] if use_tracemalloc else None
    tracemalloc.stop()
    rss_after = rss_bytes()
    row = {"objects": num_objects, "nodes": num_nodes,
           "key_chars": len(engine_key(0)),
           "tracemalloc_bytes_per_object": None if traced is None else traced / num_objects,
           "rss_bytes_per_object": (rss_after - rss_before) / num_objects,
           "put_keys_per_s_while_building": num_objects / put_s}
    del service
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", default="100000,1000000",
                        help="comma-separated object counts (default: 100000,1000000)")
    parser.add_argument("--nodes", type=int, default=4, help="storage nodes (default 4)")
    parser.add_argument("--tracemalloc-max", type=int, default=200_000,
                        help="count tracemalloc bytes only up to this many objects")
    parser.add_argument("--json", default="bench/out/scaling.json")
    args = parser.parse_args()
    counts = [int(c) for c in args.objects.split(",") if c]
    if not counts or min(counts) <= 0 or args.nodes <= 0:
        parser.error("--objects and --nodes must be above 0")
    from kvstore.bench.master import in_process_ceiling

    gc.set_threshold(100_000, 50, 100)   # as in measure
    load_at_start = os.getloadavg()
    rows = []
    # NOTE: each measurement in a fresh process: memory an earlier one freed would be reused
    # and hide from the RSS growth; tracemalloc (which slows the puts) in a separate one
    ctx = multiprocessing.get_context("spawn")
    for count in counts:
        with ctx.Pool(1) as pool:
            row = pool.apply(measure, (count, args.nodes, False))
        if count <= args.tracemalloc_max:
            with ctx.Pool(1) as pool:
                row["tracemalloc_bytes_per_object"] = pool.apply(
                    measure, (count, args.nodes, True))["tracemalloc_bytes_per_object"]
        rows.append(row)
    rates = in_process_ceiling(200_000)
    print(f"{'objects':>10} {'nodes':>5} {'tracemalloc B/obj':>18} {'RSS B/obj':>10} "
          f"{'put keys/s':>11}")
    for r in rows:
        traced = r["tracemalloc_bytes_per_object"]
        print(f"{r['objects']:>10,} {r['nodes']:>5} "
              f"{'' if traced is None else f'{traced:,.0f}':>18} "
              f"{r['rss_bytes_per_object']:>10,.0f} {r['put_keys_per_s_while_building']:>11,.0f}")
    print("in-process keys/s on one core, batch 1024: " +
          ", ".join(f"{k.replace('_keys_per_s', '')} {v:,.0f}" for k, v in rates.items()))
    load = os.getloadavg()
    print(f"load average (1/5/15 min): {load_at_start} at start, {load} at end")
    out = {"command": sys.argv, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "rows": rows, "in_process_keys_per_s": rates, "loadavg_at_start": load_at_start,
           "loadavg_at_end": load}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
