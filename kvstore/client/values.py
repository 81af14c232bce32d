"""Turn caller values and output buffers into flat byte memoryviews, without copying.

Accepted values (``as_source``): bytes, bytearray, memoryview, numpy arrays and torch CPU
tensors of any dtype (bfloat16 included: the storage is viewed as uint8). Accepted outputs
(``as_destination``): the same kinds, writable. Both must be C-contiguous; nothing here ever
converts a value to bytes, so a put reads the caller's memory and a get writes straight into
the caller's tensor. torch is never imported here: a torch tensor can only exist if the
caller already imported torch.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from kvstore._errors import InvalidArgumentError

_BYTES_TYPES = (bytes, bytearray)


def _flat_bytes(view: memoryview, what: str) -> memoryview:
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        raise InvalidArgumentError(f"{what} must be C-contiguous")
    return view.cast("B") if view.ndim <= 1 else view.cast("B", (view.nbytes,))


def _torch_view(value: Any, what: str) -> memoryview | None:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return None
    if value.device.type != "cpu":
        raise InvalidArgumentError(
            f"{what} is a torch tensor on {value.device}; kvstore.KVStore needs a CPU tensor "
            "(copy device tensors through kvstore.engine)")
    if not value.is_contiguous():
        raise InvalidArgumentError(f"{what} torch tensor must be contiguous")
    num_bytes = value.numel() * value.element_size()
    if num_bytes == 0:
        return memoryview(bytearray(0))
    # NOTE: a ctypes array over the tensor's memory, rather than detach/reshape/view/numpy,
    # which costs three times as long per tensor (it matters for batches of 128 rows). The
    # array holds the tensor, and the memoryview the array, so the memory outlives the view.
    array = (ctypes.c_char * num_bytes).from_address(value.data_ptr())
    array._kvstore_owner = value
    return memoryview(array).cast("B")


def _numpy_view(value: Any, what: str) -> memoryview | None:
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.ndarray):
        return None
    if not value.flags.c_contiguous:
        raise InvalidArgumentError(f"{what} numpy array must be C-contiguous")
    if value.ndim == 1 and value.dtype == numpy.uint8:
        return memoryview(value)  # the common transfer-buffer case, without two new arrays
    return memoryview(value.reshape(-1).view(numpy.uint8))


def as_source(value: Any) -> memoryview:
    """A read-only-or-better flat uint8 memoryview of ``value``'s bytes (no copy).

    Raises InvalidArgumentError for unsupported types, non-contiguous arrays and tensors on
    a device other than the CPU.
    """
    if isinstance(value, _BYTES_TYPES):
        return memoryview(value)
    if isinstance(value, memoryview):
        return _flat_bytes(value, "value")
    view = _numpy_view(value, "value")
    if view is None:
        view = _torch_view(value, "value")
    if view is None:
        raise InvalidArgumentError(
            f"value must be bytes, bytearray, memoryview, numpy array or torch tensor, "
            f"got {type(value).__name__}")
    return view


def as_destination(out: Any) -> memoryview:
    """A writable flat uint8 memoryview over ``out``'s memory (no copy).

    Raises InvalidArgumentError for read-only buffers (bytes, read-only arrays), unsupported
    types and non-contiguous arrays.
    """
    if isinstance(out, bytearray):
        return memoryview(out)
    if isinstance(out, bytes):
        raise InvalidArgumentError("out is read-only (bytes); pass a bytearray or an array")
    if isinstance(out, memoryview):
        view = out
    else:
        view = _numpy_view(out, "out")
        if view is None:
            view = _torch_view(out, "out")
    if view is None:
        raise InvalidArgumentError(
            f"out must be a writable bytearray, memoryview, numpy array or torch tensor, "
            f"got {type(out).__name__}")
    if view.readonly:
        raise InvalidArgumentError("out is read-only")
    return _flat_bytes(view, "out")


_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.restype = ctypes.py_object
_PyBytes_FromStringAndSize.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_PyBytes_AsString = ctypes.pythonapi.PyBytes_AsString
_PyBytes_AsString.restype = ctypes.c_void_p
_PyBytes_AsString.argtypes = (ctypes.py_object,)
_PyMemoryView_FromMemory = ctypes.pythonapi.PyMemoryView_FromMemory
_PyMemoryView_FromMemory.restype = ctypes.py_object
_PyMemoryView_FromMemory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200
# Below this size a bytearray plus one copy is cheaper than the ctypes round trip.
_MIN_DIRECT_BYTES = 16 * 1024


def new_bytes(num_bytes: int) -> tuple[Any, memoryview]:
    """A fresh object of ``num_bytes`` bytes and a writable view to fill it; ``finish_bytes``
    turns the pair into the ``bytes`` to return. The view does not keep the object alive:
    the caller holds the object for as long as it writes through the view.

    NOTE: ``get`` returns bytes, and copying a filled bytearray into bytes would cost a second
    copy of every value. For large values we allocate an uninitialized bytes object (the
    C API's PyBytes_FromStringAndSize(NULL, n), as CPython's own readers do) and fill it
    before anyone else holds a reference: it is never hashed or shared while written. The
    view comes from PyMemoryView_FromMemory (flat, format "B"): one C call instead of a
    ctypes array type, an array and a cast (5 us -> 1 us per get).
    """
    if num_bytes < _MIN_DIRECT_BYTES:
        buf = bytearray(num_bytes)
        return buf, memoryview(buf)
    obj = _PyBytes_FromStringAndSize(None, num_bytes)
    view = _PyMemoryView_FromMemory(_PyBytes_AsString(obj), num_bytes, _PYBUF_WRITE)
    return obj, view


def finish_bytes(obj: Any) -> bytes:
    """The ``bytes`` of an object made by ``new_bytes`` once it is filled."""
    return bytes(obj) if isinstance(obj, bytearray) else obj


def release_views(views: list) -> None:
    """Release every memoryview in ``views`` and set its slot to None (None slots are
    skipped). Never raises: a view a caller still exports stays alive for that caller,
    while ours is dropped."""
    for i, view in enumerate(views):
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass  # NOTE: a caller still holds an export of it; ours is dropped below
            views[i] = None
