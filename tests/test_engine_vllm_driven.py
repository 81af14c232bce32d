"""The vLLM connector driven the way vLLM's scheduler and worker call it, on paged caches
of two engines: blocks saved by one are loaded by the other into different block ids; saves
synchronous (async_save=False) and on the background thread (the default)."""

from __future__ import annotations

from types import SimpleNamespace

import time

import pytest
import torch

import kvstore
from kvstore import InvalidArgumentError
from kvstore.engine import KeyNamespace
from kvstore.engine.vllm import (ConnectorConfig, KVConnectorRole, KVStoreConnectorV1,
                                           KVStoreConnectorMetadata)

NUM_LAYERS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM = 3, 16, 2, 8
PROMPT = [(31 * i + 5) % 4000 for i in range(5 * BLOCK_SIZE + 3)]  # 5 full blocks + 3 tokens


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="128MiB") as s:
        yield s


class Engine:
    """A minimal paged engine: one scheduler-side and one worker-side connector, like vLLM."""

    def __init__(self, store, config: ConnectorConfig, num_blocks: int):
        self.scheduler = KVStoreConnectorV1(role=KVConnectorRole.SCHEDULER, store=store,
                                            config=config)
        self.worker = KVStoreConnectorV1(role=KVConnectorRole.WORKER, store=store, config=config)
        self.kv_caches = {f"model.layers.{i}.self_attn": torch.zeros(
            2, num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, dtype=torch.float16)
            for i in range(NUM_LAYERS)}
        self.worker.register_kv_caches(self.kv_caches)

    def step(self, scheduler_output, compute_blocks: list[int], seed: int,
             finished_req_ids: frozenset = frozenset()) -> tuple:
        """One engine step: build metadata, load, per-layer forward and save hooks, save;
        returns get_finished's answer."""
        meta = self.scheduler.build_connector_meta(scheduler_output)
        assert isinstance(meta, KVStoreConnectorMetadata)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(forward_context=None)
        gen = torch.Generator().manual_seed(seed)
        for name, kv in self.kv_caches.items():
            self.worker.wait_for_layer_load(name)
            for block in compute_blocks:  # the forward writes KV of the computed tokens
                kv[:, block] = torch.randn(kv[:, block].shape, generator=gen).half()
            self.worker.save_kv_layer(name, kv, attn_metadata=None)
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        finished = self.worker.get_finished(set(finished_req_ids))
        if not self.scheduler.config.async_save:
            assert finished == (None, None)
        return finished

    def wait_finished_sending(self, req_id: str, timeout_s: float = 30.0) -> None:
        """Empty steps, as vLLM runs while a finished request's pages wait on a save, until
        the worker reports the request among the finished sends."""
        finished_req_ids = {req_id}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sending, _ = self.step(_output(), [], seed=0, finished_req_ids=finished_req_ids)
            if sending:
                assert sending == {req_id}
                return
            finished_req_ids = set()  # vLLM names a finished request once
            time.sleep(0.01)
        raise AssertionError(f"{req_id} was never reported as finished sending")


def _request(req_id: str = "req-1", num_computed_tokens: int = 0):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=PROMPT,
                           num_computed_tokens=num_computed_tokens)


def _blocks(ids: list[int]):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))  # like vLLM's KVCacheBlocks


def _new_req(req_id: str, ids: list[int], num_computed: int = 0):
    return SimpleNamespace(req_id=req_id, prompt_token_ids=PROMPT, block_ids=(list(ids),),
                           num_computed_tokens=num_computed)


def _output(new=(), cached=None, scheduled=None, preempted=None):
    cached = cached or SimpleNamespace(req_ids=[], new_block_ids=[])
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached,
                           num_scheduled_tokens=scheduled or {}, finished_req_ids=set(),
                           preempted_req_ids=preempted or set())


def _config(model: str, async_save: bool = False) -> ConnectorConfig:
    return ConnectorConfig(KeyNamespace(model=model), BLOCK_SIZE, kv_dtype="float16",
                           async_save=async_save)


def test_prefill_engine_saves_and_decode_engine_loads_into_other_blocks(store) -> None:
    prefill, decode = Engine(store, _config("vllm-a"), 10), Engine(store, _config("vllm-a"), 8)
    # prefill engine: nothing stored yet, compute the whole prompt in one step
    request = _request()
    assert prefill.scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    src_ids = [7, 3, 9, 0, 5, 2]
    prefill.scheduler.update_state_after_alloc(request, _blocks(src_ids), 0)
    prefill.step(_output([_new_req("req-1", src_ids)], scheduled={"req-1": len(PROMPT)}),
                 src_ids, seed=1)
    assert prefill.scheduler.request_finished(request, src_ids) == (False, None)

    # decode engine: 5 full blocks match, all loadable (the last token is in block 6)
    assert decode.scheduler.get_num_new_matched_tokens(request, 0) == (5 * BLOCK_SIZE, False)
    dst_ids = [1, 6, 0, 4, 2, 7]
    decode.scheduler.update_state_after_alloc(request, _blocks(dst_ids), 5 * BLOCK_SIZE)
    decode.step(_output([_new_req("req-1", dst_ids, 5 * BLOCK_SIZE)],
                        scheduled={"req-1": 3}), [dst_ids[5]], seed=2)
    for name in prefill.kv_caches:
        for src, dst in zip(src_ids[:5], dst_ids[:5]):
            assert torch.equal(prefill.kv_caches[name][:, src], decode.kv_caches[name][:, dst])
        assert not decode.kv_caches[name][:, 3].any()  # pages it was not given stay untouched
    assert decode.worker.get_block_ids_with_load_errors() == set()


def test_matched_tokens_exclude_local_hits_and_the_last_token(store) -> None:
    engine = Engine(store, _config("vllm-b"), 10)
    ids = [0, 1, 2, 3, 4, 5]
    request = _request("r")
    engine.scheduler.update_state_after_alloc(request, _blocks(ids), 0)
    engine.step(_output([_new_req("r", ids)], scheduled={"r": len(PROMPT)}), ids, seed=3)
    other = Engine(store, _config("vllm-b"), 10)
    # 2 blocks already in the local prefix cache: only the other 3 come from the store
    assert other.scheduler.get_num_new_matched_tokens(request, 2 * BLOCK_SIZE) == (
        3 * BLOCK_SIZE, False)
    # the load then moves only those 3: the 2 local pages are neither read nor written
    dst = [9, 8, 7, 6, 5, 4]
    other.kv_caches["model.layers.0.self_attn"][:, 9] = 1.0  # stands for the local cached KV
    other.scheduler.update_state_after_alloc(request, _blocks(dst), 3 * BLOCK_SIZE)
    other.step(_output([_new_req("r", dst, 5 * BLOCK_SIZE)], scheduled={"r": 3}), [], seed=7)
    layer0 = other.kv_caches["model.layers.0.self_attn"]
    assert (layer0[:, 9] == 1.0).all() and not layer0[:, 8].any()
    for name in engine.kv_caches:
        for src, d in zip(ids[2:5], dst[2:5]):
            assert torch.equal(engine.kv_caches[name][:, src], other.kv_caches[name][:, d])
    # a prompt of exactly 5 blocks can load only 4: the last token must be computed
    exact = SimpleNamespace(request_id="x", prompt_token_ids=PROMPT[:5 * BLOCK_SIZE])
    assert other.scheduler.get_num_new_matched_tokens(exact, 0) == (4 * BLOCK_SIZE, False)


def test_chunked_prefill_saves_once_when_the_prompt_completes(store) -> None:
    engine = Engine(store, _config("vllm-c"), 10)
    request = _request("c")
    first_ids, later_ids = [8, 1, 6], [2, 4, 9]
    engine.scheduler.update_state_after_alloc(request, _blocks(first_ids), 0)
    engine.step(_output([_new_req("c", first_ids)], scheduled={"c": 3 * BLOCK_SIZE}),
                first_ids, seed=4)
    probe = Engine(store, _config("vllm-c"), 4)
    assert probe.scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # not yet
    cached = SimpleNamespace(req_ids=["c"], new_block_ids=[(later_ids,)])
    engine.step(_output(cached=cached, scheduled={"c": len(PROMPT) - 3 * BLOCK_SIZE}),
                later_ids, seed=5)
    assert probe.scheduler.get_num_new_matched_tokens(request, 0) == (5 * BLOCK_SIZE, False)
    loaded = Engine(store, _config("vllm-c"), 8)
    assert loaded.scheduler.get_num_new_matched_tokens(request, 0) == (5 * BLOCK_SIZE, False)
    dst = [7, 6, 5, 4, 3, 2]
    loaded.scheduler.update_state_after_alloc(request, _blocks(dst), 5 * BLOCK_SIZE)
    loaded.step(_output([_new_req("c", dst, 5 * BLOCK_SIZE)], scheduled={"c": 3}), [], seed=6)
    all_src = first_ids + later_ids
    for name in engine.kv_caches:
        for src, d in zip(all_src[:5], dst[:5]):
            assert torch.equal(engine.kv_caches[name][:, src], loaded.kv_caches[name][:, d])


def test_worker_rejects_a_cache_that_disagrees_with_the_scheduler(store) -> None:
    worker = KVStoreConnectorV1(role=KVConnectorRole.WORKER, store=store,
                                config=_config("vllm-d"))  # says float16
    with pytest.raises(InvalidArgumentError):
        worker.register_kv_caches({"l0": torch.zeros(2, 4, BLOCK_SIZE, NUM_HEADS, HEAD_DIM)})
    with pytest.raises(InvalidArgumentError):
        KVStoreConnectorV1(role=KVConnectorRole.WORKER)  # neither config nor vLLM config


def _vllm_config(extra: dict):
    """The parts of a vLLM config the connector reads (vLLM is not installed here)."""
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        parallel_config=SimpleNamespace(tensor_parallel_size=2, rank=3),
        model_config=SimpleNamespace(model="org/model-7b", dtype=torch.float16),
        cache_config=SimpleNamespace(block_size=BLOCK_SIZE))


def test_a_vllm_config_without_a_master_address_is_a_config_error() -> None:
    with pytest.raises(kvstore.ConfigError, match=r'kv_connector_extra_config\["kvstore_master"\]'):
        KVStoreConnectorV1(_vllm_config({"quantize": "int8"}), KVConnectorRole.SCHEDULER)
    with pytest.raises(kvstore.ConfigError, match="kvstore_master"):
        KVStoreConnectorV1(_vllm_config({"kvstore_master": ""}), KVConnectorRole.WORKER)


def test_a_vllm_config_with_a_store_needs_no_master_address(store) -> None:
    connector = KVStoreConnectorV1(_vllm_config({"quantize": "int8"}), KVConnectorRole.WORKER,
                                   store=store)
    assert connector.store is store
    assert connector.config.namespace == KeyNamespace(model="org_model-7b", tp_rank=1, tp_size=2)
    assert (connector.config.block_size, connector.config.quantize,
            connector.config.kv_dtype) == (BLOCK_SIZE, "int8", "float16")


def test_async_save_keeps_the_pages_until_the_save_is_reported_finished(store) -> None:
    prefill = Engine(store, _config("vllm-async", async_save=True), 10)
    request = _request("as")
    src_ids = [7, 3, 9, 0, 5, 2]
    prefill.scheduler.update_state_after_alloc(request, _blocks(src_ids), 0)
    prefill.step(_output([_new_req("as", src_ids)], scheduled={"as": len(PROMPT)}),
                 src_ids, seed=11)
    # the save was handed over: vLLM must keep the pages until get_finished names it
    assert prefill.scheduler.request_finished(request, src_ids) == (True, None)
    prefill.wait_finished_sending("as")
    assert prefill.worker.stats.num_blocks_saved == 5
    assert prefill.worker.stats.num_saves_failed == 0
    decode = Engine(store, _config("vllm-async"), 8)
    assert decode.scheduler.get_num_new_matched_tokens(request, 0) == (5 * BLOCK_SIZE, False)
    dst_ids = [1, 6, 0, 4, 2, 7]
    decode.scheduler.update_state_after_alloc(request, _blocks(dst_ids), 5 * BLOCK_SIZE)
    decode.step(_output([_new_req("as", dst_ids, 5 * BLOCK_SIZE)], scheduled={"as": 3}),
                [dst_ids[5]], seed=12)
    for name in prefill.kv_caches:
        for src, dst in zip(src_ids[:5], dst_ids[:5]):
            assert torch.equal(prefill.kv_caches[name][:, src], decode.kv_caches[name][:, dst])
    # a request that saved nothing (a consumer-only step) is freed at once
    assert decode.scheduler.request_finished(request, dst_ids) == (False, None)
    prefill.worker.shutdown()


def test_a_failed_async_save_stores_nothing_and_still_frees_the_pages(store) -> None:
    engine = Engine(store, _config("vllm-async-fail", async_save=True), 10)
    request = _request("bad")
    ids = [0, 1, 2, 3, 4, 99]  # page 99 does not exist: the save thread's gather refuses it
    engine.scheduler.update_state_after_alloc(request, _blocks(ids), 0)
    engine.step(_output([_new_req("bad", ids)], scheduled={"bad": len(PROMPT)}), ids[:5],
                seed=13)
    assert engine.scheduler.request_finished(request, ids) == (True, None)
    engine.wait_finished_sending("bad")
    assert engine.worker.stats.num_saves_failed == 1
    assert engine.worker.stats.num_blocks_saved == 0
    probe = Engine(store, _config("vllm-async-fail"), 4)
    assert probe.scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # recompute
    engine.worker.shutdown()


def test_a_preempted_requests_pending_save_ends_before_its_pages_are_reused(store) -> None:
    engine = Engine(store, _config("vllm-async-preempt", async_save=True), 10)
    request = _request("p")
    ids = [2, 4, 6, 8, 1, 3]
    engine.scheduler.update_state_after_alloc(request, _blocks(ids), 0)
    engine.step(_output([_new_req("p", ids)], scheduled={"p": len(PROMPT)}), ids, seed=14)
    # the next step's scheduler preempted it: the metadata names it, and the worker's
    # handle_preemptions (before that step's forward) returns only once its save ended
    meta = engine.scheduler.build_connector_meta(_output(preempted={"p"}))
    assert meta.preempted_req_ids == {"p"}
    engine.worker.handle_preemptions(meta)
    assert engine.worker._saver.num_pending() == 0
    assert engine.worker.stats.num_blocks_saved == 5
    engine.worker.shutdown()


def test_async_save_in_the_vllm_config_must_be_a_bool() -> None:
    with pytest.raises(kvstore.ConfigError, match="async_save"):
        KVStoreConnectorV1(_vllm_config({"async_save": "yes"}), KVConnectorRole.SCHEDULER,
                           store=object())
