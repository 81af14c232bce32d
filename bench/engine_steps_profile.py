"""Where a PD handover's time goes: each step of an in-place save and load of ``--tokens``
tokens, both connectors, timed apart (issue 15's engine path).

Steps, in the order the connectors run them (``kvstore.engine.in_place``):

- save: ``keys`` (prefix-chunk hashes), ``batch_exists``, ``PutStart`` (``reserve_puts``:
  the master allocates, views of the reserved ranges), ``gather+hash`` (the fused kernel
  into those ranges), ``commit`` (PutEnd and the daemons' commits);
- load: ``keys``, ``match_prefix``, ``GetReplicas`` (``lease_views``: the lease and the
  views), ``scatter`` (the verified scatter: hash, then copy each block into its pages or
  tokens; the dynamic connector's fresh tensors and cache included), ``release`` (the
  views and the lease).

The steps are those of the connectors before 15e, in every tree (the calls are public or
stable since 15p): since 15e the in-place save skips ``batch_exists`` (its PutStart answers
it) and the paged in-place load skips ``match_prefix`` (its GetReplicas answers it), so
those two rows say what the cuts spared. Copies run on the calling thread, one chunk.

``memcpy`` is ``kvstore.demo.pd_worker.copy_gbps`` of the same bytes (numpy, one thread,
best of several), the ceiling of ``bench/engine_pd_bench.py``; each step is also given as a
share of that memcpy's time. A real ``kvstore master`` and ``kvstore daemon``; segment pages
prefaulted, objects removed after each repeat (as engine_pd_bench's reused space). Prints a
table, writes bench/out/engine_steps_profile.json.

    .venv/bin/python bench/engine_steps_profile.py [--tokens 2048] [--repeats 9] [--threads N]
        [--copy-threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

import torch

import kvstore
from _daemon_ready import wait_allocated, wait_registered
from kvstore import ops
from kvstore._process import ServerProcess
from kvstore.client.leased_views import lease_views
from kvstore.client.reserve import prefault, reserve_puts
from kvstore.demo.pd_worker import copy_gbps
from kvstore.engine import KeyNamespace, PagedKVConnector
from kvstore.engine.hf_connector import DynamicCacheConnector, _token_tensors
from kvstore.engine.hf_cache import cache_pairs
from kvstore.ops.rows import RowAddresses

OUT = Path(__file__).resolve().parent / "out" / "engine_steps_profile.json"
LAYERS, HEADS, HEAD_DIM, BLOCK = 8, 4, 64, 16
SAVE_STEPS = ("keys", "batch_exists", "PutStart", "gather+hash", "commit")
LOAD_STEPS = ("keys", "match_prefix", "GetReplicas", "scatter", "release")


class Laps:
    """Wall milliseconds of each named step of one save or load, and the process CPU
    milliseconds it took (all threads of this process: the kernels' too), as ``cpu <step>``.
    NOTE: the CPU figure because a shared machine's wall times are mostly waits for a core."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()
        self._cpu = time.process_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.ms[name] = (now - self._t) * 1e3
        self.ms[f"cpu {name}"] = (cpu - self._cpu) * 1e3
        self._t, self._cpu = now, cpu


def save_steps(store, keys_of, gather, tokens, block_bytes: int) -> dict[str, float]:
    laps = Laps()
    keys = keys_of(tokens)
    laps.lap("keys")
    present = store.batch_exists(keys)
    assert not any(present)
    laps.lap("batch_exists")
    with reserve_puts(store, keys, [block_bytes] * len(keys)) as reservation:
        laps.lap("PutStart")
        sums = gather(reservation.views)
        laps.lap("gather+hash")
        results = reservation.commit(sums)
        laps.lap("commit")
    assert results == [None] * len(keys), results
    return laps.ms


def load_steps(store, keys_of, scatter, tokens, block_bytes: int) -> dict[str, float]:
    laps = Laps()
    keys = keys_of(tokens)
    laps.lap("keys")
    assert store.match_prefix(keys) == len(keys)
    laps.lap("match_prefix")
    leased = lease_views(store, keys)
    laps.lap("GetReplicas")
    ok = scatter(RowAddresses(leased.addresses, block_bytes), leased.checksums)
    assert all(ok)
    laps.lap("scatter")
    leased.close()
    laps.lap("release")
    return laps.ms


def run(store, num_tokens: int, repeats: int, copy_threads: int
        ) -> tuple[dict, list[float], int]:
    from transformers import DynamicCache

    num_blocks = num_tokens // BLOCK
    namespace = KeyNamespace(model=f"bench-steps-{uuid.uuid4().hex[:6]}")
    layers = [torch.randn(2, 2 * num_blocks, BLOCK, HEADS, HEAD_DIM) for _ in range(LAYERS)]
    paged = PagedKVConnector(store, layers, block_size=BLOCK, namespace=namespace)
    dynamic = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS,
                                    head_dim=HEAD_DIM, dtype=torch.float32, block_size=BLOCK,
                                    namespace=namespace)
    for connector in (paged, dynamic):
        connector.warm_up(num_blocks)
    prefault(store)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(1, HEADS, num_tokens, HEAD_DIM),
                     torch.randn(1, HEADS, num_tokens, HEAD_DIM), layer)
    tensors = _token_tensors(cache_pairs(cache))
    src, dst = torch.arange(num_blocks), torch.arange(num_blocks, 2 * num_blocks)
    ids = torch.arange(num_blocks)
    block_bytes = paged.format.block_bytes
    layout = paged.format.layout
    # NOTE: passed only when asked: trees before 15e2 have no num_threads
    kw = {"num_threads": copy_threads} if copy_threads else {}

    def paged_gather(views):
        return ops.gather_pages_to_rows(layers, src, views, layout=layout, checksums=True, **kw)

    def paged_scatter(rows, sums):
        return ops.scatter_rows_to_pages(rows, layers, dst, layout=layout, checksums=sums,
                                         **kw)

    def dynamic_gather(views):
        return ops.gather_tokens_to_rows(tensors, ids, views, block_size=BLOCK, checksums=True,
                                         **kw)

    def dynamic_scatter(rows, sums):
        fresh = dynamic._fresh_tensors(num_blocks)
        ok = ops.scatter_rows_to_tokens(rows, fresh, ids, block_size=BLOCK, checksums=sums,
                                          **kw)
        dynamic._install(fresh, num_blocks, None)
        return ok

    rows: dict[str, list[dict[str, float]]] = {
        "paged save": [], "paged load": [], "dynamic save": [], "dynamic load": []}
    ceilings = []
    for r in range(-1, repeats):  # NOTE: repeat -1 is unrecorded: first keys, first chunks
        tokens = [(r * 7919 + i * 31 + 1) % 30000 for i in range(num_tokens)]
        htokens = [t + 1 for t in tokens]
        steps = {
            "paged save": save_steps(store, paged.keys_for, paged_gather, tokens, block_bytes),
            "paged load": load_steps(store, paged.keys_for, paged_scatter, tokens, block_bytes),
            "dynamic save": save_steps(store, dynamic.keys_for, dynamic_gather, htokens,
                                       block_bytes),
            "dynamic load": load_steps(store, dynamic.keys_for, dynamic_scatter, htokens,
                                       block_bytes),
        }
        for layer in layers:
            assert torch.equal(layer[:, :num_blocks], layer[:, num_blocks:])
        store.remove_prefix(f"kv/{namespace.model}/", force=True)
        if r < 0:
            continue
        for name, ms in steps.items():
            rows[name].append(ms)
        ceilings.append(copy_gbps(num_blocks * block_bytes))
    return rows, ceilings, num_blocks * block_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads, which the kernels use (0: torch's)")
    parser.add_argument("--copy-threads", type=int, default=0,
                        help="the kernels' num_threads (0: not passed, torch's count)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    token_bytes = LAYERS * 2 * HEADS * HEAD_DIM * 4
    pool_bytes = 4 * args.tokens * token_bytes + (256 << 20)
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(pool_bytes)])
    load_before = open("/proc/loadavg").read().split()[:3]
    try:
        with kvstore.connect(master.address) as store:
            wait_registered(store)
            wait_allocated()
            samples, ceilings, num_bytes = run(store, args.tokens, args.repeats,
                                                   args.copy_threads)
    finally:
        daemon.close()
        master.close()
    load_after = open("/proc/loadavg").read().split()[:3]
    memcpy_ms = num_bytes / statistics.median(ceilings) / 1e6
    print(f"{args.tokens} tokens = {num_bytes / 2**20:.1f} MiB, torch threads "
          f"{torch.get_num_threads()}, load average {' '.join(load_before)} -> "
          f"{' '.join(load_after)}; memcpy {statistics.median(ceilings):.2f} GB/s p50 = "
          f"{memcpy_ms:.2f} ms (range {min(ceilings):.2f}-{max(ceilings):.2f} GB/s)")
    table = {}
    for name, runs in samples.items():
        steps = SAVE_STEPS if name.endswith("save") else LOAD_STEPS
        totals = [sum(ms[step] for step in steps) for ms in runs]
        cpu_totals = [sum(ms[f"cpu {step}"] for step in steps) for ms in runs]
        table[name] = {step: statistics.median(ms[step] for ms in runs)
                       for step in steps + tuple(f"cpu {step}" for step in steps)}
        table[name]["total"] = statistics.median(totals)
        table[name]["cpu total"] = statistics.median(cpu_totals)
        cells = "  ".join(f"{step} {table[name][step]:.2f}" for step in steps)
        cpu_cells = "  ".join(f"{step} {table[name]['cpu ' + step]:.2f}" for step in steps)
        print(f"{name:13s} total {table[name]['total']:5.2f} ms ({memcpy_ms / table[name]['total']:.2f}x"
              f" memcpy)  {cells}")
        print(f"{'':13s} CPU   {table[name]['cpu total']:5.2f} ms  {cpu_cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tree": str(Path.cwd()),
        "loadavg": [load_before, load_after], "args": vars(args) | {"out": str(args.out)},
        "bytes": num_bytes, "memcpy_gbps": ceilings, "ms_p50": table,
        "samples": samples}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
