"""kvstore as a vLLM (v1) KV connector, on PagedKVConnector.

Selected by configuration, no vLLM patch::

    KVTransferConfig(kv_connector="KVStoreConnector",
                     kv_connector_module_path="kvstore.engine.vllm", kv_role="kv_both",
                     kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"master": "HOST:PORT"})

vLLM creates one instance per role. The scheduler-side instance decides what to load and save;
the worker-side instance (one per GPU worker) moves the bytes:

    scheduler: get_num_new_matched_tokens -> update_state_after_alloc -> build_connector_meta
               ... request_finished
    worker:    register_kv_caches (once); per step: bind_connector_metadata -> start_load_kv ->
               (wait_for_layer_load, forward, save_kv_layer) per layer -> wait_for_save ->
               clear_connector_metadata; get_finished

Rules:
- Loads: only full blocks, and never the prompt's last token (the engine must compute at least
  one token to get logits), matching vLLM's own connectors.
- Saves: a request's full prompt blocks are saved from the step whose forward completes its
  prompt (chunked prefill saves once, at the end). Asynchronous by default
  (``async_save``): ``wait_for_save`` hands the save to a background thread
  (``kvstore.engine.vllm_saver``) and returns; the scheduler side's ``request_finished``
  returns True for every request with a save, so vLLM keeps its pages until
  ``get_finished`` reports it among the finished sends (its save ended, ok or failed). A
  preempted request's pending save is waited for in ``handle_preemptions``, before vLLM
  reuses its pages. With ``async_save`` False the save ends inside ``wait_for_save`` and
  pages are freed at once. A failed save only leaves blocks unstored (consumers recompute).
- Loads run synchronously in ``start_load_kv`` (all layers in one pass), and
  ``save_kv_layer`` only marks progress: the gather kernel reads every layer at once.
- A block that fails to load is reported by ``get_block_ids_with_load_errors`` and the
  engine recomputes it (with ``kv_load_failure_policy="recompute"``; vLLM's default "fail"
  fails the request instead); nothing raises for the whole step.
- ``kv_role``: ``kv_producer`` only saves, ``kv_consumer`` only loads, ``kv_both`` does both.
- Caches: vLLM's CUDA layout ``[2, num_blocks, block_size, heads, head_dim]`` and its CPU
  layout ``[num_blocks, heads, block_size, 2 * head_dim]`` (``head_major`` in
  ``kvstore.engine.blocks``); both store the same block form, so keys and bytes are shared
  with every other PagedKVConnector user.

When vLLM is importable the class subclasses ``KVConnectorBase_V1`` and reads its settings
from ``kv_transfer_config.kv_connector_extra_config``: ``master`` (HOST:PORT; required, there
is no default address: without it construction raises ConfigError; ``kvstore_master`` is the
older spelling), ``token``, ``transport``, ``quantize`` (None or "int8") and ``namespace``
(the model part of the keys; default: the model name) and ``async_save`` (default True).
Without vLLM it is driven directly with a ``ConnectorConfig`` and a store.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from typing import Any

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.engine.connector import PagedKVConnector
from kvstore.engine.keys import loadable_tokens, prefix_keys
from kvstore.engine.vllm_config import (ConnectorConfig, block_id_list, cached_new_blocks,
                                        config_from_vllm, role_flags)
from kvstore.engine.vllm_saver import AsyncSaver, SaveJob

try:  # NOTE: vLLM moves these names between releases; any import failure means "no vLLM".
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # type: ignore
        KVConnectorBase_V1 as _Base, KVConnectorMetadata as _MetaBase, KVConnectorRole)
except Exception:  # noqa: BLE001 (ImportError, or a broken vLLM install)
    _Base, _MetaBase = object, object

    class KVConnectorRole(enum.Enum):  # type: ignore[no-redef]
        """Which side an instance serves (mirror of vLLM's enum)."""

        SCHEDULER = 0
        WORKER = 1


@dataclasses.dataclass
class ReqMeta:
    """One request's transfer in a step: load tokens ``[num_local_tokens, num_tokens)`` into
    ``block_ids`` (the first ``num_local_tokens`` are already in the local prefix cache), or
    (``is_store``) save the full blocks of ``token_ids`` from ``block_ids``."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    num_tokens: int
    is_store: bool
    num_local_tokens: int = 0


@dataclasses.dataclass
class KVStoreConnectorMetadata(_MetaBase):  # type: ignore[misc, valid-type]
    """What the scheduler tells the workers for one step: transfers, and the requests vLLM
    preempted (their pages are reused this step, so their pending saves must end first)."""

    requests: list[ReqMeta] = dataclasses.field(default_factory=list)
    preempted_req_ids: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class TransferStats:
    """What one worker-side connector moved since it started (cumulative): blocks loaded and
    failed, bytes and wall seconds of loads and saves (store I/O plus gather/scatter; for
    asynchronous saves the background thread's seconds), saves that failed, and the seconds
    the engine's steps spent in ``wait_for_save`` (``save_wait_s``: the whole save when
    synchronous, the hand-over when asynchronous), and the requests ``get_finished``
    reported as finished sends (``num_finished_sends``)."""

    num_blocks_loaded: int = 0
    num_blocks_failed: int = 0
    bytes_loaded: int = 0
    load_s: float = 0.0
    num_blocks_saved: int = 0
    bytes_saved: int = 0
    save_s: float = 0.0
    num_saves_failed: int = 0
    save_wait_s: float = 0.0
    num_finished_sends: int = 0


@dataclasses.dataclass
class _Tracked:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int = 0


class KVStoreConnector(_Base):  # type: ignore[misc, valid-type]
    """kvstore as a vLLM v1 KV connector (see the module docstring for the call order)."""

    def __init__(self, vllm_config: Any = None, role: Any = KVConnectorRole.SCHEDULER,
                 kv_cache_config: Any = None, *, store: Any = None,
                 config: ConnectorConfig | None = None):
        if _Base is not object:
            super().__init__(vllm_config, role, kv_cache_config)
        if config is None:
            config, store = config_from_vllm(vllm_config, store)
        if store is None:
            raise InvalidArgumentError("KVStoreConnector needs a store (or a vLLM config "
                                       "naming the master)")
        if _Base is object:
            self._role = role
        self._saves, self._loads = role_flags(vllm_config)
        self.store = store
        self.config = config
        self._tracked: dict[str, _Tracked] = {}      # scheduler: requests being prefilled
        self._saving_req_ids: set[str] = set()      # scheduler: requests with a save emitted
        self._pending_loads: dict[str, ReqMeta] = {}
        self._num_hit_tokens: dict[str, int] = {}   # scheduler: store hits being allocated
        self._meta: KVStoreConnectorMetadata | None = None
        self._paged: PagedKVConnector | None = None  # worker: set by register_kv_caches
        self._load_error_block_ids: set[int] = set()
        self._saver: AsyncSaver | None = None       # worker: set by register_kv_caches
        self._stats_lock = threading.Lock()
        self.stats = TransferStats()

    if _Base is object:
        @property
        def role(self) -> Any:
            return self._role

    # == scheduler side =======================================================================
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int,
                                   ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` that can be loaded from the store, and
        whether the load is asynchronous (never, here). One ``match_prefix`` RPC; none for a
        producer-only connector (it never loads)."""
        if not self._loads:
            return 0, False
        tokens = list(request.prompt_token_ids or [])
        limit = loadable_tokens(len(tokens), self.config.block_size)
        keys = prefix_keys(tokens[:limit], chunk_size=self.config.block_size,
                           namespace=self.config.key_namespace())
        num_hit = self.store.match_prefix(keys) * self.config.block_size if keys else 0
        self._num_hit_tokens[request.request_id] = num_hit
        return max(num_hit - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Remember the request's pages; schedule a load when external tokens were granted."""
        block_ids = block_id_list(blocks)
        tokens = list(request.prompt_token_ids or [])
        self._tracked[request.request_id] = _Tracked(tokens, block_ids)
        # get_num_new_matched_tokens ran first (vLLM's order); without it, trust the caller
        num_hit = self._num_hit_tokens.pop(request.request_id, num_external_tokens)
        if num_external_tokens > 0:
            num_local = max(num_hit - num_external_tokens, 0)
            self._pending_loads[request.request_id] = ReqMeta(
                request.request_id, tokens[:num_hit], block_ids, num_hit, False, num_local)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        """Loads granted since the last step, plus saves of prompts this step completes."""
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        meta = KVStoreConnectorMetadata(list(self._pending_loads.values()), preempted)
        self._pending_loads.clear()
        for req_id in preempted:
            # NOTE: its pages are gone; a prompt resumed after preemption is not saved
            self._tracked.pop(req_id, None)
        for new in getattr(scheduler_output, "scheduled_new_reqs", []):
            tracked = self._tracked.setdefault(
                new.req_id, _Tracked(list(new.prompt_token_ids or []), []))
            tracked.block_ids = block_id_list(new.block_ids)
            tracked.num_computed_tokens = new.num_computed_tokens
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        for req_id, new_blocks in cached_new_blocks(cached):
            if req_id in self._tracked:
                self._tracked[req_id].block_ids += block_id_list(new_blocks)
        num_scheduled = getattr(scheduler_output, "num_scheduled_tokens", {})
        for req_id, tracked in list(self._tracked.items()):
            if req_id not in num_scheduled:
                continue
            tracked.num_computed_tokens += num_scheduled[req_id]
            if tracked.num_computed_tokens >= len(tracked.token_ids) and self._saves:
                meta.requests.append(ReqMeta(req_id, tracked.token_ids, tracked.block_ids,
                                             len(tracked.token_ids), True))
                if self.config.async_save:
                    self._saving_req_ids.add(req_id)
            if tracked.num_computed_tokens >= len(tracked.token_ids):
                del self._tracked[req_id]  # prompt done: decode steps save nothing
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        """Nothing to track: vLLM itself frees the pages of the finished sends reported."""

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        """True (keep the pages until ``get_finished`` names the request) when a save of the
        request was handed to the workers' background threads; False (free now) otherwise:
        no save, or synchronous saves. No transfer params."""
        for state in (self._tracked, self._pending_loads, self._num_hit_tokens):
            state.pop(request.request_id, None)
        delay_free = request.request_id in self._saving_req_ids
        self._saving_req_ids.discard(request.request_id)
        return delay_free, None

    # == worker side ==========================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """The worker's per-layer paged caches, in layer order: 5-D (vLLM's CUDA layouts) or
        4-D ``[num_blocks, heads, block_size, 2 * head_dim]`` (its CPU layout)."""
        layers = list(kv_caches.values())
        layout = "head_major" if layers and layers[0].dim() == 4 else None
        paged = PagedKVConnector(self.store, layers, block_size=self.config.block_size,
                                 quantize=self.config.quantize, namespace=self.config.namespace,
                                 layout=layout)
        if paged.namespace != self.config.key_namespace():
            raise InvalidArgumentError(
                f"the KV caches key as {paged.namespace} but the scheduler side keys as "
                f"{self.config.key_namespace()}: set ConnectorConfig.kv_dtype to the cache dtype")
        self._paged = paged
        if self.config.async_save and self._saves:
            # NOTE: a connector of its own: PagedKVConnector reuses its staging buffer, so
            # the save thread must not share the loads' one.
            saving = PagedKVConnector(self.store, layers, block_size=self.config.block_size,
                                      quantize=self.config.quantize,
                                      namespace=self.config.namespace, layout=layout)
            self._saver = AsyncSaver(lambda job: saving.save_blocks(job.token_ids, job.block_ids),
                                     on_saved=self._count_save)

    def handle_preemptions(self, kv_connector_metadata: KVStoreConnectorMetadata) -> None:
        """Before vLLM reuses preempted requests' pages: wait for their pending saves."""
        preempted = getattr(kv_connector_metadata, "preempted_req_ids", None)
        if self._saver is not None and preempted:
            self._saver.wait_for(preempted)

    def bind_connector_metadata(self, connector_metadata: KVStoreConnectorMetadata) -> None:
        self._meta = connector_metadata

    def clear_connector_metadata(self) -> None:
        self._meta = None

    def start_load_kv(self, forward_context: Any = None, **kwargs: Any) -> None:
        """Load every granted request's blocks (synchronously, all layers)."""
        for req in self._step_requests(is_store=False):
            start_s = time.perf_counter()
            result = self._worker().load_blocks(req.token_ids[:req.num_tokens], req.block_ids,
                                                num_computed_tokens=req.num_local_tokens)
            loaded_blocks = result.num_tokens_loaded // self.config.block_size
            wanted_blocks = req.num_tokens // self.config.block_size
            failed = req.block_ids[loaded_blocks:wanted_blocks]
            self._load_error_block_ids.update(failed)
            self.stats.load_s += time.perf_counter() - start_s
            self.stats.bytes_loaded += result.num_bytes_read
            self.stats.num_blocks_loaded += result.num_bytes_read // self._block_bytes()
            self.stats.num_blocks_failed += len(failed)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: start_load_kv loaded every layer."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        """Nothing per layer: wait_for_save gathers all layers in one pass."""

    def wait_for_save(self) -> None:
        """Save (or, with ``async_save``, hand to the save thread) the full prompt blocks of
        every request this step completed."""
        wait_start_s = time.perf_counter()
        ready = None
        for req in self._step_requests(is_store=True):
            if self._saver is not None:
                if ready is None and self._worker().layers[0].is_cuda:
                    # NOTE: the forward's kernels may still run on the engine's stream; the
                    # save thread reads the pages only after this event (not tested here:
                    # no GPU on this machine)
                    ready = torch.cuda.Event()
                    ready.record()
                self._saver.submit(SaveJob(req.request_id, req.token_ids, req.block_ids,
                                           ready))
                continue
            start_s = time.perf_counter()
            result = self._worker().save_blocks(req.token_ids, req.block_ids)
            self._count_save(result, time.perf_counter() - start_s)
        with self._stats_lock:
            self.stats.save_wait_s += time.perf_counter() - wait_start_s

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished sends: requests vLLM finished (now or before) whose asynchronous saves all
        ended; vLLM frees their pages. Nothing is ever received asynchronously."""
        if self._saver is None:
            return None, None
        done = self._saver.finished(finished_req_ids)
        with self._stats_lock:
            self.stats.num_finished_sends += len(done)
        return done or None, None

    def shutdown(self) -> None:
        """Wait for the pending saves (up to 60 s), then stop the save thread. Idempotent."""
        if self._saver is not None:
            self._saver.close()

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Pages whose load failed since the last call (the engine recomputes them)."""
        failed, self._load_error_block_ids = self._load_error_block_ids, set()
        return failed

    # == helpers ==============================================================================
    def _count_save(self, result: Any, seconds: float) -> None:
        """Add one save's figures; ``result`` None: the save raised (logged by the saver)."""
        with self._stats_lock:
            self.stats.save_s += seconds
            if result is None:
                self.stats.num_saves_failed += 1
                return
            self.stats.bytes_saved += result.num_bytes_written
            self.stats.num_blocks_saved += result.num_bytes_written // self._block_bytes()
            self.stats.num_saves_failed += bool(result.failed_keys)

    def _step_requests(self, *, is_store: bool) -> list[ReqMeta]:
        if self._meta is None:
            return []
        return [req for req in self._meta.requests if req.is_store == is_store]

    def _block_bytes(self) -> int:
        return self._worker().format.block_bytes

    def _worker(self) -> PagedKVConnector:
        if self._paged is None:
            raise InvalidArgumentError("register_kv_caches must be called before transfers")
        return self._paged


KVStoreConnectorV1 = KVStoreConnector  # NOTE: the spelling kvstore.engine exported before
