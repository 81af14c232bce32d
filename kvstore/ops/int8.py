"""Symmetric INT8 quantization for sending KV pages: standalone, and fused with the paged
gather (quantize-on-send) and scatter (dequantize-on-receive).

Scheme: values are split into groups of group_size contiguous values (for KV, one token's
head_dim of one head: the default group). Per group, scale = amax / 127 as fp32 and
q = round(x * (127 / amax)) to nearest even, in [-127, 127]; dequantization is q * scale
rounded to the cache dtype. Error bound: |x - q * scale| <= scale / 2 = amax / 254 per
element, plus fp32 rounding (below 127 * 2^-22 * scale + |x| * 2^-23) and the final rounding
to fp16/bf16; the relative Frobenius error of Gaussian-like KV is about 0.6%. A group of
zeros (amax below 2^-120) gets scale 0 and q 0. Input holding inf or NaN is rejected with
InvalidArgumentError (INT8 cannot carry it); the outputs are then unspecified. CPU and CUDA
compute the same bytes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.ops import _lib, _torch_ops
from kvstore.ops._layout import (
    PagedGeometry,
    check_block_ids,
    check_buffer,
    check_num_blocks,
    describe_layers,
)
from kvstore.ops.paged import BlockIds


def _check_group_size(group_size: int, last_dim: int, what: str) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise InvalidArgumentError(f"group_size must be a positive int, not {group_size!r}")
    if last_dim % group_size:
        raise InvalidArgumentError(
            f"group_size {group_size} does not divide the last dim ({last_dim}) of {what}")
    return group_size


def _scales_shape(shape: torch.Size, group_size: int) -> torch.Size:
    return torch.Size((*shape[:-1], shape[-1] // group_size))


def quantize_int8(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 of x (fp16/bf16/fp32, contiguous, CPU or CUDA) in groups of group_size values
    along the last dim, which group_size must divide.

    Returns (q, scales): q int8 shaped like x, scales fp32 shaped x.shape[:-1] +
    (x.shape[-1] // group_size,). Error bound in the module docstring. Raises
    InvalidArgumentError for a wrong dtype, non-contiguous x, bad group_size, inf or NaN.
    """
    _torch_ops._check_values(x, "x")
    _check_group_size(group_size, x.shape[-1], "x")
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(_scales_shape(x.shape, group_size), dtype=torch.float32, device=x.device)
    _torch_ops.quantize_int8_op(x, q, scales)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """q * scale per group, rounded to dtype (fp16/bf16/fp32): the inverse of quantize_int8.

    q: int8, contiguous; scales: fp32, contiguous, shaped q.shape[:-1] + (num_groups,), where
    num_groups divides q.shape[-1]. out (optional): contiguous, dtype, q's shape. Raises
    InvalidArgumentError when shapes, dtypes or devices do not fit.
    """
    if dtype not in _lib.DTYPE_CODES:
        raise InvalidArgumentError(f"dtype must be fp16, bf16 or fp32, not {dtype}")
    if not isinstance(q, torch.Tensor) or q.dim() == 0:
        raise InvalidArgumentError("q must be a tensor with at least one dim")
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != dtype:
        raise InvalidArgumentError(f"out must be a {dtype} tensor of shape {list(q.shape)}")
    _torch_ops.dequantize_int8_op(q, scales, out)
    return out


def quantized_shapes(layers: Sequence[torch.Tensor], num_blocks: int, group_size: int | None = None,
                     *, layout: str | None = None) -> tuple[torch.Size, torch.Size]:
    """Shapes of gather_quantize's (q, scales) for num_blocks pages of these layers; q is
    int8 (1 byte per value), scales fp32 (4 bytes per group)."""
    geom = describe_layers(layers, layout)
    shape = geom.gathered_shape(check_num_blocks(num_blocks))
    group_size = _default_group(geom, group_size)
    return shape, _scales_shape(shape, group_size)


def _default_group(geom: PagedGeometry, group_size: int | None) -> int:
    if group_size is None:
        return geom.head_dim
    return _check_group_size(group_size, geom.head_dim, "the cache (head_dim)")


def gather_quantize(layers: Sequence[torch.Tensor], block_ids: BlockIds,
                    group_size: int | None = None, *, layout: str | None = None,
                    q_out: torch.Tensor | None = None,
                    scales_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8(gather_pages(layers, block_ids), group_size) in one pass over the cache,
    with the same bytes as that composition.

    group_size defaults to head_dim (latent_dim for mla) and must divide it. q_out/scales_out
    (optional): contiguous int8 / fp32 on the cache's device with exactly the elements of
    quantized_shapes(); they are written and returned reshaped. Raises InvalidArgumentError
    as gather_pages does, and for inf or NaN in the pages.
    """
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=False)
    group_size = _default_group(geom, group_size)
    q_shape = geom.gathered_shape(ids.numel())
    s_shape = _scales_shape(q_shape, group_size)
    q = _shaped_out(q_out, "q_out", geom, torch.int8, q_shape)
    scales = _shaped_out(scales_out, "scales_out", geom, torch.float32, s_shape)
    _torch_ops.gather_quantize_op(list(layers), ids, q, scales, geom.layout)
    return q, scales


def _shaped_out(buf: torch.Tensor | None, name: str, geom: PagedGeometry, dtype: torch.dtype,
                shape: torch.Size) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=geom.device)
    check_buffer(buf, name, geom.device, dtype, shape.numel())
    return buf.view(shape)


def dequantize_scatter(q: torch.Tensor, scales: torch.Tensor, layers: Sequence[torch.Tensor],
                       block_ids: BlockIds, *, layout: str | None = None) -> None:
    """scatter_pages(dequantize_int8(q, scales, cache dtype), layers, block_ids) in one pass.

    q: int8 with exactly the elements of the gathered pages; scales: fp32, contiguous, one per
    group; the group size is q.numel() // scales.numel() and must divide head_dim. Any shapes
    with those sizes are accepted (e.g. flat buffers read back from the store). block_ids must
    be distinct. Raises InvalidArgumentError before any page is written.
    """
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=True)
    q_shape = geom.gathered_shape(ids.numel())
    check_buffer(q, "q", geom.device, torch.int8, q_shape.numel())
    if not isinstance(scales, torch.Tensor) or scales.numel() == 0 or q.numel() % scales.numel():
        raise InvalidArgumentError("scales must be a tensor with one fp32 per group of q")
    group_size = _check_group_size(q.numel() // scales.numel(), geom.head_dim, "the cache")
    s_shape = _scales_shape(q_shape, group_size)
    check_buffer(scales, "scales", geom.device, torch.float32, s_shape.numel())
    _torch_ops.dequantize_scatter_op(q.view(q_shape), scales.view(s_shape), list(layers), ids,
                                     geom.layout)
