"""Paged gather / scatter between an engine's per-layer KV cache and one contiguous buffer."""

from __future__ import annotations

from typing import Sequence

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.ops import _torch_ops
from kvstore.ops._layout import (
    PagedGeometry,
    check_block_ids,
    check_num_blocks,
    describe_layers,
)

BlockIds = torch.Tensor | Sequence[int]


def gathered_shape(layers: Sequence[torch.Tensor], num_blocks: int, *,
                   layout: str | None = None) -> torch.Size:
    """Shape of gather_pages' result for num_blocks pages of these layers:
    [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] (kv layouts) or
    [num_layers, num_blocks, block_size, latent_dim] (mla)."""
    return describe_layers(layers, layout).gathered_shape(check_num_blocks(num_blocks))


def gathered_nbytes(layers: Sequence[torch.Tensor], num_blocks: int, *,
                    layout: str | None = None) -> int:
    """Bytes of gather_pages' result for num_blocks pages (to preallocate transfer buffers)."""
    geom = describe_layers(layers, layout)
    return geom.gathered_numel(check_num_blocks(num_blocks)) * geom.dtype.itemsize


def as_typed(buf: torch.Tensor, name: str, geom: PagedGeometry, numel: int, *,
             exact: bool) -> torch.Tensor:
    """buf's leading numel elements viewed in the cache dtype (buf: cache dtype or uint8
    bytes, contiguous, on the cache's device). Too small, or (exact) not exactly the size,
    raises InvalidArgumentError."""
    if not isinstance(buf, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a tensor, not {type(buf).__name__}")
    if buf.dtype not in (geom.dtype, torch.uint8):
        raise InvalidArgumentError(f"{name} has dtype {buf.dtype}; expected {geom.dtype} or uint8")
    if buf.device != geom.device:
        raise InvalidArgumentError(f"{name} is on {buf.device} but the cache is on {geom.device}")
    if not buf.is_contiguous():
        raise InvalidArgumentError(f"{name} must be contiguous")
    need, have = numel * geom.dtype.itemsize, buf.nbytes
    if have < need or (exact and have != need):
        raise InvalidArgumentError(
            f"{name} holds {have} bytes; {'exactly ' if exact else 'at least '}{need} needed")
    flat = buf.reshape(-1)
    if buf.dtype == torch.uint8:
        try:
            return flat[:need].view(geom.dtype)
        except RuntimeError as exc:  # storage offset not a multiple of the element size
            raise InvalidArgumentError(f"{name} is not aligned for {geom.dtype}: {exc}") from exc
    return flat[:numel]


def gather_pages(layers: Sequence[torch.Tensor], block_ids: BlockIds,
                 out: torch.Tensor | None = None, *, layout: str | None = None) -> torch.Tensor:
    """Copy pages block_ids of every layer into one contiguous buffer.

    Args:
        layers: the engine's per-layer caches, all of one dtype (fp16/bf16/fp32), device,
            shape and strides: [2, num_blocks, block_size, heads, head_dim] ("kv_first"),
            [num_blocks, 2, block_size, heads, head_dim] ("block_first") or [num_blocks,
            block_size, latent_dim] ("mla"). Pages must be dense; strided views are fine.
        block_ids: int32/int64 tensor (or int sequence) of pages, any order, repeats allowed.
        out: optional destination on the cache's device, contiguous, of the cache dtype or
            uint8, with at least gathered_nbytes bytes; its leading bytes are written.
        layout: "kv_first", "block_first" or "mla"; detected from the shape when None. A
            5-D shape with num_blocks == 2 is ambiguous and then needs it.

    Returns:
        The gathered pages shaped gathered_shape(layers, len(block_ids)) (a view of out when
        given): layer-major, K before V, pages in block_ids order. The copy is exact.

    Raises:
        InvalidArgumentError: wrong dtype, device mix, non-dense pages, an id out of range or a
            too-small out. Checks run before any byte is written.
    """
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=False)
    numel = geom.gathered_numel(ids.numel())
    if out is None:
        flat = torch.empty(numel, dtype=geom.dtype, device=geom.device)
    else:
        flat = as_typed(out, "out", geom, numel, exact=False)
    _torch_ops.gather_pages_op(list(layers), ids, flat, geom.layout)
    return flat.view(geom.gathered_shape(ids.numel()))


def scatter_pages(buf: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: BlockIds, *,
                  layout: str | None = None) -> None:
    """Write a gathered buffer into pages block_ids of every layer: the exact inverse of
    gather_pages, into any (e.g. another engine's) block ids.

    buf: contiguous, on the cache's device, of the cache dtype or uint8, exactly
    gathered_nbytes(layers, len(block_ids)) bytes, laid out as gather_pages writes it.
    block_ids must be distinct (two copies into one page would race).

    Raises InvalidArgumentError (wrong dtype, device mix, size, an id out of range or repeated)
    before any page is written.
    """
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=True)
    flat = as_typed(buf, "buf", geom, geom.gathered_numel(ids.numel()), exact=True)
    _torch_ops.scatter_pages_op(flat, list(layers), ids, geom.layout)
