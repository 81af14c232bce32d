"""DynamicCacheConnector: save a transformers ``DynamicCache`` to the store and rebuild one.

A transformers cache is not paged, so going through a paged cache (``hf_cache``) costs two
extra passes over the KV. This connector writes the cache's full blocks straight into staging
rows in the stored block form of ``kvstore.engine.blocks`` (one strided copy per tensor) and
rebuilds a cache from rows the same way. The form and the keys are those of
``PagedKVConnector`` with a ``[2, num_blocks, ...]`` cache of the same shape, so a block
saved from a transformers cache loads into a paged engine and the other way round.

Guarantees and errors as ``PagedKVConnector``: one ``batch_exists`` and one ``batch_put``
per save (stored blocks skipped), one ``match_prefix`` and one ``batch_get_into`` per load
(a raw CPU cache from a ``KVStore``: in place, ``kvstore.engine.in_place``: the save
gathers into the reserved ranges, whose PutStart also skips the stored blocks, the load
scatters verified blocks straight from the segments, its GetReplicas standing in for the
``match_prefix``; both pipelined in chunks, each copy on ``copy_threads`` threads),
failed blocks named in the result, only bad arguments and a closed store raise. Batch size 1.
Thread safety: one connector per thread (the staging buffer is reused).
"""

from __future__ import annotations

from typing import Any

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.engine.arenas import TensorArenas
from kvstore.engine.blocks import BlockFormat, decode_rows
from kvstore.engine.connector import complete_namespace, store_round_trip
from kvstore.engine.in_place import (COPY_THREADS, Worker, can_reserve, check_copy_threads,
                                     load_in_place, put_in_place)
from kvstore.engine.copies import copy_one_thread
from kvstore.engine.hf_cache import cache_pairs
from kvstore.engine.keys import KeyNamespace, prefix_keys
from kvstore.engine.results import LoadResult, SaveResult, block_arrived, num_leading_arrived


class DynamicCacheConnector:
    """Moves the full blocks of a one-request ``DynamicCache`` to and from a kvstore."""

    def __init__(self, store: Any, *, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, block_size: int, quantize: str | None = None,
                 namespace: KeyNamespace | str, device: str | torch.device = "cpu",
                 copy_threads: int | None = COPY_THREADS):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        self.store = store
        self.device = torch.device(device)  # where load_cache puts the rebuilt cache
        self.block_size = block_size
        self.format = BlockFormat((num_layers, 2, block_size, num_kv_heads, head_dim), 2, dtype,
                                  "kv_first", quantize)
        self.namespace = complete_namespace(namespace, self.format)
        self.copy_threads = check_copy_threads(copy_threads)   # as PagedKVConnector's
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._worker = Worker()   # the in-place copies' thread (``in_place``)
        self._arenas = TensorArenas()   # memory of rebuilt caches, reused (``arenas``)

    def keys_for(self, token_ids: Any) -> list[str]:
        return prefix_keys(token_ids, chunk_size=self.block_size, namespace=self.namespace)

    def save_blocks(self, cache: Any, token_ids: Any) -> SaveResult:
        """Store every full block of ``token_ids`` whose KV the cache holds (the cache holds
        at least as many tokens as the full blocks cover, else InvalidArgumentError)."""
        keys = self.keys_for(token_ids)
        pairs = self._pairs(cache, len(keys) * self.block_size)
        if not keys:
            return SaveResult(0, 0, [])
        fmt = self.format
        tensors = _token_tensors(pairs) if fmt.quantize is None else None
        if tensors is not None and can_reserve(self.store):
            from kvstore import ops

            # NOTE: no batch_exists: the reservations' PutStart answers which keys are
            # stored (they get no view), one round trip fewer
            def fill(positions: list[int], views: list[memoryview]) -> list[int]:
                return ops.gather_tokens_to_rows(tensors, positions, views,
                                                 block_size=self.block_size, checksums=True,
                                                 num_threads=self.copy_threads)

            results, written = put_in_place(self.store, keys, fmt.block_bytes, fill,
                                            self._worker)
            failed = [key for key, r in zip(keys, results) if r is not None]
            num_written = sum(written)
            return SaveResult(len(keys) - len(failed), num_written * fmt.block_bytes, failed)
        missing = [i for i, exists in enumerate(self.store.batch_exists(keys)) if not exists]
        if not missing:
            return SaveResult(len(keys), 0, [])
        names = [keys[i] for i in missing]
        rows = self._rows(len(missing))
        if fmt.quantize == "int8":
            from kvstore import ops

            payload = torch.empty(len(missing), *fmt.block_shape, dtype=fmt.dtype)
            self._fill(payload, pairs, missing, len(keys))
            q, scales = ops.quantize_int8(payload, fmt.head_dim)
            rows[:, :fmt.num_values].copy_(q.view(len(missing), -1).view(torch.uint8))
            rows[:, fmt.num_values:].copy_(scales.view(len(missing), -1).view(torch.uint8))
        else:
            self._fill(rows.view(fmt.dtype).view(len(missing), *fmt.block_shape), pairs,
                       missing, len(keys))
        results = self.store.batch_put(names, list(rows))
        failed = [keys[i] for i, r in zip(missing, results) if r is not None]
        num_written = len(missing) - len(failed)
        return SaveResult(len(keys) - len(failed), num_written * fmt.block_bytes, failed)

    def load_cache(self, token_ids: Any, *, config: Any = None) -> tuple[Any, LoadResult]:
        """A new DynamicCache holding the longest stored run of leading full blocks of
        ``token_ids`` (empty when none is stored), and what was loaded."""
        from transformers import DynamicCache

        keys = self.keys_for(token_ids)
        if keys and self._loads_in_place():
            # NOTE: no match_prefix: the in-place load's GetReplicas answers which leading
            # keys are stored (one round trip of the load's two), as PagedKVConnector's
            return self._load_in_place(keys, config, to_first_missing=True)
        num_hit = self.store.match_prefix(keys) if keys else 0
        cache = DynamicCache(config=config)
        if num_hit == 0:
            return cache, LoadResult(0, 0, [])
        fmt = self.format
        rows = self._rows(num_hit)
        results = self.store.batch_get_into(keys[:num_hit], list(rows))
        num_ok = num_leading_arrived(results, fmt.block_bytes)
        failed = [k for k, r in zip(keys[:num_hit], results) if not block_arrived(r, fmt.block_bytes)]
        if num_ok:
            cache = self._cache_from_rows(rows[:num_ok], config)
        return cache, LoadResult(num_ok * self.block_size, num_ok * fmt.block_bytes, failed)

    def _loads_in_place(self) -> bool:
        """True when a load scatters straight from where the blocks are stored (a raw format
        rebuilt on the CPU from a ``KVStore``: ``kvstore.engine.in_place``)."""
        return self.format.quantize is None and self.device.type == "cpu" and \
            can_reserve(self.store)

    def _load_in_place(self, keys: list[str], config: Any, *, to_first_missing: bool = False
                       ) -> tuple[Any, LoadResult]:
        """Blocks ``keys`` scattered (verified) from the store's segments into fresh
        ``[1, H, S, D]`` tensors; the cache holds the leading run that arrived.
        ``to_first_missing``: ``keys`` is the request's whole chain, the first key not
        stored ends it (``in_place.load_in_place``)."""
        from kvstore import ops

        tensors = self._fresh_tensors(len(keys))

        def scatter(first: int, rows: Any, checksums: Any) -> list[bool] | None:
            ids = torch.arange(first, first + len(rows))
            return ops.scatter_rows_to_tokens(rows, tensors, ids, block_size=self.block_size,
                                              checksums=checksums,
                                              num_threads=self.copy_threads)

        num_ok, failed = load_in_place(self.store, keys, self.format.block_bytes, scatter,
                                       self._rows, self._worker,
                                       to_first_missing=to_first_missing)
        cache = self._install(tensors, num_ok, config)
        return cache, LoadResult(num_ok * self.block_size, num_ok * self.format.block_bytes,
                                 failed)

    def _fresh_tensors(self, num_blocks: int) -> list[torch.Tensor]:
        """``[k0, v0, k1, v1, ...]``, each a contiguous ``[1, H, num_blocks * block_size, D]``
        no other tensor shares: views of one arena of ``self._arenas`` (memory an earlier
        load's cache no longer holds, so its pages are not faulted in again)."""
        fmt = self.format
        shape = (1, fmt.num_kv_heads, num_blocks * self.block_size, fmt.head_dim)
        num_elems = shape[1] * shape[2] * shape[3]
        num_tensors = 2 * fmt.block_shape[0]
        arena = self._arenas.take(num_tensors * num_elems, fmt.dtype)
        return [arena[i * num_elems:(i + 1) * num_elems].view(shape)
                for i in range(num_tensors)]

    def _install(self, tensors: list[torch.Tensor], num_blocks: int, config: Any) -> Any:
        """A DynamicCache of the first ``num_blocks`` blocks of ``tensors`` (kept as they are
        when they hold exactly that many; a shorter copy when a load stopped early)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        if num_blocks == 0:
            return cache
        num_tokens = num_blocks * self.block_size
        if tensors[0].shape[2] != num_tokens:
            tensors = [t[:, :, :num_tokens].contiguous() for t in tensors]
        for layer in range(self.format.block_shape[0]):
            _install_layer(cache, layer, tensors[2 * layer], tensors[2 * layer + 1])
        return cache

    def _cache_from_rows(self, rows: torch.Tensor, config: Any) -> Any:
        from transformers import DynamicCache

        fmt = self.format
        num_blocks = rows.shape[0]
        cache = DynamicCache(config=config)
        if fmt.quantize is None and self.device.type == "cpu":
            from kvstore import ops

            # [n, L, 2, B, H, D] rows -> fresh [1, H, n*B, D] per tensor: one pass, one thread
            # per MiB (kvstore.ops.rows), no torch strided copy
            tensors = self._fresh_tensors(num_blocks)
            ops.scatter_rows_to_tokens(rows, tensors, torch.arange(num_blocks),
                                       block_size=self.block_size)
            return self._install(tensors, num_blocks, config)
        payload = decode_rows(rows, fmt)  # [n, L, 2, B, H, D], a view of the rows when raw
        for layer in range(fmt.block_shape[0]):
            # [n, B, H, D] -> [1, H, n*B, D]: the one copy, into fresh tensors
            k, v = (_copy_to_heads_first(payload[:, layer, kv], self.device) for kv in (0, 1))
            _install_layer(cache, layer, k, v)
        return cache

    def warm_up(self, num_blocks: int) -> None:
        """At engine start-up: size and touch the staging buffer, rebuild (and drop) a cache
        of ``num_blocks`` blocks so the allocator holds touched memory of the sizes a load
        allocates, and make one round trip through the store (opens the transports; the
        object is removed again)."""
        rows = self._rows(num_blocks)
        rows.fill_(0)
        if num_blocks:
            self._cache_from_rows(rows, None)
        store_round_trip(self.store, self._rows(1)[0])

    def _fill(self, out: torch.Tensor, pairs: list, missing: list[int], num_blocks: int) -> None:
        """out[j] = block missing[j] of the cache, ``[L, 2, B, H, D]``."""
        first, last = missing[0], missing[-1] + 1
        contiguous = last - first == len(missing)  # the usual case: a tail after a prefix hit
        index = None if contiguous else torch.tensor(missing)
        for layer, (keys, values) in enumerate(pairs):
            for kv, source in ((0, keys), (1, values)):
                heads, dim = source.shape[1], source.shape[3]
                blocks = source[0, :, :num_blocks * self.block_size].reshape(
                    heads, num_blocks, self.block_size, dim).permute(1, 2, 0, 3)
                picked = blocks[first:last] if contiguous else blocks.index_select(0, index)
                copy_one_thread(out[:, layer, kv], picked)

    def _pairs(self, cache: Any, num_tokens: int) -> list:
        pairs = cache_pairs(cache)
        shape = self.format.block_shape
        if len(pairs) != shape[0]:
            raise InvalidArgumentError(f"cache has {len(pairs)} layers, connector {shape[0]}")
        for keys, _ in pairs:
            if (keys.shape[1], keys.shape[3]) != (shape[3], shape[4]) or keys.shape[2] < num_tokens:
                raise InvalidArgumentError(
                    f"cache tensors {tuple(keys.shape)} do not hold {num_tokens} tokens of "
                    f"{shape[3]} heads x {shape[4]}")
            if keys.dtype != self.format.dtype:
                raise InvalidArgumentError(f"cache dtype {keys.dtype}, connector "
                                           f"{self.format.dtype}")
        return pairs

    def _rows(self, num_blocks: int) -> torch.Tensor:
        needed = num_blocks * self.format.block_bytes
        if self._staging.numel() < needed:
            self._staging = torch.empty(needed, dtype=torch.uint8)
        return self._staging[:needed].view(num_blocks, self.format.block_bytes)


def _token_tensors(pairs: list) -> list[torch.Tensor] | None:
    """``[k0, v0, k1, v1, ...]`` when ``kvstore.ops.gather_tokens_to_rows`` can read them
    (CPU, one shape, dtype and set of strides, head_dim dense), else None (the torch
    copies then)."""
    tensors = [t for pair in pairs for t in pair]
    first = tensors[0]
    if first.device.type != "cpu" or first.stride(-1) != 1:
        return None
    if any((t.device, t.dtype, t.shape, t.stride()) !=
           (first.device, first.dtype, first.shape, first.stride()) for t in tensors):
        return None
    return tensors


def _copy_to_heads_first(blocks: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[n, B, H, D]`` block rows -> a fresh contiguous ``[1, H, n*B, D]`` tensor on
    ``device``, in one copy."""
    num_blocks, block_size, heads, dim = blocks.shape
    out = torch.empty(1, heads, num_blocks * block_size, dim, dtype=blocks.dtype, device=device)
    copy_one_thread(out.view(heads, num_blocks, block_size, dim), blocks.permute(2, 0, 1, 3))
    return out


def _install_layer(cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``keys``/``values`` (``[1, H, S, D]``) the whole content of an empty layer of
    ``cache``, keeping the tensors themselves.

    NOTE: ``DynamicCache.update`` concatenates onto the layer's (empty) tensors, which is a
    second full copy of the KV (measured: a third of the load's time in the PD demo). For a
    plain ``DynamicLayer`` (transformers >= 4.54) the layer is laid out by an update with no
    tokens and then holds our tensors; any other layer type (sliding window, older cache
    API) goes through ``update``, which is always correct.
    """
    cache.update(keys[:, :, :0], values[:, :, :0], layer)
    layers = getattr(cache, "layers", None)
    target = layers[layer] if layers is not None and layer < len(layers) else None
    if type(target).__name__ == "DynamicLayer" and target.keys.shape[-2] == 0:
        target.keys, target.values = keys, values
    else:
        cache.update(keys, values, layer)
