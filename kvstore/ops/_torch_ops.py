"""The kernels as torch operators (namespace ``kvstore``).

Each op has a schema with its mutated tensors marked (``Tensor!``), one implementation that
serves CPU and CUDA (the kernel library is picked by the tensors' device) and a fake
implementation, so the ops trace under torch.compile and pass ``torch.library.opcheck``. They
are out-variants returning nothing: the public functions in ``paged.py`` and ``int8.py``
allocate, and the ops validate everything again, so a direct ``torch.ops.kvstore`` call can
raise InvalidArgumentError but never crash or copy partially.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.ops import _lib
from kvstore.ops._layout import PagedGeometry, check_block_ids, check_buffer, describe_layers

_Tensor = torch.Tensor


def _check_values(x: _Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a tensor, not {type(x).__name__}")
    if x.dtype not in _lib.DTYPE_CODES:
        raise InvalidArgumentError(f"{name} has dtype {x.dtype}; supported: fp16, bf16, fp32")
    if not x.is_contiguous():
        raise InvalidArgumentError(f"{name} must be contiguous")
    if x.dim() == 0:
        raise InvalidArgumentError(f"{name} must have at least one dim")


def _group_size(values_shape: torch.Size, scales: _Tensor, name: str) -> int:
    """The group size that scales' shape implies for values of values_shape."""
    num_groups = scales.shape[-1] if scales.dim() else 0
    if (scales.dim() != len(values_shape) or scales.shape[:-1] != values_shape[:-1]
            or num_groups == 0 or values_shape[-1] % num_groups):
        raise InvalidArgumentError(
            f"{name} shape {list(scales.shape)} does not fit values of shape "
            f"{list(values_shape)}: expected [..., {values_shape[-1]} // group_size]")
    return values_shape[-1] // num_groups


def _call_pages(fn_name: str, geom: PagedGeometry, layers: list[_Tensor], ids: _Tensor,
                num_bytes: int, *args) -> None:
    """Run a paged kernel on geom's device; KVStoreError if the kernel reports a failure."""
    lib = _lib.lib_for(geom.device)
    if geom.device.type == "cuda":
        # NOTE: through pinned memory, so the upload is asynchronous on the current stream; a
        # copy from pageable memory would synchronize that stream on every call.
        ids = ids.pin_memory().to(geom.device, non_blocking=True)
    pages, _keep = _lib.pages_arg(layers, ids, geom.num_kv, geom.page_elems, geom.block_stride,
                                  geom.kv_stride)
    status = getattr(lib, fn_name)(pages, *args, _lib.exec_for(geom.device, num_bytes))
    _lib.check_status(lib, status, fn_name)


def _raise_nonfinite(counter: _Tensor, name: str) -> None:
    num_bad = int(counter.item())  # NOTE: on CUDA this is the op's one synchronization
    if num_bad:
        raise InvalidArgumentError(
            f"{name} holds inf or NaN in {num_bad} group(s): INT8 cannot represent it (those "
            f"groups were written with scale NaN)")


@torch.library.custom_op("kvstore::gather_pages", mutates_args=("out",))
def gather_pages_op(layers: list[_Tensor], block_ids: _Tensor, out: _Tensor,
                    layout: Optional[str]) -> None:
    """out[layer, kv, page] = layers[layer] page (block_ids[page], kv)."""
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=False)
    check_buffer(out, "out", geom.device, geom.dtype, geom.gathered_numel(ids.numel()))
    _call_pages("kvops_gather_pages", geom, layers, ids, out.nbytes, out.element_size(),
                out.data_ptr())


@torch.library.custom_op("kvstore::scatter_pages", mutates_args=("layers",))
def scatter_pages_op(buf: _Tensor, layers: list[_Tensor], block_ids: _Tensor,
                     layout: Optional[str]) -> None:
    """The inverse of gather_pages; block_ids must be distinct."""
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=True)
    check_buffer(buf, "buf", geom.device, geom.dtype, geom.gathered_numel(ids.numel()))
    _call_pages("kvops_scatter_pages", geom, layers, ids, buf.nbytes, buf.element_size(),
                buf.data_ptr())


@torch.library.custom_op("kvstore::quantize_int8", mutates_args=("q", "scales"))
def quantize_int8_op(x: _Tensor, q: _Tensor, scales: _Tensor) -> None:
    """q, scales = INT8 of x, in groups of x.shape[-1] // scales.shape[-1] values."""
    _check_values(x, "x")
    group_size = _group_size(x.shape, scales, "scales")
    check_buffer(q, "q", x.device, torch.int8, x.numel())
    check_buffer(scales, "scales", x.device, torch.float32, scales.numel())
    lib = _lib.lib_for(x.device)
    counter = torch.zeros(1, dtype=torch.int32, device=x.device)
    status = lib.kvops_quantize_int8(x.data_ptr(), _lib.DTYPE_CODES[x.dtype], scales.numel(),
                                     group_size, q.data_ptr(), scales.data_ptr(),
                                     counter.data_ptr(), _lib.exec_for(x.device, x.nbytes))
    _lib.check_status(lib, status, "quantize_int8")
    _raise_nonfinite(counter, "x")


@torch.library.custom_op("kvstore::dequantize_int8", mutates_args=("out",))
def dequantize_int8_op(q: _Tensor, scales: _Tensor, out: _Tensor) -> None:
    """out = q * scale of its group, rounded to out's dtype."""
    check_buffer(q, "q", q.device, torch.int8, q.numel())
    group_size = _group_size(q.shape, scales, "scales")
    check_buffer(scales, "scales", q.device, torch.float32, scales.numel())
    _check_values(out, "out")
    check_buffer(out, "out", q.device, out.dtype, q.numel())
    lib = _lib.lib_for(q.device)
    status = lib.kvops_dequantize_int8(q.data_ptr(), scales.data_ptr(), scales.numel(),
                                       group_size, _lib.DTYPE_CODES[out.dtype], out.data_ptr(),
                                       _lib.exec_for(q.device, out.nbytes))
    _lib.check_status(lib, status, "dequantize_int8")


def _check_quantized_pages(geom: PagedGeometry, num_pages: int, q: _Tensor,
                           scales: _Tensor) -> int:
    """Group size of a gathered INT8 pair; q must be shaped like the gathered buffer."""
    shape = geom.gathered_shape(num_pages)
    check_buffer(q, "q", geom.device, torch.int8, geom.gathered_numel(num_pages))
    if q.shape != shape:
        raise InvalidArgumentError(f"q has shape {list(q.shape)}, expected {list(shape)}")
    group_size = _group_size(shape, scales, "scales")
    check_buffer(scales, "scales", geom.device, torch.float32, scales.numel())
    return group_size


@torch.library.custom_op("kvstore::gather_quantize", mutates_args=("q", "scales"))
def gather_quantize_op(layers: list[_Tensor], block_ids: _Tensor, q: _Tensor, scales: _Tensor,
                       layout: Optional[str]) -> None:
    """quantize_int8(gather_pages(layers, block_ids)) in one pass, bit for bit."""
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=False)
    group_size = _check_quantized_pages(geom, ids.numel(), q, scales)
    counter = torch.zeros(1, dtype=torch.int32, device=geom.device)
    _call_pages("kvops_gather_quantize", geom, layers, ids, q.nbytes * 3,
                _lib.DTYPE_CODES[geom.dtype], group_size, q.data_ptr(), scales.data_ptr(),
                counter.data_ptr())
    _raise_nonfinite(counter, "the gathered pages")


@torch.library.custom_op("kvstore::dequantize_scatter", mutates_args=("layers",))
def dequantize_scatter_op(q: _Tensor, scales: _Tensor, layers: list[_Tensor],
                          block_ids: _Tensor, layout: Optional[str]) -> None:
    """scatter_pages(dequantize_int8(q, scales), layers, block_ids) in one pass."""
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=True)
    group_size = _check_quantized_pages(geom, ids.numel(), q, scales)
    _call_pages("kvops_dequantize_scatter", geom, layers, ids, q.nbytes * 3,
                _lib.DTYPE_CODES[geom.dtype], group_size, q.data_ptr(), scales.data_ptr())


# Fake implementations: the ops only write tensors they were given.
for _op in (gather_pages_op, scatter_pages_op, quantize_int8_op, dequantize_int8_op,
            gather_quantize_op, dequantize_scatter_op):
    _op.register_fake(lambda *args, **kwargs: None)
