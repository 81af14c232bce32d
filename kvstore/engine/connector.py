"""PagedKVConnector: save a request's KV pages to the store and load them back into pages.

Save: the request's full blocks get prefix-chunk keys (``prefix_keys``); blocks already stored
are skipped (one ``batch_exists``); the rest are gathered from the pages into one staging
tensor (fused INT8 quantization when asked) and written with one ``batch_put``.

Load: ``match_prefix`` finds the longest stored prefix of the request's block keys, one
``batch_get_into`` reads those objects into staging rows, and the leading run of blocks that
arrived is scattered into the given pages. The engine computes only the tokens after it. A
CPU cache of a raw format skips the staging rows: blocks on this host's shm are scattered
from leased views of the segments, each verified first, and a save gathers straight into
the ranges its PutStart reserved (which also says which blocks are stored: no
``batch_exists``); both pipelined in chunks on a copy thread (``kvstore.engine.in_place``).

Failures: a block that cannot be written or read is named in the result's ``failed_keys``
(the engine recomputes it); a failed batch never raises for the whole request. Only invalid
arguments raise (InvalidArgumentError) and a closed store raises ClosedError.

Tensor parallelism: the namespace's ``tp_rank``/``tp_size`` name this connector's shard. A
decode side with another TP size passes ``source_tp_size`` to load from shards saved with that
size: heads are split (fewer source ranks) or joined (more), see ``kvstore.engine.tp``.

Thread safety: one connector per engine worker thread (the staging buffer and the copy
thread are its own).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Sequence

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.engine import tp
from kvstore.engine.blocks import BlockFormat, gather_blocks, scatter_blocks
from kvstore.engine.in_place import (COPY_THREADS, Worker, can_reserve, check_copy_threads,
                                     load_in_place, put_in_place)
from kvstore.engine.keys import KeyNamespace, prefix_keys
from kvstore.engine.results import LoadResult, SaveResult, block_arrived, num_leading_arrived

class PagedKVConnector:
    """Moves a request's KV blocks between a paged cache and a kvstore.

    ``layers``: per-layer paged tensors of this shard's heads, ``[2, num_blocks, block_size,
    num_kv_heads, head_dim]``, ``[num_blocks, 2, ...]`` or MLA ``[num_blocks, block_size,
    latent_dim]`` (``layout`` as ``kvstore.ops`` names it; detected when None).
    ``namespace``: a KeyNamespace (its layout, dtype and quantization fields are set from the
    cache) or a rendered string, used as is. ``copy_threads``: threads of each in-place
    copy (``in_place.COPY_THREADS`` by default; None: torch's intra-op count). The store is
    borrowed, not owned: closing it is the caller's job.
    """

    def __init__(self, store: Any, layers: Sequence[torch.Tensor], *, block_size: int,
                 quantize: str | None = None, namespace: KeyNamespace | str,
                 source_tp_size: int | None = None, layout: str | None = None,
                 copy_threads: int | None = COPY_THREADS):
        self.store = store
        self.layers = list(layers)
        self.format = BlockFormat.of_layers(self.layers, quantize, layout)
        if block_size != self.format.block_size:
            raise InvalidArgumentError(f"block_size={block_size} but the pages hold "
                                       f"{self.format.block_size} tokens per block")
        self.block_size = block_size
        self.quantize = quantize
        self.namespace = complete_namespace(namespace, self.format)
        self.source_tp_size = source_tp_size
        self.copy_threads = check_copy_threads(copy_threads)
        self._staging = torch.empty(0, dtype=torch.uint8)
        self._worker = Worker()   # the in-place copies' thread (``in_place``)

    # -- keys --------------------------------------------------------------------------------
    def keys_for(self, token_ids: Any, namespace: KeyNamespace | str | None = None) -> list[str]:
        """Keys of the request's full blocks under this connector's (or the given) namespace."""
        return prefix_keys(token_ids, chunk_size=self.block_size,
                           namespace=namespace or self.namespace)

    def num_stored_tokens(self, token_ids: Any) -> int:
        """Leading tokens of ``token_ids`` whose blocks are in the store (one RPC)."""
        if self._is_heterogeneous():
            return tp.num_stored_tokens(self, token_ids)
        keys = self.keys_for(token_ids)
        return self.store.match_prefix(keys) * self.block_size if keys else 0

    # -- save --------------------------------------------------------------------------------
    def save(self, token_ids: Any, block_ids: Sequence[int] | torch.Tensor) -> int:
        """Store the request's full blocks; returns how many are now stored. See save_blocks."""
        return self.save_blocks(token_ids, block_ids).num_blocks_stored

    def save_blocks(self, token_ids: Any, block_ids: Sequence[int] | torch.Tensor) -> SaveResult:
        """Store every full block of ``token_ids`` from pages ``block_ids`` (block ``i`` of
        the request lives in page ``block_ids[i]``). Idempotent: stored blocks are skipped."""
        keys = self.keys_for(token_ids)
        block_index = self._block_index(block_ids, len(keys))
        if not keys:
            return SaveResult(0, 0, [])
        if self._saves_in_place():
            # NOTE: no batch_exists: the reservations' PutStart answers which keys are
            # stored (they get no view), one round trip fewer
            missing = list(range(len(keys)))
            results, written = self._save_in_place(keys, block_index[:len(keys)])
            num_written = sum(written)
        else:
            present = self.store.batch_exists(keys)
            missing = [i for i, exists in enumerate(present) if not exists]
            if not missing:
                return SaveResult(len(keys), 0, [])
            rows = gather_blocks(self.layers, block_index[missing], self.format,
                                 self._staging_rows(len(missing)))
            results = self.store.batch_put([keys[i] for i in missing], list(rows))
            num_written = sum(result is None for result in results)
        failed = [keys[i] for i, result in zip(missing, results) if result is not None]
        return SaveResult(len(keys) - len(failed), num_written * self.format.block_bytes, failed)

    # -- load --------------------------------------------------------------------------------
    def load(self, token_ids: Any, block_ids: Sequence[int] | torch.Tensor) -> int:
        """Load the longest stored prefix; returns leading tokens loaded. See load_blocks."""
        return self.load_blocks(token_ids, block_ids).num_tokens_loaded

    def load_blocks(self, token_ids: Any, block_ids: Sequence[int] | torch.Tensor, *,
                    num_computed_tokens: int = 0) -> LoadResult:
        """Load the longest stored run of leading full blocks of ``token_ids`` into pages
        ``block_ids`` (at most ``len(block_ids)`` blocks). The first ``num_computed_tokens //
        block_size`` blocks are already in the pages (a local prefix-cache hit): they are
        neither read nor written. ``num_tokens_loaded`` counts from token 0 (local blocks
        included). Pages past the
        loaded run are left untouched, except after a block that failed its checksum on the
        in-place path: a later page may then hold its own block's verified KV (see
        ``in_place.load_in_place``); never bytes that failed verification."""
        keys = self.keys_for(token_ids)
        num_usable = min(len(keys), len(block_ids) if block_ids is not None else 0)
        block_index = self._block_index(block_ids, 0)
        if not isinstance(num_computed_tokens, int) or num_computed_tokens < 0:
            raise InvalidArgumentError(f"num_computed_tokens must be an int >= 0, got "
                                       f"{num_computed_tokens!r}")
        num_skip = min(num_computed_tokens // self.block_size, num_usable)
        if num_usable == 0:
            return LoadResult(0, 0, [])
        if self._is_heterogeneous():
            return tp.load_resharded(self, token_ids, block_index[:num_usable], num_skip)
        if num_skip == 0 and self._saves_in_place():
            # NOTE: no match_prefix: the in-place load's GetReplicas answers which leading
            # keys are stored (one round trip of the load's two)
            num_ok, failed = self._load_in_place(keys[:num_usable], block_index[:num_usable],
                                                 to_first_missing=True)
            return LoadResult(num_ok * self.block_size, num_ok * self.format.block_bytes,
                              failed)
        num_hit = self.store.match_prefix(keys[:num_usable])
        if num_hit <= num_skip:
            return LoadResult(num_hit * self.block_size, 0, [])
        wanted = keys[num_skip:num_hit]
        pages = block_index[num_skip:num_hit]
        if self._saves_in_place():
            num_ok, failed = self._load_in_place(wanted, pages)
        else:
            rows = self._staging_rows(len(wanted))
            results = self.store.batch_get_into(wanted, list(rows))
            num_ok = num_leading_arrived(results, self.format.block_bytes)
            failed = [k for k, r in zip(wanted, results)
                      if not block_arrived(r, self.format.block_bytes)]
            if num_ok:
                scatter_blocks(rows[:num_ok], self.layers, pages[:num_ok], self.format)
        return LoadResult((num_skip + num_ok) * self.block_size,
                          num_ok * self.format.block_bytes, failed)

    def warm_up(self, num_blocks: int) -> None:
        """Make the first real transfer as fast as later ones: size and touch the staging
        buffer for ``num_blocks`` blocks, and run the copy kernels once on scratch pages (the
        cache is only read). No store I/O. Engines call it once at start-up."""
        self._staging_rows(num_blocks).fill_(0)
        block_dim = 1 if self.format.layout == "kv_first" else 0
        scratch = [torch.zeros_like(layer.narrow(block_dim, 0, 1)) for layer in self.layers]
        first = torch.zeros(1, dtype=torch.long)
        rows = gather_blocks(self.layers, first, self.format, self._staging_rows(1))
        scatter_blocks(rows, scratch, first, self.format)
        store_round_trip(self.store, rows[0])

    # -- helpers -----------------------------------------------------------------------------
    def _saves_in_place(self) -> bool:
        """True when a save gathers straight into the store's reserved ranges: a CPU cache
        in a raw kv/MLA format, and a ``KVStore`` (``kvstore.client.reserve``)."""
        return (self.layers[0].device.type == "cpu" and self.format.quantize is None and
                self.format.layout != "head_major" and can_reserve(self.store))

    def _save_in_place(self, keys: list[str], block_index: torch.Tensor
                       ) -> tuple[list, list[bool]]:
        """Put blocks ``block_index`` under ``keys``, gathered straight into the ranges the
        store reserved for them (``put_in_place``: results, written per key)."""
        from kvstore import ops

        def fill(positions: list[int], views: list[memoryview]) -> list[int]:
            return ops.gather_pages_to_rows(self.layers, block_index[positions], views,
                                            layout=self.format.layout, checksums=True,
                                            num_threads=self.copy_threads)

        return put_in_place(self.store, keys, self.format.block_bytes, fill, self._worker)

    def _load_in_place(self, keys: list[str], pages: torch.Tensor, *,
                       to_first_missing: bool = False) -> tuple[int, list[str]]:
        """Blocks ``keys`` into ``pages``, scattered (and verified) straight from where they
        are stored (``load_in_place``); (leading blocks loaded, failed keys)."""
        from kvstore import ops

        def scatter(first: int, rows: Any, checksums: Any) -> list[bool] | None:
            return ops.scatter_rows_to_pages(rows, self.layers, pages[first:first + len(rows)],
                                             layout=self.format.layout, checksums=checksums,
                                             num_threads=self.copy_threads)

        return load_in_place(self.store, keys, self.format.block_bytes, scatter,
                             self._staging_rows, self._worker,
                             to_first_missing=to_first_missing)

    def _is_heterogeneous(self) -> bool:
        if self.source_tp_size is None:
            return False
        if not isinstance(self.namespace, KeyNamespace):
            raise InvalidArgumentError("source_tp_size needs a KeyNamespace (it names shards)")
        return self.source_tp_size != self.namespace.tp_size

    def _staging_rows(self, num_blocks: int) -> torch.Tensor:
        """``[num_blocks, block_bytes]`` uint8 rows, reused across calls so a steady stream of
        requests does not page-fault fresh memory for every transfer."""
        needed = num_blocks * self.format.block_bytes
        if self._staging.numel() < needed:
            # pinned for a GPU cache, so its uploads and downloads are direct DMA
            pinned = self.layers[0].device.type == "cuda"
            self._staging = torch.empty(needed, dtype=torch.uint8, pin_memory=pinned)
        return self._staging[:needed].view(num_blocks, self.format.block_bytes)

    def _block_index(self, block_ids: Any, num_needed: int) -> torch.Tensor:
        index = torch.as_tensor(block_ids if block_ids is not None else [], dtype=torch.long)
        if index.dim() != 1 or len(index) < num_needed:
            raise InvalidArgumentError(f"block_ids must be 1-D with at least {num_needed} ids "
                                       f"(one per full block), got shape {tuple(index.shape)}")
        num_pages = self.layers[0].shape[1 if self.format.layout == "kv_first" else 0]
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= num_pages):
            raise InvalidArgumentError(f"block ids must lie in [0, {num_pages})")
        return index  # kvstore.ops wants the ids on the host


def store_round_trip(store: Any, row: torch.Tensor) -> None:
    """Put, read back and remove one block-sized object under a unique key, so the first
    real transfer does not pay for opening transports and mapping segments."""
    key = f"kvstore-engine-warmup/{uuid.uuid4().hex}"
    store.put(key, row)
    store.get_into(key, row)
    store.remove(key, force=True)


def complete_namespace(namespace: KeyNamespace | str, fmt: BlockFormat) -> KeyNamespace | str:
    """Fill the cache-derived fields of a KeyNamespace so keys never mix formats."""
    if not isinstance(namespace, KeyNamespace):
        if not isinstance(namespace, str):
            raise InvalidArgumentError(f"namespace must be a KeyNamespace or str, got "
                                       f"{type(namespace).__name__}")
        return namespace
    dtype = str(fmt.dtype).removeprefix("torch.")
    return dataclasses.replace(namespace, layout=fmt.tag, dtype=dtype,
                               quantization=fmt.quantize)
