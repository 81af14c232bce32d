"""Hugging Face transformers adapter: a ``DynamicCache`` to and from a paged KV cache.

transformers keeps, per layer, keys and values as ``[batch, num_kv_heads, seq, head_dim]``.
Paged engines (and ``PagedKVConnector``) keep, per layer, ``[2, num_blocks, block_size,
num_kv_heads, head_dim]`` (K then V). ``PagedCache`` is such a paged cache on CPU or GPU;
``cache_to_pages`` copies a DynamicCache's first tokens into given pages and ``pages_to_cache``
builds a DynamicCache from pages, so a prefill process can save a transformers cache through
``PagedKVConnector`` and a decode process can rebuild it and go on generating.

Only batch size 1 is supported (one request per cache), which is what a PD handover moves.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kvstore._errors import InvalidArgumentError


class PagedCache:
    """A paged KV cache: ``layers[i]`` is ``[2, num_blocks, block_size, num_kv_heads,
    head_dim]``. Owns its tensors; blocks are handed out by the caller (no allocator here)."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layers = [torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim,
                                   dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[1]


def _block_index(block_ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(block_ids, dtype=torch.long).to(device)


def cache_to_pages(cache: Any, layers: Sequence[torch.Tensor], block_ids: Sequence[int],
                   *, block_size: int, num_tokens: int | None = None) -> int:
    """Copy the first ``num_tokens`` tokens of a DynamicCache into pages ``block_ids``.

    ``num_tokens`` defaults to every full block the cache holds; it must be a multiple of
    ``block_size`` no larger than the cache length, and ``block_ids`` must hold at least
    ``num_tokens // block_size`` ids (extra ids are ignored). Returns the number of blocks
    written. Raises InvalidArgumentError on a shape, length or batch-size mismatch.
    """
    pairs = cache_pairs(cache)
    if len(pairs) != len(layers):
        raise InvalidArgumentError(f"cache has {len(pairs)} layers, paged cache {len(layers)}")
    seq_len = pairs[0][0].shape[2]
    if num_tokens is None:
        num_tokens = seq_len - seq_len % block_size
    if num_tokens % block_size or not 0 <= num_tokens <= seq_len:
        raise InvalidArgumentError(f"num_tokens={num_tokens} must be a multiple of block_size="
                                   f"{block_size} and at most the cache length {seq_len}")
    num_blocks = num_tokens // block_size
    if len(block_ids) < num_blocks:
        raise InvalidArgumentError(f"{num_blocks} blocks to write but {len(block_ids)} block ids")
    if num_blocks == 0:
        return 0
    index = _block_index(list(block_ids)[:num_blocks], layers[0].device)
    for layer, (keys, values) in zip(layers, pairs):
        _check_layer(layer, keys, block_size)
        for kv, source in ((0, keys), (1, values)):
            # [1, H, S, D] -> [num_blocks, block_size, H, D]: one strided copy per tensor
            heads, dim = source.shape[1], source.shape[3]
            pages = source[0, :, :num_tokens].reshape(heads, num_blocks, block_size, dim)
            layer[kv].index_copy_(0, index, pages.permute(1, 2, 0, 3).to(layer.dtype))
    return num_blocks


def pages_to_cache(layers: Sequence[torch.Tensor], block_ids: Sequence[int], *,
                   num_tokens: int, config: Any = None) -> Any:
    """A new DynamicCache holding ``num_tokens`` tokens read from pages ``block_ids``.

    ``block_ids`` must cover ``ceil(num_tokens / block_size)`` blocks. The cache's tensors are
    fresh copies (the pages may be reused afterwards), ``[1, H, S, D]`` views that are not
    contiguous until the next forward. ``config`` is passed to DynamicCache.
    """
    from transformers import DynamicCache

    block_size = layers[0].shape[2]
    num_blocks = -(-num_tokens // block_size)
    if num_tokens < 0 or len(block_ids) < num_blocks:
        raise InvalidArgumentError(f"num_tokens={num_tokens} needs {num_blocks} block ids, "
                                   f"got {len(block_ids)}")
    index = _block_index(list(block_ids)[:num_blocks], layers[0].device)
    cache = DynamicCache(config=config)
    for layer_idx, layer in enumerate(layers):
        tensors = []
        for kv in (0, 1):
            # One copy: pages gathered as [n*B, H, D] and handed over as a [1, H, S, D]
            # strided view. transformers concatenates the cache on the next forward, which
            # makes it contiguous before attention reads it; a permute copy here would be a
            # second pass over every byte.
            pages = layer[kv].index_select(0, index)  # [n, B, H, D]
            heads, dim = pages.shape[2], pages.shape[3]
            flat = pages.view(num_blocks * block_size, heads, dim)[:num_tokens]
            tensors.append(flat.permute(1, 0, 2).unsqueeze(0))
        cache.update(tensors[0], tensors[1], layer_idx)
    return cache


def cache_length(cache: Any) -> int:
    """Number of tokens a DynamicCache holds (0 when empty)."""
    pairs = cache_pairs(cache)
    return pairs[0][0].shape[2] if pairs else 0


def cache_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(keys, values)`` tensors of each layer of a one-request transformers cache (either
    cache API), each ``[1, heads, seq, head_dim]``; InvalidArgumentError for another shape."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.54: a list of CacheLayer
        pairs = [(layer.keys, layer.values) for layer in layers if layer.keys is not None]
    else:
        pairs = list(zip(cache.key_cache, cache.value_cache))
    for keys, _ in pairs:
        if keys.dim() != 4 or keys.shape[0] != 1:
            raise InvalidArgumentError(f"expected [1, heads, seq, head_dim] cache tensors, "
                                       f"got {tuple(keys.shape)}")
    return pairs


def _check_layer(layer: torch.Tensor, keys: torch.Tensor, block_size: int) -> None:
    expected = (2, block_size, keys.shape[1], keys.shape[3])
    actual = (layer.shape[0], layer.shape[2], layer.shape[3], layer.shape[4])
    if layer.dim() != 5 or actual != expected:
        raise InvalidArgumentError(f"paged layer {tuple(layer.shape)} does not fit cache "
                                   f"tensors {tuple(keys.shape)} with block_size {block_size}")
