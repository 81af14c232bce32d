"""Heterogeneous tensor parallelism: load KV saved by shards of another TP size.

With TP size ``P`` each shard ``p`` holds KV heads ``[p*H/P, (p+1)*H/P)`` of the ``H`` KV
heads and saves them under its own namespace (``tp_rank=p, tp_size=P``). A loader with TP size
``D`` and rank ``d`` needs heads ``[d*H/D, (d+1)*H/D)``: it reads the blocks of every source
shard that overlaps that range (one batched get for all of them) and copies the overlapping
heads into its pages, so heads are split (``P < D``) or joined (``P > D``).

Rule: ``H`` must divide by both ``P`` and ``D`` (no head replication), else
InvalidArgumentError. The whole source object is read even when only some of its heads are
needed, because an object is the unit of transfer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.engine.blocks import BlockFormat, decode_rows, scatter_payload
from kvstore.engine.keys import KeyNamespace
from kvstore.engine.results import LoadResult, block_arrived, num_leading_arrived


class ShardConnector(Protocol):
    """What resharding reads from the connector that calls it (a ``PagedKVConnector``).

    NOTE: a Protocol rather than an import of the connector, which imports this module.
    """

    store: Any
    layers: Sequence[torch.Tensor]
    format: BlockFormat
    namespace: KeyNamespace | str
    block_size: int
    source_tp_size: int | None

    def keys_for(self, token_ids: Any, namespace: KeyNamespace | str | None = None) -> list[str]:
        ...


@dataclasses.dataclass(frozen=True)
class ShardSlice:
    """Heads ``[src_head_start, src_head_end)`` of source shard ``source_rank`` land at
    heads ``[dst_head_start, ...)`` of the loader's pages."""

    source_rank: int
    src_head_start: int
    src_head_end: int
    dst_head_start: int


def plan(num_local_heads: int, tp_rank: int, tp_size: int, source_tp_size: int) -> list[ShardSlice]:
    """The source shards (and head ranges) that make up rank ``tp_rank``'s heads."""
    total_heads = num_local_heads * tp_size
    if source_tp_size < 1 or total_heads % source_tp_size:
        raise InvalidArgumentError(f"{total_heads} KV heads cannot be split over source TP size "
                                   f"{source_tp_size}")
    source_heads = total_heads // source_tp_size
    start, end = tp_rank * num_local_heads, (tp_rank + 1) * num_local_heads
    slices = []
    for rank in range(start // source_heads, (end - 1) // source_heads + 1):
        lo, hi = max(start, rank * source_heads), min(end, (rank + 1) * source_heads)
        slices.append(ShardSlice(rank, lo - rank * source_heads, hi - rank * source_heads,
                                 lo - start))
    return slices


def _source_keys(connector: ShardConnector, token_ids: Any) -> tuple[list, list[list[str]]]:
    ns = connector.namespace
    if connector.format.layout == "mla":
        raise InvalidArgumentError("an MLA latent is not split across TP ranks: no resharding")
    if not isinstance(ns, KeyNamespace):
        raise InvalidArgumentError("source_tp_size needs a KeyNamespace (it names the shards)")
    slices = plan(connector.format.num_kv_heads, ns.tp_rank, ns.tp_size, connector.source_tp_size)
    keys = [connector.keys_for(token_ids, ns.for_shard(s.source_rank, connector.source_tp_size))
            for s in slices]
    return slices, keys


def num_stored_tokens(connector: ShardConnector, token_ids: Any) -> int:
    """Leading tokens stored by every needed source shard."""
    _, keys = _source_keys(connector, token_ids)
    if not keys[0]:
        return 0
    return min(connector.store.match_prefix(k) for k in keys) * connector.block_size


def load_resharded(connector: ShardConnector, token_ids: Any, block_index: torch.Tensor,
                   num_skip: int = 0) -> LoadResult:
    """Load the leading blocks stored by all needed source shards into ``block_index``; the
    first ``num_skip`` blocks are already in the pages and are not moved."""

    fmt = connector.format
    slices, keys = _source_keys(connector, token_ids)
    num_blocks = min(len(block_index), len(keys[0]))
    num_hit = min(connector.store.match_prefix(k[:num_blocks]) for k in keys)
    if num_hit <= num_skip:
        return LoadResult(num_hit * connector.block_size, 0, [])
    num_wanted = num_hit - num_skip
    source_heads = fmt.num_kv_heads * connector.namespace.tp_size // connector.source_tp_size
    source_fmt = fmt.with_heads(source_heads)
    rows = torch.empty(len(slices) * num_wanted, source_fmt.block_bytes, dtype=torch.uint8)
    all_keys = [key for shard_keys in keys for key in shard_keys[num_skip:num_hit]]
    results = connector.store.batch_get_into(all_keys, list(rows))
    # a block is usable only when every shard's copy of it arrived
    num_ok = min(num_leading_arrived(results[i * num_wanted:(i + 1) * num_wanted],
                             source_fmt.block_bytes) for i in range(len(slices)))
    failed = [k for k, r in zip(all_keys, results) if not block_arrived(r, source_fmt.block_bytes)]
    if num_ok == 0:
        return LoadResult(num_skip * connector.block_size, 0, failed)
    joined = torch.empty(num_ok, *fmt.block_shape, dtype=fmt.dtype)
    for i, piece in enumerate(slices):
        source = decode_rows(rows[i * num_wanted:i * num_wanted + num_ok], source_fmt)
        width = piece.src_head_end - piece.src_head_start
        joined[..., piece.dst_head_start:piece.dst_head_start + width, :].copy_(
            source[..., piece.src_head_start:piece.src_head_end, :])
    scatter_payload(joined, connector.layers, block_index[num_skip:num_skip + num_ok], fmt)
    return LoadResult((num_skip + num_ok) * connector.block_size,
                      len(slices) * num_ok * source_fmt.block_bytes, failed)
