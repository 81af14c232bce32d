"""The stored form of a KV block, and the copies between a paged cache and that form.

One store object holds one block (page) of one tensor-parallel shard, all layers:

    raw   payload ``[num_layers, 2, block_size, num_kv_heads, head_dim]`` in the cache dtype
          (``[num_layers, block_size, latent_dim]`` for an MLA cache)
    int8  the payload as int8, then its fp32 scales, one per group of ``head_dim`` values
          (one symmetric scale per (layer, K/V, token, head)); scheme in ``kvstore.ops.int8``

The payload is the one-page slice of what ``kvstore.ops.gather_pages`` produces, so the form
does not depend on the cache layout (``[2, num_blocks, ...]``, ``[num_blocks, 2, ...]``, or
``head_major``, vLLM's CPU cache ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` whose
memory per head is K rows then V rows): a block saved from one layout loads into the other.
NOTE: ``head_major`` pages are not dense in (token, head) order, which the kernels need, so
it is copied with torch indexing (one gather or scatter per layer) instead. A batch of
blocks sits in a staging tensor ``[num_blocks, block_bytes]`` (uint8), one row per object,
so one batched put or get moves a request's blocks. Pages to rows costs the gather (fused
with INT8 quantization when asked) plus one copy that makes each block's rows contiguous;
rows to pages the reverse.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from kvstore._errors import InvalidArgumentError

QUANTIZATIONS = (None, "int8")


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """Shape of one stored block. ``block_shape`` is the payload shape (see module doc);
    ``page_dim`` is where ``gather_pages`` puts the page index (2, or 1 for MLA)."""

    block_shape: tuple[int, ...]
    page_dim: int
    dtype: torch.dtype
    layout: str
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZATIONS:
            raise InvalidArgumentError(f"quantize must be None or 'int8', got {self.quantize!r}")

    @property
    def block_size(self) -> int:
        return self.block_shape[self.page_dim]

    @property
    def head_dim(self) -> int:
        return self.block_shape[-1]

    @property
    def num_kv_heads(self) -> int:
        """KV heads per block (1 for MLA's single latent)."""
        return self.block_shape[-2] if self.layout != "mla" else 1

    @property
    def tag(self) -> str:
        """The stored form for key namespaces: ``L2BHD16`` (K/V blocks of 16 tokens),
        ``LBD16`` (MLA)."""
        return f"{'LBD' if self.layout == 'mla' else 'L2BHD'}{self.block_size}"

    @property
    def num_values(self) -> int:
        return math.prod(self.block_shape)

    @property
    def num_groups(self) -> int:
        """INT8 scale groups per block: one per ``head_dim`` values."""
        return self.num_values // self.head_dim

    @property
    def raw_block_bytes(self) -> int:
        """Bytes of one block in the cache dtype."""
        return self.num_values * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one stored object."""
        if self.quantize == "int8":
            return self.num_values + 4 * self.num_groups
        return self.raw_block_bytes

    def gathered_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The ``gather_pages`` shape of ``num_blocks`` pages."""
        shape = list(self.block_shape)
        shape.insert(self.page_dim, num_blocks)
        return tuple(shape)

    def with_heads(self, num_kv_heads: int) -> "BlockFormat":
        """The same format for a shard with another number of KV heads (TP resharding)."""
        shape = (*self.block_shape[:-2], num_kv_heads, self.head_dim)
        return dataclasses.replace(self, block_shape=shape)

    @staticmethod
    def of_layers(layers: Sequence[torch.Tensor], quantize: str | None,
                  layout: str | None = None) -> "BlockFormat":
        """The format of a paged cache (validated by ``kvstore.ops``; InvalidArgumentError)."""
        if layout == "head_major":
            return _head_major_format(layers, quantize)
        from kvstore import ops

        gathered = tuple(ops.gathered_shape(list(layers), 1, layout=layout))
        page_dim = 2 if len(gathered) == 6 else 1
        block_shape = gathered[:page_dim] + gathered[page_dim + 1:]
        detected = layout or ("mla" if page_dim == 1 else
                              "kv_first" if layers[0].shape[0] == 2 else "block_first")
        return BlockFormat(block_shape, page_dim, layers[0].dtype, detected, quantize)


def _head_major_format(layers: Sequence[torch.Tensor], quantize: str | None) -> BlockFormat:
    first = layers[0] if layers else None
    if first is None or first.dim() != 4 or first.shape[-1] % 2:
        raise InvalidArgumentError("head_major layers must be [num_blocks, num_kv_heads, "
                                   "block_size, 2 * head_dim]")
    for i, layer in enumerate(layers):
        if (layer.shape, layer.dtype, layer.device) != (first.shape, first.dtype, first.device):
            raise InvalidArgumentError(f"layers[{i}] differs from layers[0] in shape, dtype or "
                                       f"device")
        if not layer.is_contiguous():
            raise InvalidArgumentError(f"head_major layers[{i}] must be contiguous")
    if first.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidArgumentError(f"cache dtype must be fp16, bf16 or fp32, not {first.dtype}")
    _, num_heads, block_size, two_dim = first.shape
    shape = (len(layers), 2, block_size, num_heads, two_dim // 2)
    return BlockFormat(shape, 2, first.dtype, "head_major", quantize)


def _head_major_payload(layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                        fmt: BlockFormat) -> torch.Tensor:
    """``[n, layers, 2, block_size, heads, head_dim]`` (contiguous) of pages ``block_ids``."""
    _, _, block_size, num_heads, head_dim = fmt.block_shape
    per_layer = [layer.index_select(0, block_ids).view(-1, num_heads, 2, block_size, head_dim)
                 for layer in layers]
    return torch.stack(per_layer, 1).permute(0, 1, 3, 4, 2, 5).contiguous()


def _head_major_pages(layer: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """A head_major layer as ``[num_blocks, heads, 2, block_size, head_dim]`` (a view)."""
    _, _, block_size, num_heads, head_dim = fmt.block_shape
    return layer.view(layer.shape[0], num_heads, 2, block_size, head_dim)


def _head_major_gather_into(layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                            fmt: BlockFormat, target: torch.Tensor) -> None:
    """Pages ``block_ids`` into ``target`` (``[n, layers, 2, block_size, heads, head_dim]``,
    the cache dtype), one layer at a time: one index_select and one strided copy into its
    slice. NOTE: not the whole payload at once: stacking every layer and making it contiguous
    allocated two more request-sized temporaries per call, whose page faults cost 10-20x the
    copy itself here (1.3 s for 64 MiB at load 15); nor page by page: 512 small copies each
    start torch's thread pool, which stalls on a loaded machine."""
    for i, layer in enumerate(layers):
        pages = _head_major_pages(layer, fmt)
        target[:, i].copy_(pages.index_select(0, block_ids).permute(0, 2, 3, 1, 4))


def _head_major_scatter(payload: torch.Tensor, layers: Sequence[torch.Tensor],
                        block_ids: torch.Tensor) -> None:
    """The inverse of _head_major_gather_into: ``payload[:, l]`` into pages ``block_ids``, one
    index_copy_ per layer from a contiguous copy of that layer's slice. NOTE: that one
    layer-sized temporary is cheaper on a quiet machine than index_copy_ from the strided
    view (13-22 ms against 20-32 ms for 64 MiB at load 3), dearer under load (78-330 against
    49-123 ms at load 6-7); the quiet figure decides."""
    if len(set(block_ids.tolist())) != len(block_ids):
        raise InvalidArgumentError("block ids must be distinct")
    heads_first = payload.permute(0, 1, 4, 2, 3, 5)  # [n, L, heads, 2, block_size, head_dim]
    for i, layer in enumerate(layers):
        layer.index_copy_(0, block_ids, heads_first[:, i].reshape(-1, *layer.shape[1:]))


def _to_rows(gathered: torch.Tensor, fmt: BlockFormat, rows: torch.Tensor) -> None:
    """Copy a gathered ``[..., n, ...]`` tensor into per-block rows ``[n, ...]`` (bytes)."""
    num_blocks = gathered.shape[fmt.page_dim]
    target = rows.view(gathered.dtype).view(num_blocks, *gathered.shape[:fmt.page_dim],
                                            *gathered.shape[fmt.page_dim + 1:])
    target.copy_(gathered.movedim(fmt.page_dim, 0))


def _from_rows(rows: torch.Tensor, fmt: BlockFormat, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
    """Per-block rows back to a contiguous gathered tensor of ``shape``."""
    num_blocks = shape[fmt.page_dim]
    per_block_shape = (num_blocks, *shape[:fmt.page_dim], *shape[fmt.page_dim + 1:])
    try:  # a column slice of the staging rows views in place: one copy below, not two
        per_block = rows.view(dtype).view(per_block_shape)
    except RuntimeError:
        per_block = rows.contiguous().view(dtype).view(per_block_shape)
    return per_block.movedim(0, fmt.page_dim).contiguous()


def gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor, fmt: BlockFormat,
                  rows: torch.Tensor) -> torch.Tensor:
    """Copy pages ``block_ids`` into ``rows`` (uint8 ``[n, block_bytes]``, host memory) in
    stored form. A GPU cache is gathered (and quantized) on the GPU, then downloaded once."""
    from kvstore import ops

    if fmt.layout == "head_major":
        if fmt.quantize != "int8":
            target = rows.view(fmt.dtype).view(len(block_ids), *fmt.block_shape)
            _head_major_gather_into(layers, block_ids, fmt, target)
            return rows
        payload = _head_major_payload(layers, block_ids, fmt)
        q, scales = ops.quantize_int8(payload, fmt.head_dim)
        rows[:, :fmt.num_values].view(torch.int8).view(q.shape).copy_(q)
        rows[:, fmt.num_values:].view(torch.float32).view(scales.shape).copy_(scales)
        return rows
    if fmt.quantize == "int8":
        q, scales = ops.gather_quantize(list(layers), block_ids, fmt.head_dim, layout=fmt.layout)
        _to_rows(q, fmt, rows[:, :fmt.num_values])
        _to_rows(scales, fmt, rows[:, fmt.num_values:])
    elif _rows_direct(layers, rows):
        ops.gather_pages_to_rows(list(layers), block_ids, rows, layout=fmt.layout)
    else:
        _to_rows(ops.gather_pages(list(layers), block_ids, layout=fmt.layout), fmt, rows)
    return rows


def _rows_direct(layers: Sequence[torch.Tensor], rows: Any) -> bool:
    """True when pages and rows can be copied into each other in one pass
    (``kvstore.ops.rows``): a CPU cache of a raw format. NOTE: a gathered buffer and a copy
    into rows were two passes plus a request-sized temporary whose fresh pages fault in."""
    return layers[0].device.type == "cpu" and (not isinstance(rows, torch.Tensor) or
                                               rows.device.type == "cpu")


def scatter_blocks(rows: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                   fmt: BlockFormat) -> None:
    """Copy ``rows`` (stored form) into pages ``block_ids`` of ``layers``."""
    from kvstore import ops

    if fmt.layout == "head_major":
        _head_major_scatter(decode_rows(rows, fmt), layers, block_ids)
        return
    if fmt.quantize is None and _rows_direct(layers, rows):
        ops.scatter_rows_to_pages(rows, list(layers), block_ids, layout=fmt.layout)
        return
    shape = fmt.gathered_shape(len(rows))
    device = layers[0].device  # staging rows live on the host; a GPU cache gets one upload
    if fmt.quantize == "int8":
        q = _from_rows(rows[:, :fmt.num_values], fmt, torch.int8, shape).to(device)
        scales = _from_rows(rows[:, fmt.num_values:], fmt, torch.float32,
                            shape[:-1] + (1,)).to(device)
        ops.dequantize_scatter(q, scales, list(layers), block_ids, layout=fmt.layout)
    else:
        ops.scatter_pages(_from_rows(rows, fmt, fmt.dtype, shape).to(device), list(layers),
                          block_ids, layout=fmt.layout)


def decode_rows(rows: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """Rows to a per-block payload ``[n, *block_shape]`` in the cache dtype (TP resharding)."""
    from kvstore import ops

    num_blocks = rows.shape[0]
    if fmt.quantize == "int8":
        q = rows[:, :fmt.num_values].contiguous().view(torch.int8)
        scales = rows[:, fmt.num_values:].contiguous().view(torch.float32)
        q = q.view(num_blocks, *fmt.block_shape)
        scales = scales.view(num_blocks, *fmt.block_shape[:-1], 1)
        return ops.dequantize_int8(q, scales, fmt.dtype)
    return rows.contiguous().view(fmt.dtype).view(num_blocks, *fmt.block_shape)


def scatter_payload(payload: torch.Tensor, layers: Sequence[torch.Tensor],
                    block_ids: torch.Tensor, fmt: BlockFormat) -> None:
    """A per-block payload ``[n, *block_shape]`` (cache dtype) into pages ``block_ids``."""
    from kvstore import ops

    buf = payload.movedim(0, fmt.page_dim).contiguous().to(layers[0].device)
    ops.scatter_pages(buf, list(layers), block_ids, layout=fmt.layout)
