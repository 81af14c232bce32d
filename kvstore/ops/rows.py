"""Paged gather / scatter between an engine's per-layer KV cache and per-block rows.

A row holds one block of every layer in the stored form of ``kvstore.engine.blocks``:
``[num_layers, num_kv, page]`` (K before V; one latent run for MLA), each block's row at an
address of its own. So a connector can gather pages straight into staging rows, or into the
ranges a put reserved in a shared-memory segment, and scatter them back from either, in one
pass over the bytes with no gathered buffer in between (``gather_pages`` then a copy into
rows is two). CPU caches only (CUDA caches keep ``gather_pages``/``scatter_pages``: their
bytes cross to the host once anyway).

Thread safety: as the other ops; rows of one call must not overlap each other.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from kvstore._errors import InvalidArgumentError
from kvstore.ops import _lib
from kvstore.ops._layout import PagedGeometry, check_block_ids, describe_layers
from kvstore.ops.paged import BlockIds


class RowAddresses:
    """Rows given by address: row ``j`` starts at ``addresses[j]`` and holds at least
    ``nbytes`` bytes. For memory whose owner already knows where each row lies (the leased
    segment ranges of ``kvstore.client.leased_views``): no buffer object per row. The caller
    guarantees the memory stays mapped (and, for a gather, writable) during the call.
    NOTE: why: turning 128 memoryviews into addresses cost ~1 ms per call here (numpy's
    frombuffer and ctypes per row), a tenth of a 32 MiB load."""

    __slots__ = ("addresses", "nbytes")

    def __init__(self, addresses: Sequence[int], nbytes: int):
        self.addresses = list(addresses)
        self.nbytes = nbytes

    def __len__(self) -> int:
        return len(self.addresses)

    def __getitem__(self, index: slice) -> "RowAddresses":
        return RowAddresses(self.addresses[index], self.nbytes)


def row_nbytes(layers: Sequence[torch.Tensor], *, layout: str | None = None) -> int:
    """Bytes of one block's row of these layers (every layer's K and V page, or latent)."""
    geom = describe_layers(layers, layout)
    return geom.num_layers * geom.num_kv * geom.page_elems * geom.dtype.itemsize


def gather_pages_to_rows(layers: Sequence[torch.Tensor], block_ids: BlockIds, rows: Any, *,
                         layout: str | None = None, checksums: bool = False,
                         num_threads: int | None = None) -> list[int] | None:
    """Copy page ``block_ids[j]`` of every layer into row ``j``.

    ``rows``: a contiguous CPU tensor ``[len(block_ids), row_bytes]`` (any dtype, e.g.
    uint8 staging rows), a sequence of ``len(block_ids)`` writable buffers (memoryview,
    bytearray, numpy array, CPU tensor), each C-contiguous with at least ``row_nbytes``
    bytes (their leading bytes are written), or a ``RowAddresses``. Ids may repeat. The copy is exact.

    ``checksums=True``: also return, per row, the XXH3-64 (seed 0) digest of the
    ``row_nbytes`` bytes written, computed in the same pass (``kvstore.client.checksum``'s
    value for those bytes: what ``PutReservation.commit(checksums=...)`` takes); one
    thread per row. Else returns None.

    ``num_threads``: the most threads the copy runs on (rows split between them, about one
    per MiB at most); None: torch's intra-op count (``torch.get_num_threads()``).

    Raises InvalidArgumentError (a CUDA cache, wrong layout or ids, a read-only or too-small
    row, a wrong number of rows) before any byte is written.
    """
    threads = _lib.check_num_threads(num_threads)
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=False)
    ptrs, keep = _row_pointers(geom, rows, ids.numel(), writable=True)
    if not checksums:
        _call("kvops_gather_blocks", geom, layers, ids, ptrs, threads=threads)
        del keep
        return None
    digests = (_lib.ctypes.c_uint64 * ids.numel())()
    _call("kvops_gather_blocks_hash", geom, layers, ids, ptrs, digests, threads=threads)
    del keep
    return list(digests)


def scatter_rows_to_pages(rows: Any, layers: Sequence[torch.Tensor], block_ids: BlockIds, *,
                          layout: str | None = None, checksums: Sequence[int] | None = None,
                          num_threads: int | None = None) -> list[bool] | None:
    """The inverse of ``gather_pages_to_rows``: row ``j`` into page ``block_ids[j]`` of every
    layer (rows may be read-only buffers). ``block_ids`` must be distinct.

    ``checksums`` (one int in [0, 2**64) per row): a verified scatter. Row ``j`` is scattered
    only when the XXH3-64 (seed 0) of its ``row_nbytes`` bytes equals ``checksums[j]`` (the
    checksum the store recorded for it); returns, per row, whether it was. A row that does
    not match writes nothing: its page keeps what it held. Rows are read once from memory
    (each hashed, then copied while it is still in cache). Without: returns None.

    ``num_threads``: as ``gather_pages_to_rows``.

    Raises InvalidArgumentError (as gather_pages_to_rows, a repeated id, bad checksums)
    before any page is written.
    """
    threads = _lib.check_num_threads(num_threads)
    geom = describe_layers(layers, layout)
    ids = check_block_ids(block_ids, geom.num_blocks, unique=True)
    expected = _expected_digests(checksums, ids.numel())
    ptrs, keep = _row_pointers(geom, rows, ids.numel(), writable=False)
    if expected is None:
        _call("kvops_scatter_blocks", geom, layers, ids, ptrs, threads=threads)
        del keep
        return None
    ok = (_lib.ctypes.c_uint8 * ids.numel())()
    _call("kvops_scatter_blocks_verified", geom, layers, ids, ptrs, expected, ok,
          threads=threads)
    del keep
    return [bool(flag) for flag in ok]


def gather_tokens_to_rows(tensors: Sequence[torch.Tensor], block_ids: BlockIds, rows: Any, *,
                          block_size: int, checksums: bool = False,
                          num_threads: int | None = None) -> list[int] | None:
    """Copy tokens ``[b * block_size, +block_size)`` (``b = block_ids[j]``) of every tensor
    into row ``j``, laid out ``[len(tensors), block_size, heads, head_dim]``: the stored block
    form for a transformers cache's tensors given as ``[k0, v0, k1, v1, ...]``.

    ``tensors``: CPU tensors ``[heads, seq, head_dim]`` (or ``[1, heads, seq, head_dim]``),
    one dtype, shape and strides, ``head_dim`` dense. ``rows`` as ``gather_pages_to_rows``,
    each row at least ``len(tensors) * block_size * heads * head_dim`` elements. Raises
    InvalidArgumentError (mixed or non-CPU tensors, a block past the sequence, bad rows)
    before any byte is written. ``checksums=True``: returns each row's digest as
    ``gather_pages_to_rows`` does (else None). ``num_threads``: as ``gather_pages_to_rows``.
    """
    threads = _lib.check_num_threads(num_threads)
    geom, arg, keep = _tokens_arg(tensors, block_ids, block_size, unique=False)
    ptrs, keep_rows = _row_pointers(geom, rows, int(arg.num_blocks), writable=True)
    if not checksums:
        _call_tokens("kvops_gather_tokens", geom, arg, ptrs, threads=threads)
        del keep, keep_rows
        return None
    digests = (_lib.ctypes.c_uint64 * int(arg.num_blocks))()
    _call_tokens("kvops_gather_tokens_hash", geom, arg, ptrs, digests, threads=threads)
    del keep, keep_rows
    return list(digests)


def scatter_rows_to_tokens(rows: Any, tensors: Sequence[torch.Tensor], block_ids: BlockIds,
                           *, block_size: int, checksums: Sequence[int] | None = None,
                           num_threads: int | None = None) -> list[bool] | None:
    """The inverse of ``gather_tokens_to_rows``: row ``j`` into tokens ``[b * block_size,
    +block_size)`` of every tensor. ``block_ids`` must be distinct. ``checksums``: a
    verified scatter, as ``scatter_rows_to_pages`` (a row that does not match leaves its
    tokens as they were). ``num_threads`` as the gather. Errors as the gather (and bad
    checksums), before any write."""
    threads = _lib.check_num_threads(num_threads)
    geom, arg, keep = _tokens_arg(tensors, block_ids, block_size, unique=True)
    expected = _expected_digests(checksums, int(arg.num_blocks))
    ptrs, keep_rows = _row_pointers(geom, rows, int(arg.num_blocks), writable=False)
    if expected is None:
        _call_tokens("kvops_scatter_tokens", geom, arg, ptrs, threads=threads)
        del keep, keep_rows
        return None
    ok = (_lib.ctypes.c_uint8 * int(arg.num_blocks))()
    _call_tokens("kvops_scatter_tokens_verified", geom, arg, ptrs, expected, ok,
                 threads=threads)
    del keep, keep_rows
    return [bool(flag) for flag in ok]


def _expected_digests(checksums: Sequence[int] | None, num_rows: int) -> Any:
    """``checksums`` as a ctypes uint64 array (None stays None); InvalidArgumentError for a
    wrong length or a value that is not an int in [0, 2**64)."""
    if checksums is None:
        return None
    if isinstance(checksums, (str, bytes)) or len(checksums) != num_rows:
        raise InvalidArgumentError(f"{num_rows} rows but checksums is {checksums!r:.60}")
    for value in checksums:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise InvalidArgumentError(f"checksums must be ints in [0, 2**64), got {value!r:.40}")
    return (_lib.ctypes.c_uint64 * num_rows)(*checksums)


def _tokens_arg(tensors: Sequence[torch.Tensor], block_ids: BlockIds, block_size: int, *,
                unique: bool) -> tuple[PagedGeometry, Any, list]:
    """Check the tensors; the geometry ``_row_pointers`` sizes rows by, and the C struct."""
    tensors = [t[0] if t.dim() == 4 and t.shape[0] == 1 else t for t in tensors]
    if not tensors:
        raise InvalidArgumentError("tensors must not be empty")
    first = tensors[0]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgumentError(f"block_size must be an int >= 1, got {block_size!r}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.device.type != "cpu":
            raise InvalidArgumentError(f"tensors[{i}] must be a CPU tensor [heads, seq, "
                                       f"head_dim] (or [1, heads, seq, head_dim])")
        if (t.shape, t.stride(), t.dtype) != (first.shape, first.stride(), first.dtype):
            raise InvalidArgumentError(f"tensors[{i}] differs from tensors[0] in shape, "
                                       f"strides or dtype")
    heads, seq, head_dim = first.shape
    if first.stride(2) != 1 and head_dim > 1:
        raise InvalidArgumentError("tensors must be dense in head_dim")
    ids = check_block_ids(block_ids, seq // block_size, unique=unique)
    geom = PagedGeometry("rows", first.dtype, first.device, len(tensors), 1, seq // block_size,
                         (block_size, heads, head_dim), block_size, 0)
    ptrs = (_lib.ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    arg = _lib.TokensArg(ptrs, ids.data_ptr(), len(tensors), ids.numel(), block_size, heads,
                         head_dim, first.stride(0), first.stride(1))
    return geom, arg, [ptrs, ids, tensors]


def _call_tokens(fn_name: str, geom: PagedGeometry, arg: Any, ptrs: Any, *out: Any,
                 threads: int | None = None) -> None:
    """Run a tokens kernel; ``out``: its extra arrays, as ``_call``."""
    lib = _lib.cpu_lib()
    num_bytes = int(arg.num_blocks) * geom.num_layers * geom.page_elems * geom.dtype.itemsize
    status = getattr(lib, fn_name)(_lib.ctypes.byref(arg), geom.dtype.itemsize, ptrs, *out,
                                   _lib.exec_for(geom.device, num_bytes, threads))
    _lib.check_status(lib, status, fn_name)


def _call(fn_name: str, geom: PagedGeometry, layers: Sequence[torch.Tensor],
          ids: torch.Tensor, ptrs: Any, *out: Any, threads: int | None = None) -> None:
    """Run a paged kernel; ``out``: its extra arrays (digests, expected digests and flags);
    ``threads``: the most threads it runs on (None: torch's intra-op count)."""
    lib = _lib.cpu_lib()
    pages, _keep = _lib.pages_arg(list(layers), ids, geom.num_kv, geom.page_elems,
                                  geom.block_stride, geom.kv_stride)
    num_bytes = ids.numel() * geom.num_layers * geom.num_kv * geom.page_elems * \
        geom.dtype.itemsize
    status = getattr(lib, fn_name)(pages, geom.dtype.itemsize, ptrs, *out,
                                   _lib.exec_for(geom.device, num_bytes, threads))
    _lib.check_status(lib, status, fn_name)


def _row_pointers(geom: PagedGeometry, rows: Any, num_rows: int,
                  *, writable: bool) -> tuple[Any, list]:
    """A ctypes array of the rows' addresses, and what keeps their memory alive meanwhile."""
    if geom.device.type != "cpu":
        raise InvalidArgumentError("per-block rows are for CPU caches; a CUDA cache uses "
                                   "gather_pages / scatter_pages")
    row_bytes = geom.num_layers * geom.num_kv * geom.page_elems * geom.dtype.itemsize
    if isinstance(rows, torch.Tensor):
        if rows.device.type != "cpu" or not rows.is_contiguous() or rows.dim() != 2 or \
                rows.shape[0] != num_rows or rows.shape[1] * rows.element_size() < row_bytes:
            raise InvalidArgumentError(
                f"rows must be a contiguous CPU tensor [{num_rows}, >= {row_bytes} bytes], "
                f"got {tuple(rows.shape)} {rows.dtype} on {rows.device}")
        stride = rows.shape[1] * rows.element_size()
        base = rows.data_ptr()
        return (_lib.ctypes.c_void_p * num_rows)(*[base + j * stride for j in range(num_rows)]), \
            [rows]
    if isinstance(rows, RowAddresses):
        if len(rows) != num_rows or rows.nbytes < row_bytes:
            raise InvalidArgumentError(f"{num_rows} rows of >= {row_bytes} bytes needed, got "
                                       f"{len(rows)} of {rows.nbytes}")
        if not all(rows.addresses):
            raise InvalidArgumentError("a row address is 0")
        return (_lib.ctypes.c_void_p * num_rows)(*rows.addresses), []
    rows = list(rows)
    if len(rows) != num_rows:
        raise InvalidArgumentError(f"{num_rows} block ids but {len(rows)} rows")
    keep, addresses = [], []
    for j, row in enumerate(rows):
        if type(row) is memoryview and not row.readonly and row.c_contiguous:
            # NOTE: a writable view (a reservation's range): its address without numpy,
            # ~1.7 us instead of ~7 us a row
            if row.nbytes < row_bytes:
                raise InvalidArgumentError(f"rows[{j}] holds {row.nbytes} bytes; at least "
                                           f"{row_bytes} needed")
            anchor = _lib.ctypes.c_char.from_buffer(row)
            keep.append(anchor)
            addresses.append(_lib.ctypes.addressof(anchor))
            continue
        array = _as_bytes(row, j)
        if writable and not array.flags.writeable:
            raise InvalidArgumentError(f"rows[{j}] is read-only")
        if array.nbytes < row_bytes:
            raise InvalidArgumentError(f"rows[{j}] holds {array.nbytes} bytes; at least "
                                       f"{row_bytes} needed")
        keep.append(array)
        addresses.append(array.ctypes.data)
    return (_lib.ctypes.c_void_p * num_rows)(*addresses), keep


def _as_bytes(row: Any, index: int) -> np.ndarray:
    if isinstance(row, torch.Tensor):
        if row.device.type != "cpu" or not row.is_contiguous():
            raise InvalidArgumentError(f"rows[{index}] must be a contiguous CPU tensor")
        return row.view(-1).view(torch.uint8).numpy()
    if isinstance(row, np.ndarray):
        if not row.flags.c_contiguous:
            raise InvalidArgumentError(f"rows[{index}] must be C-contiguous")
        return row.reshape(-1).view(np.uint8)
    try:
        view = memoryview(row)
    except TypeError as exc:
        raise InvalidArgumentError(f"rows[{index}] is not a buffer: {exc}") from exc
    if not view.c_contiguous:
        raise InvalidArgumentError(f"rows[{index}] must be C-contiguous")
    return np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view,
                         dtype=np.uint8)
