"""Save and load GB/s of the engine adapters: the vLLM connector (``KVStoreConnector``, its
worker side driven as vLLM's model runner calls it, on vLLM's CPU cache layout) and the
SGLang HiCache backend (``KVStoreHiCacheStorage``, ``batch_set_v1``/``batch_get_v1`` on a
``page_first`` host pool), against a real ``kvstore master`` and ``kvstore daemon`` process.

vLLM rows: a request of ``--blocks`` full blocks of ``--block-size`` tokens, 8 layers, 8 KV
heads, head_dim 128, fp16 (``--block-size 32``: 1 MiB a block). ``save sync``: the step's
``wait_for_save`` with ``async_save`` off (gather + exists + put, all in the step).
``save async``: the same bytes handed to the save thread; ``step`` is what the engine's step
waits (the hand-over), ``GB/s`` counts until ``get_finished`` reports the request.
``load``: ``start_load_kv`` of the whole prefix into other pages (match + read + scatter).
SGLang rows: the same bytes as pages of 64 tokens, K and V objects per page. Each row gets
fresh keys per repeat (saves skip stored blocks); a first, unrecorded repeat warms staging
buffers and transports, as an engine's start-up does. The ceiling is single-thread memcpy of the
same bytes (torch copy_) measured in the same run. Prints a table, writes
bench/out/engine_connector_bench.json.

    .venv/bin/python bench/engine_connector_bench.py [--blocks 64] [--repeats 5]
                                                     [--transport auto|shm|tcp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import torch

import kvstore
from _daemon_ready import wait_allocated, wait_registered
from kvstore._process import ServerProcess
from kvstore.engine import KeyNamespace
from kvstore.engine.sglang import KVStoreHiCacheStorage
from kvstore.engine.vllm import (ConnectorConfig, KVConnectorRole, KVStoreConnector,
                                 KVStoreConnectorMetadata, ReqMeta)

OUT = Path(__file__).resolve().parent / "out" / "engine_connector_bench.json"
LAYERS, HEADS, HEAD_DIM, PAGE_TOKENS = 8, 8, 128, 64


def memcpy_gbps(num_bytes: int, repeats: int) -> float:
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.zeros(num_bytes, dtype=torch.uint8)
    dst.copy_(src)
    start_s = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return num_bytes * repeats / (time.perf_counter() - start_s) / 1e9


def vllm_worker(store, block_size: int, num_pages: int, async_save: bool, model: str):
    config = ConnectorConfig(KeyNamespace(model=model), block_size, kv_dtype="float16",
                             async_save=async_save)
    worker = KVStoreConnector(role=KVConnectorRole.WORKER, store=store, config=config)
    caches = {f"layers.{i}": torch.randn(num_pages, HEADS, block_size, 2 * HEAD_DIM).half()
              for i in range(LAYERS)}  # vLLM's CPU layout
    worker.register_kv_caches(caches)
    return worker


def step(worker, requests: list[ReqMeta], finished: set[str] = frozenset()) -> tuple:
    """One model-runner step as vLLM 0.32 calls the connector (no forward)."""
    worker.bind_connector_metadata(KVStoreConnectorMetadata(requests))
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    return worker.get_finished(set(finished))


def bench_vllm(store, num_blocks: int, block_size: int, repeats: int) -> dict[str, dict]:
    rows: dict[str, list] = {"save sync": [], "save async": [], "load": []}
    model = f"bench-{uuid.uuid4().hex[:6]}"  # one namespace: the loader reads what sync saved
    sync, asyn, loader = (vllm_worker(store, block_size, 2 * num_blocks + 1, flag, model)
                          for flag in (False, True, False))
    src, dst = list(range(num_blocks)), list(range(num_blocks, 2 * num_blocks))
    num_bytes = num_blocks * sync._block_bytes()
    for r in range(-1, repeats):  # NOTE: interleaved, so load changes hit all rows alike
        tokens = [(r * 7919 + i * 31) % 30000 for i in range(num_blocks * block_size + 1)]
        start_s = time.perf_counter()
        step(sync, [ReqMeta(f"s{r}", tokens, src, len(tokens), True)])
        rows["save sync"].append((time.perf_counter() - start_s, time.perf_counter() - start_s))
        atokens = [t + 1 for t in tokens]
        start_s = time.perf_counter()
        step(asyn, [ReqMeta(f"a{r}", atokens, src, len(atokens), True)])
        step_s = time.perf_counter() - start_s
        while not step(asyn, [], {f"a{r}"})[0]:
            time.sleep(0.001)  # empty steps (1 ms apart), as vLLM runs while pages wait
        rows["save async"].append((step_s, time.perf_counter() - start_s))
        start_s = time.perf_counter()
        step(loader, [ReqMeta(f"l{r}", tokens[:-1], dst, num_blocks * block_size, False)])
        load_s = time.perf_counter() - start_s
        assert loader.stats.num_blocks_failed == 0 and loader.stats.num_blocks_loaded == (
            r + 2) * num_blocks, loader.stats
        rows["load"].append((load_s, load_s))
    asyn.shutdown()
    # NOTE: repeat -1 warms staging buffers and transports, as an engine's start-up does
    return {name: summarize(samples[1:], num_bytes) for name, samples in rows.items()}


class PageFirstHostPool:
    """SGLang's MHA host pool in its page_first layout (as tests/test_engine_sglang.py)."""

    layout, page_size = "page_first", PAGE_TOKENS

    def __init__(self, num_pages: int):
        self.size = num_pages * PAGE_TOKENS
        self.kv_buffer = torch.randn(2, self.size, LAYERS, HEADS, HEAD_DIM).half()

    def get_page_buffer_meta(self, indices: torch.Tensor):
        itemsize, base = self.kv_buffer.element_size(), self.kv_buffer.data_ptr()
        v_offset = LAYERS * self.size * HEADS * HEAD_DIM * itemsize
        token_bytes = LAYERS * HEADS * HEAD_DIM * itemsize
        ptrs = []
        for index in indices.tolist()[::PAGE_TOKENS]:
            ptrs += [base + index * token_bytes, base + index * token_bytes + v_offset]
        return ptrs, [token_bytes * PAGE_TOKENS] * len(ptrs)


def bench_sglang(store, num_bytes: int, repeats: int) -> dict[str, dict]:
    page_bytes = 2 * PAGE_TOKENS * LAYERS * HEADS * HEAD_DIM * 2
    num_pages = max(1, num_bytes // page_bytes)
    config = SimpleNamespace(tp_rank=0, tp_size=1, is_mla_model=False,
                             model_name=f"bench-{uuid.uuid4().hex[:6]}", extra_config={})
    writer, reader = (KVStoreHiCacheStorage(config, store=store) for _ in range(2))
    pools = [PageFirstHostPool(num_pages) for _ in range(2)]
    writer.register_mem_pool_host(pools[0])
    reader.register_mem_pool_host(pools[1])
    indices = torch.arange(num_pages * PAGE_TOKENS)
    rows: dict[str, list] = {"batch_set_v1": [], "batch_get_v1": []}
    for r in range(-1, repeats):
        hashes = [f"r{r}-{uuid.uuid4().hex[:8]}-{i}" for i in range(num_pages)]
        start_s = time.perf_counter()
        assert all(writer.batch_set_v1(hashes, indices))
        rows["batch_set_v1"].append((time.perf_counter() - start_s,) * 2)
        start_s = time.perf_counter()
        assert all(reader.batch_get_v1(hashes, indices))
        rows["batch_get_v1"].append((time.perf_counter() - start_s,) * 2)
    assert torch.equal(pools[0].kv_buffer, pools[1].kv_buffer)
    return {name: summarize(samples[1:], num_pages * page_bytes)  # repeat -1: warm-up
            for name, samples in rows.items()}


def summarize(samples: list[tuple[float, float]], num_bytes: int) -> dict:
    """Median step seconds and GB/s over the done-seconds, plus their range."""
    done = [d for _, d in samples]
    return {"bytes": num_bytes, "step_ms_p50": 1e3 * statistics.median(s for s, _ in samples),
            "gbps_p50": num_bytes / statistics.median(done) / 1e9,
            "gbps_min": num_bytes / max(done) / 1e9, "gbps_max": num_bytes / min(done) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    block_bytes = LAYERS * 2 * args.block_size * HEADS * HEAD_DIM * 2
    pool_bytes = 3 * (args.repeats + 1) * args.blocks * block_bytes + (256 << 20)
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(pool_bytes)])
    try:
        with kvstore.connect(master.address, transport=args.transport) as store:
            wait_registered(store)
            wait_allocated()
            rows = {**{f"vllm {k}": v for k, v in bench_vllm(
                store, args.blocks, args.block_size, args.repeats).items()},
                    **{f"sglang {k}": v for k, v in bench_sglang(
                        store, args.blocks * block_bytes, args.repeats).items()}}
    finally:
        daemon.close()
        master.close()
    ceiling = memcpy_gbps(args.blocks * block_bytes, 10)
    loadavg = open("/proc/loadavg").read().split()[:3]
    print(f"{args.blocks} blocks x {block_bytes >> 10} KiB = {args.blocks * block_bytes >> 20} "
          f"MiB per request, transport {args.transport}, load average {' '.join(loadavg)}")
    print(f"{'row':22} {'step ms p50':>11} {'GB/s p50':>9} {'GB/s range':>13} {'% memcpy':>8}")
    for name, row in rows.items():
        print(f"{name:22} {row['step_ms_p50']:11.1f} {row['gbps_p50']:9.2f} "
              f"{row['gbps_min']:6.2f}-{row['gbps_max']:<6.2f} "
              f"{100 * row['gbps_p50'] / ceiling:7.0f}%")
    print(f"{'memcpy (ceiling)':22} {'':11} {ceiling:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    "loadavg": loadavg, "args": vars(args) | {"out": str(args.out)},
                                    "memcpy_gbps": ceiling, "rows": rows}, indent=1))
    print(f"wrote {args.out}")



if __name__ == "__main__":
    main()
