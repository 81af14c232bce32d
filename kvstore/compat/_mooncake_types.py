"""The value types of Mooncake Store's Python API (0.3.13) and their kvstore equivalents:
error codes, ``ReplicateConfig``, ``SoftPinAction``, ``BufferHandle``, Mooncake's size
strings, and raw-pointer buffers (what ``register_buffer``/``*_from``/``*_into`` pass)."""

from __future__ import annotations

import ctypes
import enum
import re
import threading
from typing import Any

from kvstore._errors import (AuthenticationError, CapacityError, ChecksumError, ClosedError,
                             InvalidArgumentError, KeyNotFoundError, KVStoreError,
                             MasterUnavailableError, TransferError)


class ErrorCode(enum.IntEnum):
    """Mooncake's ``mooncake::ErrorCode`` values that this layer returns."""

    OK = 0
    INTERNAL_ERROR = -1
    NO_AVAILABLE_HANDLE = -200
    INVALID_PARAMS = -600
    ILLEGAL_CLIENT = -601
    OBJECT_NOT_FOUND = -704
    OBJECT_HAS_LEASE = -706
    TRANSFER_FAIL = -800
    CHECKSUM_MISMATCH = -801
    RPC_FAIL = -900


_CODES = ((KeyNotFoundError, ErrorCode.OBJECT_NOT_FOUND),
          (CapacityError, ErrorCode.NO_AVAILABLE_HANDLE),
          (InvalidArgumentError, ErrorCode.INVALID_PARAMS),
          (ClosedError, ErrorCode.INVALID_PARAMS),  # Mooncake: "client is not initialized"
          (AuthenticationError, ErrorCode.ILLEGAL_CLIENT),
          (ChecksumError, ErrorCode.CHECKSUM_MISMATCH),
          (TransferError, ErrorCode.TRANSFER_FAIL),
          (MasterUnavailableError, ErrorCode.RPC_FAIL))


def error_code(error: BaseException | None) -> int:
    """0 for None, else the Mooncake code of a kvstore error (INTERNAL_ERROR if unmapped)."""
    if error is None:
        return int(ErrorCode.OK)
    for kind, code in _CODES:
        if isinstance(error, kind):
            return int(code)
    return int(ErrorCode.INTERNAL_ERROR)


class SoftPinAction(enum.IntEnum):
    """What a write does to the object's soft pin (Mooncake's ``SoftPinAction``)."""

    PRESERVE = 0
    ENABLE = 1
    DISABLE = 2


class ReplicateConfig:
    """Mooncake's per-write placement settings. kvstore honours ``replica_num`` (distinct
    nodes), ``with_hard_pin``, ``with_soft_pin`` / ``soft_pin_action=ENABLE`` with
    ``soft_pin_ttl_ms`` (0: kvstore's default soft-pin TTL of 60 s); the placement hints
    (``preferred_segment(s)``, ``prefer_alloc_in_same_node``, ``group_ids``) are accepted and
    ignored; ``nof_replica_num``/``dfs_replica_num`` > 0 (NVMe-oF and DFS pools) are refused
    with INVALID_PARAMS."""

    def __init__(self) -> None:
        self.replica_num = 1
        self.with_soft_pin = False
        self.with_hard_pin = False
        self.soft_pin_action = SoftPinAction.PRESERVE
        self.soft_pin_ttl_ms = 0
        self.preferred_segment = ""
        self.preferred_segments: list[str] = []
        self.prefer_alloc_in_same_node = False
        self.nof_replica_num = 0
        self.dfs_replica_num = 0
        self.group_ids: list[int] = []

    def __repr__(self) -> str:
        return (f"ReplicateConfig(replica_num={self.replica_num}, with_soft_pin="
                f"{self.with_soft_pin}, with_hard_pin={self.with_hard_pin})")


DEFAULT_SOFT_PIN_TTL_S = 60.0


def put_options(config: ReplicateConfig | None) -> dict[str, Any]:
    """kvstore ``put`` keywords for a ReplicateConfig; InvalidArgumentError for settings that
    have no kvstore meaning."""
    if config is None:
        return {}
    if not isinstance(config, ReplicateConfig):
        raise InvalidArgumentError(f"config must be a ReplicateConfig, got {type(config).__name__}")
    if config.nof_replica_num or config.dfs_replica_num:
        raise InvalidArgumentError("kvstore has no NVMe-oF or DFS replica pools")
    options: dict[str, Any] = {"replicas": config.replica_num, "hard_pin": config.with_hard_pin}
    if config.with_soft_pin or config.soft_pin_action == SoftPinAction.ENABLE:
        ttl_ms = config.soft_pin_ttl_ms
        options["soft_pin_ttl_s"] = ttl_ms / 1000 if ttl_ms else DEFAULT_SOFT_PIN_TTL_S
    return options


# Mooncake's byte-size strings: binary units, K/KB ... T/TB, case-insensitive, "1.5 GB".
_MOONCAKE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
                   "G": 1 << 30, "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_mooncake_size(value: Any) -> int:
    """Bytes of an int or a Mooncake size string ("16MB" is 16 MiB, as in Mooncake).
    InvalidArgumentError for anything else or a negative size."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgumentError(f"size must be >= 0, got {value}")
        return value
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).upper() if match else None
    if unit not in _MOONCAKE_UNITS:
        raise InvalidArgumentError(f"invalid size {value!r}: expected e.g. 16MB, 1.5 GB or bytes")
    return int(float(match.group(1)) * _MOONCAKE_UNITS[unit])


class BufferHandle(bytearray):
    """An object's bytes with Mooncake's ``BufferHandle`` methods (``ptr()``, ``size()``) and
    the buffer protocol (``numpy.frombuffer``, ``memoryview``)."""

    def ptr(self) -> int:
        return ctypes.addressof((ctypes.c_char * len(self)).from_buffer(self)) if self else 0

    def size(self) -> int:
        return len(self)


class RegisteredBuffers:
    """The memory ranges registered with ``register_buffer``. Raw pointers become memoryviews
    only inside a registered range: an unregistered pointer is INVALID_PARAMS instead of a
    write to arbitrary memory (Mooncake leaves that undefined). Thread-safe."""

    def __init__(self) -> None:
        self._ranges: dict[int, int] = {}  # start address -> size
        self._lock = threading.Lock()

    def register(self, ptr: int, size: int) -> int:
        if not isinstance(ptr, int) or not isinstance(size, int) or ptr <= 0 or size <= 0:
            return int(ErrorCode.INVALID_PARAMS)
        with self._lock:
            self._ranges[ptr] = max(size, self._ranges.get(ptr, 0))
        return 0

    def unregister(self, ptr: int) -> int:
        with self._lock:
            return 0 if self._ranges.pop(ptr, None) is not None else int(ErrorCode.INVALID_PARAMS)

    def view(self, ptr: int, size: int) -> memoryview:
        """A writable view of ``size`` bytes at ``ptr``; InvalidArgumentError unless the
        whole range lies in one registered buffer."""
        if not isinstance(ptr, int) or not isinstance(size, int) or size < 0:
            raise InvalidArgumentError(f"bad buffer pointer/size {ptr!r}/{size!r}")
        with self._lock:
            inside = any(start <= ptr and ptr + size <= start + length
                         for start, length in self._ranges.items())
        if not inside:
            raise InvalidArgumentError(f"buffer 0x{ptr:x}+{size} is not inside a registered "
                                       f"buffer (register_buffer first)")
        if size == 0:
            return memoryview(bytearray())
        return memoryview((ctypes.c_char * size).from_address(ptr)).cast("B")


def code_of_call(fn: Any, *args: Any, **kwargs: Any) -> int:
    """Run a kvstore call that returns nothing; 0, or the Mooncake code of its error."""
    try:
        fn(*args, **kwargs)
    except KVStoreError as exc:
        return error_code(exc)
    return 0
