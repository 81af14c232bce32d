"""kvstore as SGLang's HiCache storage backend (its L3 tier), loaded by configuration::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config '{
        "backend_name": "kvstore", "module_path": "kvstore.engine.sglang",
        "class_name": "KVStoreHiCacheStorage", "master": "HOST:PORT"}'

SGLang's HiCache controller hands the backend page hashes (prefix-chained by SGLang itself)
and host-pool indices. Objects: one per page and K/V half (MHA) or one per page (MLA), with
the byte ranges the host pool's ``get_page_buffer_meta`` names, read and written in place
(no staging copy). Keys: ``sglang/<namespace>/<tp_rank>_<tp_size>/<page hash>_k`` (``_v``),
so ``batch_exists`` is one ``match_prefix`` over the pages' object chain.

Results follow SGLang's contract: ``batch_set_v1``/``batch_get_v1`` return one bool per
page (a page whose objects did not all move is False, and SGLang recomputes it);
``batch_exists`` the number of leading pages stored. Nothing raises for a failed transfer;
a missing ``master`` in the extra config raises ConfigError when the backend is created.
"""

from __future__ import annotations

import ctypes
from typing import Any, List, Optional

import torch

from kvstore._errors import ConfigError, InvalidArgumentError, KVStoreError

try:  # NOTE: any import failure means "no SGLang": the class then stands alone.
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage as _Base  # type: ignore
except Exception:  # noqa: BLE001
    _Base = object


class KVStoreHiCacheStorage(_Base):  # type: ignore[misc, valid-type]
    """SGLang ``HiCacheStorage`` on kvstore (see the module docstring).

    ``storage_config``: SGLang's HiCacheStorageConfig (``tp_rank``, ``tp_size``,
    ``is_mla_model``, ``model_name``, ``extra_config``); extra config keys ``master``
    (required), ``token``, ``transport``, ``namespace`` (default: the model name).
    ``store``: an open kvstore client to use instead (borrowed, not closed).
    """

    def __init__(self, storage_config: Any, kwargs: Optional[dict] = None, *, store: Any = None):
        extra = dict(getattr(storage_config, "extra_config", None) or {})
        self.storage_config = storage_config
        self.is_mla = bool(getattr(storage_config, "is_mla_model", False))
        namespace = extra.get("namespace") or getattr(storage_config, "model_name", None) or "model"
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(namespace))
        rank = f"{storage_config.tp_rank}_{storage_config.tp_size}" if not self.is_mla else "mla"
        self.prefix = f"sglang/{safe}/{rank}/"
        self._owns_store = store is None
        if store is None:
            import kvstore

            master = extra.get("master")
            if not master:
                # NOTE: no default address: a guessed master would connect to the wrong
                # cluster far from the config line that forgot it.
                raise ConfigError('the HiCache storage extra config must name the kvstore master: '
                                  '{"master": "HOST:PORT", ...}')
            store = kvstore.connect(master, token=extra.get("token"),
                                    transport=extra.get("transport", "auto"))
        self.store = store
        self.mem_pool_host: Any = None
        self._pool_range = (0, 0)
        self.num_pages_saved = self.num_pages_loaded = self.num_pages_failed = 0

    # == setup ================================================================================
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """The host KV pool whose pages move; its buffer bounds every pointer used."""
        self.mem_pool_host = mem_pool_host
        buffer = mem_pool_host.kv_buffer
        if buffer.device.type != "cpu":
            raise InvalidArgumentError("the host KV pool must live in host memory")
        start = buffer.data_ptr()
        self._pool_range = (start, start + buffer.numel() * buffer.element_size())

    # == zero-copy v1 interface ===============================================================
    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> List[bool]:
        """Store pages ``keys`` from host pool ``host_indices``; pages already stored are
        skipped (one ``batch_exists``). One bool per page."""
        names, views, per_page = self._objects(keys, host_indices)
        present = self._safe(lambda: self.store.batch_exists(names), [False] * len(names))
        missing = [i for i, p in enumerate(present) if not p]
        ok = [bool(p) for p in present]
        if missing:
            results = self._safe(lambda: self.store.batch_put(
                [names[i] for i in missing], [views[i] for i in missing]), None)
            for n, i in enumerate(missing):
                ok[i] = results is not None and results[n] is None
        pages = _per_page(ok, per_page)
        self.num_pages_saved += sum(pages)
        self.num_pages_failed += len(pages) - sum(pages)
        return pages

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Any = None) -> List[bool]:
        """Read pages ``keys`` into host pool ``host_indices``; one bool per page (False:
        missing or failed, SGLang recomputes it)."""
        names, views, per_page = self._objects(keys, host_indices)
        results = self._safe(lambda: self.store.batch_get_into(names, views), None)
        if results is None:
            results = [KVStoreError("get failed")] * len(names)
        ok = [isinstance(r, int) and r == len(v) for r, v in zip(results, views)]
        pages = _per_page(ok, per_page)
        self.num_pages_loaded += sum(pages)
        self.num_pages_failed += len(pages) - sum(pages)
        return pages

    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        """How many leading pages of ``keys`` are stored (one ``match_prefix``)."""
        if not keys:
            return 0
        names = [self.prefix + key + suffix for key in keys for suffix in self._suffixes()]
        matched = self._safe(lambda: self.store.match_prefix(names), 0)
        return matched // len(self._suffixes())

    # == plain interface ======================================================================
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None
            ) -> torch.Tensor | None:
        """The object under ``key`` read into ``target_location`` (a CPU tensor, returned) or
        into a new uint8 tensor; None if it is missing or cannot be read."""
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: List[str], target_locations: Any = None, target_sizes: Any = None
                  ) -> List[torch.Tensor | None]:
        names = [self.prefix + key for key in keys]
        if target_locations is None:
            results = self._safe(lambda: self.store.batch_get(names), [None] * len(names))
            return [torch.frombuffer(bytearray(r), dtype=torch.uint8) if isinstance(r, bytes)
                    else None for r in results]
        targets = list(target_locations)
        results = self._safe(lambda: self.store.batch_get_into(names, targets),
                             [None] * len(names))
        return [t if isinstance(r, int) else None for t, r in zip(targets, results)]

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        """Store CPU tensors (or bytes) ``values``; True if every key is stored."""
        if values is None or len(values) != len(keys):
            return False
        results = self._safe(lambda: self.store.batch_put([self.prefix + k for k in keys],
                                                          list(values)), None)
        return results is not None and all(r is None for r in results)

    def exists(self, key: str) -> bool:
        return bool(self._safe(lambda: self.store.exists(self.prefix + key), False))

    def clear(self) -> None:
        """Remove every object of this backend's namespace."""
        self._safe(lambda: self.store.remove_prefix(self.prefix, force=True), 0)

    def get_stats(self) -> dict:
        return {"pages_saved": self.num_pages_saved, "pages_loaded": self.num_pages_loaded,
                "pages_failed": self.num_pages_failed}

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    # == helpers ==============================================================================
    def _suffixes(self) -> tuple[str, ...]:
        return ("_k",) if self.is_mla else ("_k", "_v")

    def _objects(self, keys: List[str], host_indices: torch.Tensor
                 ) -> tuple[list[str], list[memoryview], int]:
        """Object names and in-place views of their bytes in the host pool."""
        if self.mem_pool_host is None:
            raise InvalidArgumentError("register_mem_pool_host must be called first")
        pool = self.mem_pool_host
        if len(host_indices) != len(keys) * pool.page_size:
            raise InvalidArgumentError(f"{len(keys)} pages need {len(keys) * pool.page_size} "
                                       f"host indices, got {len(host_indices)}")
        ptrs, sizes = pool.get_page_buffer_meta(host_indices)
        suffixes = self._suffixes()
        if len(ptrs) != len(keys) * len(suffixes):
            raise InvalidArgumentError(
                f"host pool layout {pool.layout!r} gives {len(ptrs)} buffers for {len(keys)} "
                f"pages; use page_first or page_first_direct (one buffer per page and K/V)")
        names = [self.prefix + key + suffix for key in keys for suffix in suffixes]
        return names, [self._view(p, s) for p, s in zip(ptrs, sizes)], len(suffixes)

    def _view(self, ptr: int, size: int) -> memoryview:
        start, end = self._pool_range
        if not start <= ptr or ptr + size > end:
            raise InvalidArgumentError(f"buffer 0x{ptr:x}+{size} lies outside the host pool")
        return memoryview((ctypes.c_char * size).from_address(ptr)).cast("B")

    @staticmethod
    def _safe(call: Any, default: Any) -> Any:
        """A store call's result, or ``default`` when it fails (SGLang's backends never raise
        for a transfer: the controller treats the pages as not stored / not loaded)."""
        try:
            return call()
        except KVStoreError:
            return default


def _per_page(ok: list[bool], per_page: int) -> list[bool]:
    return [all(ok[i:i + per_page]) for i in range(0, len(ok), per_page)]
