"""Loading of the kernel libraries and their C ABI (mirror of csrc/include/kvops/abi.h).

The CPU library is loaded on first use; the CUDA library only when a CUDA tensor reaches an
op, so a CPU-only install never needs it. Both are extension modules found through the import
system (so editable installs work) and opened with ctypes, which releases the GIL during
each call.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from typing import Sequence

import torch

from kvstore._errors import InvalidArgumentError, KVStoreError

ABI_VERSION = 1

# dtype codes of kvops::DtypeCode
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

_STATUS_MESSAGES = {1: "unsupported dtype code", 2: "invalid kernel argument", 3: "launch failed"}


class PagesArg(ctypes.Structure):
    """kvops_pages: the pages one call moves, as every layer sees them."""

    _fields_ = [
        ("layer_ptrs", ctypes.POINTER(ctypes.c_void_p)),
        ("block_ids", ctypes.c_void_p),
        ("num_layers", ctypes.c_int64),
        ("num_kv", ctypes.c_int64),
        ("num_pages", ctypes.c_int64),
        ("page_elems", ctypes.c_int64),
        ("block_stride", ctypes.c_int64),
        ("kv_stride", ctypes.c_int64),
    ]


class TokensArg(ctypes.Structure):
    """kvops_tokens: token-major tensors [heads, seq, head_dim] a row copy reads or writes."""

    _fields_ = [
        ("tensor_ptrs", ctypes.POINTER(ctypes.c_void_p)),
        ("block_ids", ctypes.c_void_p),
        ("num_tensors", ctypes.c_int64),
        ("num_blocks", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("num_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
        ("token_stride", ctypes.c_int64),
    ]


class ExecArg(ctypes.Structure):
    """kvops_exec: thread count (CPU library); device index and cudaStream_t (CUDA library)."""

    _fields_ = [("num_threads", ctypes.c_int64), ("device", ctypes.c_int64),
                ("stream", ctypes.c_void_p)]


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_PAGES = ctypes.POINTER(PagesArg)
_EXEC = ctypes.POINTER(ExecArg)
_SIGNATURES = {
    "kvops_abi_version": [],
    "kvops_gather_pages": [_PAGES, _I64, _P, _EXEC],
    "kvops_scatter_pages": [_PAGES, _I64, _P, _EXEC],
    "kvops_quantize_int8": [_P, ctypes.c_int, _I64, _I64, _P, _P, _P, _EXEC],
    "kvops_dequantize_int8": [_P, _P, _I64, _I64, ctypes.c_int, _P, _EXEC],
    "kvops_gather_quantize": [_PAGES, ctypes.c_int, _I64, _P, _P, _P, _EXEC],
    "kvops_dequantize_scatter": [_PAGES, ctypes.c_int, _I64, _P, _P, _EXEC],
}
# NOTE: CPU only (kvstore.ops.rows): per-block rows are host memory, and a CUDA cache's
# bytes cross to the host in one download of a gathered buffer anyway.
_CPU_SIGNATURES = {
    "kvops_gather_blocks": [_PAGES, _I64, _P, _EXEC],
    "kvops_scatter_blocks": [_PAGES, _I64, _P, _EXEC],
    "kvops_gather_tokens": [ctypes.POINTER(TokensArg), _I64, _P, _EXEC],
    "kvops_scatter_tokens": [ctypes.POINTER(TokensArg), _I64, _P, _EXEC],
    "kvops_gather_blocks_hash": [_PAGES, _I64, _P, _P, _EXEC],
    "kvops_gather_tokens_hash": [ctypes.POINTER(TokensArg), _I64, _P, _P, _EXEC],
    "kvops_scatter_blocks_verified": [_PAGES, _I64, _P, _P, _P, _EXEC],
    "kvops_scatter_tokens_verified": [ctypes.POINTER(TokensArg), _I64, _P, _P, _P, _EXEC],
}


def module_path(name: str) -> str | None:
    """File of the extension module kvstore.ops.<name>, or None if it was not built."""
    spec = importlib.util.find_spec(f"kvstore.ops.{name}")
    return spec.origin if spec is not None and spec.origin else None


def _open(name: str, signatures: dict = _SIGNATURES) -> ctypes.CDLL:
    path = module_path(name)
    if path is None:
        raise KVStoreError(f"kernel library kvstore.ops.{name} is not built (reinstall kvstore)")
    lib = ctypes.CDLL(path)
    for fn_name, argtypes in signatures.items():
        fn = getattr(lib, fn_name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    lib.kvops_last_error.argtypes = []
    lib.kvops_last_error.restype = ctypes.c_char_p
    if lib.kvops_abi_version() != ABI_VERSION:
        raise KVStoreError(f"{path} has ABI {lib.kvops_abi_version()}, expected {ABI_VERSION}")
    return lib


@functools.cache
def cpu_lib() -> ctypes.CDLL:
    return _open("_kvops_cpu", _SIGNATURES | _CPU_SIGNATURES)


@functools.cache
def cuda_lib() -> ctypes.CDLL:
    """The CUDA library; KVStoreError if this install was built without nvcc."""
    return _open("_kvops_cuda")


def lib_for(device: torch.device) -> ctypes.CDLL:
    if device.type == "cpu":
        return cpu_lib()
    if device.type == "cuda":
        return cuda_lib()
    raise InvalidArgumentError(f"kvstore.ops runs on cpu or cuda tensors, not {device.type}")


def exec_for(device: torch.device, num_bytes: int, max_threads: int | None = None) -> ExecArg:
    """Execution context: on CPU, threads enough for num_bytes (about 1 MiB each, since a
    thread start costs tens of microseconds) up to ``max_threads`` (None: torch's intra-op
    count); on CUDA, the caller's current stream of that device."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return ExecArg(0, index, torch.cuda.current_stream(index).cuda_stream)
    limit = torch.get_num_threads() if max_threads is None else max_threads
    num_threads = max(1, min(limit, num_bytes >> 20))
    return ExecArg(num_threads, 0, None)


def check_num_threads(num_threads: int | None) -> int | None:
    """A kernel call's ``num_threads`` argument, checked: None or an int >= 1
    (InvalidArgumentError else)."""
    if num_threads is not None and (isinstance(num_threads, bool) or
                                    not isinstance(num_threads, int) or num_threads < 1):
        raise InvalidArgumentError(f"num_threads must be None or an int >= 1, got "
                                   f"{num_threads!r}")
    return num_threads


def pages_arg(layers: Sequence[torch.Tensor], ids: torch.Tensor, num_kv: int, page_elems: int,
              block_stride: int, kv_stride: int) -> tuple[PagesArg, object]:
    """The kvops_pages struct; the second value keeps the pointer array alive."""
    ptrs = (ctypes.c_void_p * len(layers))(*[t.data_ptr() for t in layers])
    arg = PagesArg(ptrs, ids.data_ptr(), len(layers), num_kv, ids.numel(), page_elems,
                   block_stride, kv_stride)
    return arg, ptrs


def check_status(lib: ctypes.CDLL, status: int, op: str) -> None:
    """Raise KVStoreError for a failed kernel call (a validation bug or a CUDA failure)."""
    if status != 0:
        detail = lib.kvops_last_error().decode(errors="replace")
        reason = _STATUS_MESSAGES.get(status, f"status {status}")
        raise KVStoreError(f"kvstore.ops {op}: {reason}{': ' + detail if detail else ''}")
