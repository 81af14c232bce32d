"""Paged-cache layouts: detection, validation, and the geometry the kernels take.

Every check a kernel relies on happens here, in Python, before any byte moves: so a wrong
dtype, a device mix, a non-contiguous page, an out-of-range or repeated block id, or a wrong
buffer size raises InvalidArgumentError and leaves every tensor untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.ops._lib import DTYPE_CODES

Layout = Literal["kv_first", "block_first", "mla"]
LAYOUTS = ("kv_first", "block_first", "mla")

# per layout: (tensor rank, dim of the block index, dim of K/V or None)
_DIMS = {"kv_first": (5, 1, 0), "block_first": (5, 0, 1), "mla": (3, 0, None)}


@dataclass(frozen=True)
class PagedGeometry:
    """What the kernels need to know about a list of per-layer paged caches.

    Pages: in every layer, block b holds num_kv page runs (K then V, or one MLA latent run),
    each page_elems contiguous elements shaped page_shape, at element offset
    b * block_stride + kv * kv_stride from the layer tensor's data pointer.
    """

    layout: str
    dtype: torch.dtype
    device: torch.device
    num_layers: int
    num_kv: int
    num_blocks: int
    page_shape: tuple[int, ...]  # (block_size, num_kv_heads, head_dim) or (block_size, latent_dim)
    block_stride: int
    kv_stride: int

    @property
    def page_elems(self) -> int:
        return math.prod(self.page_shape)

    @property
    def head_dim(self) -> int:
        """Size of the last dim (head_dim, or latent_dim for MLA): the default INT8 group."""
        return self.page_shape[-1]

    def gathered_shape(self, num_pages: int) -> torch.Size:
        """[layers, 2, pages, block_size, heads, head_dim], or [layers, pages, block_size,
        latent_dim] for MLA: layer-major, K before V, pages in block_ids order."""
        kv = (self.num_kv,) if self.layout != "mla" else ()
        return torch.Size((self.num_layers, *kv, num_pages, *self.page_shape))

    def gathered_numel(self, num_pages: int) -> int:
        return self.num_layers * self.num_kv * num_pages * self.page_elems


def detect_layout(shape: Sequence[int]) -> str:
    """The layout a per-layer cache shape implies; InvalidArgumentError when none or two fit."""
    if len(shape) == 3:
        return "mla"
    if len(shape) != 5:
        raise InvalidArgumentError(
            f"a paged KV layer must be 5-D [2, num_blocks, block_size, heads, head_dim] or "
            f"[num_blocks, 2, ...], or 3-D [num_blocks, block_size, latent_dim]; got {list(shape)}")
    if shape[0] == 2 and shape[1] == 2:
        raise InvalidArgumentError(
            f"layer shape {list(shape)} fits both 'kv_first' and 'block_first' (num_blocks == 2): "
            f"pass layout= explicitly")
    if shape[0] == 2:
        return "kv_first"
    if shape[1] == 2:
        return "block_first"
    raise InvalidArgumentError(f"5-D layer shape {list(shape)} has no K/V dim of size 2")


def _pages_contiguous(page_shape: Sequence[int], page_strides: Sequence[int]) -> bool:
    expected = 1
    for size, stride in zip(reversed(page_shape), reversed(page_strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def describe_layers(layers: Sequence[torch.Tensor], layout: str | None = None) -> PagedGeometry:
    """Validate the per-layer caches and return their geometry.

    Raises InvalidArgumentError unless: layers is a non-empty list of tensors of one dtype
    (fp16, bf16, fp32), one device, one shape and one set of strides; the shape fits the layout
    (detected when layout is None, see detect_layout); each page is contiguous and no two
    pages overlap. Strided views (e.g. a [num_blocks, 2, ...] allocation permuted to
    [2, num_blocks, ...]) are accepted as long as that holds.
    """
    if isinstance(layers, torch.Tensor) or not isinstance(layers, (list, tuple)) or not layers:
        raise InvalidArgumentError("layers must be a non-empty list of per-layer cache tensors")
    first = layers[0]
    if not isinstance(first, torch.Tensor):
        raise InvalidArgumentError(f"layers[0] is {type(first).__name__}, not a tensor")
    if first.dtype not in DTYPE_CODES:
        raise InvalidArgumentError(f"layers have dtype {first.dtype}; supported: fp16, bf16, fp32")
    expected = (first.dtype, first.device, first.shape, first.stride())
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"layers[{i}] is {type(t).__name__}, not a tensor")
        if (t.dtype, t.device, t.shape, t.stride()) != expected:
            raise InvalidArgumentError(
                f"layers[{i}] ({t.dtype}, {t.device}, {list(t.shape)}, strides {t.stride()}) "
                f"differs from layers[0] ({first.dtype}, {first.device}, {list(first.shape)}, "
                f"strides {first.stride()})")
    if layout is None:
        layout = detect_layout(first.shape)
    elif layout not in _DIMS:
        raise InvalidArgumentError(f"layout must be one of {LAYOUTS} or None, not {layout!r}")
    rank, block_dim, kv_dim = _DIMS[layout]
    shape, strides = tuple(first.shape), first.stride()
    if len(shape) != rank or (kv_dim is not None and shape[kv_dim] != 2):
        raise InvalidArgumentError(f"layer shape {list(shape)} does not fit layout {layout!r}")
    num_kv = 2 if kv_dim is not None else 1
    page_shape, num_blocks = shape[1 + (num_kv == 2):], shape[block_dim]
    if not _pages_contiguous(page_shape, strides[-len(page_shape):]):
        raise InvalidArgumentError(
            f"layer pages are not contiguous (shape {list(shape)}, strides {strides}); the "
            f"block_size/heads/head_dim dims must be dense")
    geom = PagedGeometry(layout, first.dtype, first.device, len(layers), num_kv, num_blocks,
                         tuple(page_shape), strides[block_dim],
                         strides[kv_dim] if kv_dim is not None else 0)
    if not _pages_disjoint(geom):
        raise InvalidArgumentError(f"layer pages overlap (shape {list(shape)}, strides {strides})")
    return geom


def _pages_disjoint(g: PagedGeometry) -> bool:
    """Sufficient condition for the page runs of a layer to be disjoint (any real layout)."""
    page, bs, ks = g.page_elems, g.block_stride, g.kv_stride
    if g.num_kv == 1:
        return g.num_blocks <= 1 or bs >= page
    if g.num_blocks <= 1:
        return ks >= page
    return (bs >= page and ks >= g.num_blocks * bs) or (ks >= page and bs >= 2 * ks)


def check_num_blocks(num_blocks: int) -> int:
    """num_blocks, or InvalidArgumentError unless it is an int >= 0."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise InvalidArgumentError(f"num_blocks must be an int >= 0, not {num_blocks!r}")
    return num_blocks


def check_block_ids(block_ids: torch.Tensor | Sequence[int], num_blocks: int, *,
                    unique: bool) -> torch.Tensor:
    """Validated ids as a contiguous int64 CPU tensor.

    Raises InvalidArgumentError for a dtype other than int32/int64, a rank other than 1, an id
    outside [0, num_blocks), or (unique=True, for writes) an id given twice. NOTE: ids on a GPU
    are copied to the host for these checks (one synchronization); pass CPU ids to avoid it.
    """
    if not isinstance(block_ids, torch.Tensor):
        try:
            block_ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(f"block_ids must be integers: {exc}") from exc
    if block_ids.dtype not in (torch.int32, torch.int64):
        raise InvalidArgumentError(f"block_ids must be int32 or int64, not {block_ids.dtype}")
    if block_ids.dim() != 1:
        raise InvalidArgumentError(f"block_ids must be 1-D, got shape {list(block_ids.shape)}")
    ids = block_ids.to("cpu", torch.int64).contiguous()
    if ids.numel() == 0:
        return ids
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_blocks:
        bad = low if low < 0 else high
        raise InvalidArgumentError(f"block id {bad} out of range [0, {num_blocks})")
    if unique:
        values, counts = torch.unique(ids, return_counts=True)
        if int(counts.max()) > 1:
            repeated = int(values[counts > 1][0])
            raise InvalidArgumentError(f"block id {repeated} repeated: a write needs distinct ids")
    return ids


def check_buffer(buf: torch.Tensor, name: str, device: torch.device, dtype: torch.dtype,
                 numel: int) -> None:
    """InvalidArgumentError unless buf is a contiguous tensor on device, of dtype, with
    exactly numel elements."""
    if not isinstance(buf, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a tensor, not {type(buf).__name__}")
    if buf.device != device:
        raise InvalidArgumentError(f"{name} is on {buf.device} but the cache is on {device}")
    if buf.dtype != dtype:
        raise InvalidArgumentError(f"{name} has dtype {buf.dtype}, expected {dtype}")
    if not buf.is_contiguous():
        raise InvalidArgumentError(f"{name} must be contiguous")
    if buf.numel() != numel:
        raise InvalidArgumentError(f"{name} has {buf.numel()} elements, expected {numel}")
