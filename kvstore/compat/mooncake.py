"""Mooncake Store's Python API (``mooncake.store``, release 0.3.13) on a kvstore cluster:
code written for Mooncake runs on kvstore by changing one import::

    from kvstore.compat.mooncake import MooncakeDistributedStore, ReplicateConfig

    store = MooncakeDistributedStore()
    store.setup("localhost", "P2PHANDSHAKE", 512 << 20, 16 << 20, "tcp", "", "HOST:PORT")

``master_server_addr`` names a kvstore master. Conventions are Mooncake's: calls return 0 or
a negative Mooncake error code (``ErrorCode``) instead of raising; ``is_exist`` gives 1/0/-1;
``get`` gives ``b""`` for a missing key; ``get_into`` the byte count or a negative code; a
``put`` of a key that exists succeeds and keeps the stored value (``upsert`` replaces it).

``global_segment_size > 0`` contributes that much DRAM to the pool from this process: an
embedded kvstore daemon joined to the master, which unregisters at ``close()``, so its
objects leave the pool then, as a Mooncake client's segment does. Keys live under
``mooncake/<tenant_id>/`` in kvstore, so ``remove_all`` removes what Mooncake clients stored
and nothing of native kvstore users. Every difference from Mooncake: docs/ENGINES.md.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

from kvstore._errors import InvalidArgumentError, KeyNotFoundError, KVStoreError
from kvstore.compat._mooncake_types import (BufferHandle, ErrorCode, RegisteredBuffers,
                                            ReplicateConfig, SoftPinAction, code_of_call,
                                            error_code, parse_mooncake_size, put_options)

__all__ = ["BufferHandle", "ErrorCode", "MooncakeDistributedStore", "ReplicateConfig",
           "SoftPinAction"]

log = logging.getLogger(__name__)
_SETUP_FIELDS = ("local_hostname", "metadata_server", "global_segment_size",
                 "local_buffer_size", "protocol", "rdma_devices", "master_server_addr")
_DICT_DEFAULTS = {"global_segment_size": 16 << 20, "local_buffer_size": 16 << 20,
                  "protocol": "tcp", "rdma_devices": "", "master_server_addr": "127.0.0.1:50051"}
DAEMON_REGISTER_TIMEOUT_S = 10.0
_INVALID = int(ErrorCode.INVALID_PARAMS)


class MooncakeDistributedStore:
    """A Mooncake Store client over kvstore (see the module docstring). Not usable before a
    successful ``setup``; after ``close`` calls fail with INVALID_PARAMS."""

    def __init__(self) -> None:
        self._store: Any = None
        self._daemon: Any = None
        self._hostname = ""
        self._prefix = ""
        self._buffers = RegisteredBuffers()
        self._local_buffer: bytearray | None = None

    # == setup / close =========================================================================
    def setup(self, *args: Any, **kwargs: Any) -> int:
        """``setup(local_hostname, metadata_server, global_segment_size, local_buffer_size,
        protocol, rdma_devices, master_server_addr, engine=None, enable_ssd_offload=False,
        ssd_offload_path="", tenant_id="default", enable_client_http_server=False,
        client_http_port=9300)`` or ``setup(config_dict)`` (sizes as ints or strings such as
        "16MB"). 0, or a negative code (the master is unreachable: RPC_FAIL; bad values:
        INVALID_PARAMS). TypeError when the positional form lacks a required argument."""
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs or "config" in kwargs:
            settings = dict(_DICT_DEFAULTS, **dict(kwargs.get("config", args[0] if args else {})))
            missing = [f for f in _SETUP_FIELDS[:2] if f not in settings]
        else:
            names = (*_SETUP_FIELDS, "engine", "enable_ssd_offload", "ssd_offload_path",
                     "tenant_id", "enable_client_http_server", "client_http_port")
            if len(args) > len(names) or set(kwargs) - set(names):
                raise TypeError("setup(): unexpected arguments")
            settings = dict(zip(names, args), **kwargs)
            missing = [f for f in _SETUP_FIELDS if f not in settings]
        if missing:
            raise TypeError(f"setup(): missing required arguments {missing}")
        if self._store is not None:
            log.error("setup() called twice")
            return _INVALID
        try:
            return self._setup(settings)
        except KVStoreError as exc:
            log.error("setup failed: %s", exc)
            self.close()
            return error_code(exc)

    def _setup(self, settings: dict[str, Any]) -> int:
        import kvstore

        segment_bytes = parse_mooncake_size(settings["global_segment_size"])
        buffer_bytes = parse_mooncake_size(settings["local_buffer_size"])
        protocol = str(settings["protocol"])
        if _truthy(settings.get("enable_ssd_offload", False)):
            raise InvalidArgumentError("enable_ssd_offload: give the kvstore daemons an SSD "
                                       "tier (--ssd) instead")
        if protocol != "tcp":
            # NOTE: kvstore picks its own transport (shm on one host, tcp across hosts); an
            # RDMA request still works, over those.
            log.warning("protocol %r: kvstore moves bytes over shm/tcp", protocol)
        tenant = str(settings.get("tenant_id", "default") or "default")
        master = str(settings["master_server_addr"])
        self._hostname = str(settings["local_hostname"])
        self._prefix = f"mooncake/{tenant}/"
        self._store = kvstore.connect(master)
        if segment_bytes > 0:
            from kvstore.daemon.config import DaemonConfig
            from kvstore.daemon.server import run_in_thread

            host = self._hostname.rsplit(":", 1)[0] if ":" in self._hostname else self._hostname
            self._daemon = run_in_thread(DaemonConfig(
                master_addr=master, host=host or "127.0.0.1", port=0, dram_bytes=segment_bytes,
                token=self._store.config.token, register_timeout_s=DAEMON_REGISTER_TIMEOUT_S))
        if buffer_bytes > 0:
            # NOTE: kvstore needs no staging buffer (transfers read and write the caller's
            # memory); the local buffer is registered memory callers may use for *_from/*_into.
            self._local_buffer = bytearray(buffer_bytes)
            self._buffers.register(BufferHandle.ptr(self._local_buffer), buffer_bytes)
        return 0

    def close(self) -> int:
        """Stop this process's segment (its objects leave the pool) and disconnect. 0."""
        store, daemon, self._store, self._daemon = self._store, self._daemon, None, None
        if store is not None:
            store.close()
        if daemon is not None:
            daemon.stop()
        return 0

    def get_hostname(self) -> str:
        return self._hostname

    def health_check(self) -> int:
        """0 healthy, 1 not set up or closed, 2 master unreachable (Mooncake's values)."""
        if self._store is None:
            return 1
        return 0 if code_of_call(self._store.stats) == 0 else 2

    # == buffers ===============================================================================
    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        return self._buffers.register(buffer_ptr, size)

    def unregister_buffer(self, buffer_ptr: int) -> int:
        return self._buffers.unregister(buffer_ptr)

    # == writes ================================================================================
    def put(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        return self._put_many([key], [value], config)[0]

    def put_from(self, key: str, buffer_ptr: int, size: int,
                 config: ReplicateConfig | None = None) -> int:
        return self.batch_put_from([key], [buffer_ptr], [size], config)[0]

    def put_parts(self, key: str, *parts: Any, config: ReplicateConfig | None = None) -> int:
        return self.put(key, b"".join(bytes(memoryview(p)) for p in parts), config)

    def put_batch(self, keys: Sequence[str], values: Sequence[Any],
                  config: ReplicateConfig | None = None) -> int:
        """0 if every key was stored, else the first failure's code."""
        return next((c for c in self._put_many(keys, values, config) if c), 0)

    def batch_put_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int],
                       sizes: Sequence[int], config: ReplicateConfig | None = None) -> list[int]:
        """One code per key; a pointer outside the registered buffers is INVALID_PARAMS."""
        views = self._views(buffer_ptrs, sizes, len(keys))
        if isinstance(views, int):
            return [views] * len(keys)
        return self._put_many(keys, views, config)

    def batch_put_from_multi_buffers(self, keys: Sequence[str],
                                     all_buffer_ptrs: Sequence[Sequence[int]],
                                     all_sizes: Sequence[Sequence[int]],
                                     config: ReplicateConfig | None = None) -> list[int]:
        """Object ``i`` is the concatenation of its buffers (copied once into one value)."""
        if len(all_buffer_ptrs) != len(keys) or len(all_sizes) != len(keys):
            return [_INVALID] * len(keys)
        values: list[Any] = []
        for ptrs, sizes in zip(all_buffer_ptrs, all_sizes):
            views = self._views(ptrs, sizes, len(ptrs))
            values.append(None if isinstance(views, int) else b"".join(views))
        codes = self._put_many([k for k, v in zip(keys, values) if v is not None],
                               [v for v in values if v is not None], config)
        it = iter(codes)
        return [next(it) if v is not None else _INVALID for v in values]

    def upsert(self, key: str, value: Any, config: ReplicateConfig | None = None) -> int:
        """Replace (or insert) ``key``. NOTE: a remove then a put, not atomic: a reader in
        between sees the key missing (Mooncake updates in place)."""
        return self.upsert_batch([key], [value], config)

    def upsert_from(self, key: str, buffer_ptr: int, size: int,
                    config: ReplicateConfig | None = None) -> int:
        return self.batch_upsert_from([key], [buffer_ptr], [size], config)[0]

    def upsert_batch(self, keys: Sequence[str], values: Sequence[Any],
                     config: ReplicateConfig | None = None) -> int:
        return next((c for c in self._upsert_many(keys, values, config) if c), 0)

    def batch_upsert_from(self, keys: Sequence[str], buffer_ptrs: Sequence[int],
                          sizes: Sequence[int], config: ReplicateConfig | None = None) -> list[int]:
        views = self._views(buffer_ptrs, sizes, len(keys))
        if isinstance(views, int):
            return [views] * len(keys)
        return self._upsert_many(keys, views, config)

    # == reads =================================================================================
    def get(self, key: str) -> bytes:
        """The object's bytes; ``b""`` if it is missing or cannot be read (as Mooncake)."""
        return self.get_batch([key])[0]

    def get_batch(self, keys: Sequence[str]) -> list[bytes]:
        results = self._call_batch("batch_get", keys)
        return [r if isinstance(r, bytes) else b"" for r in results]

    def get_buffer(self, key: str) -> BufferHandle | None:
        return self.batch_get_buffer([key])[0]

    def batch_get_buffer(self, keys: Sequence[str]) -> list[BufferHandle | None]:
        """Buffers (buffer protocol, ``ptr()``, ``size()``), None for keys not found."""
        results = self._call_batch("batch_get", keys)
        return [BufferHandle(r) if isinstance(r, bytes) else None for r in results]

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        return self.batch_get_into([key], [buffer_ptr], [size])[0]

    def batch_get_into(self, keys: Sequence[str], buffer_ptrs: Sequence[int],
                       sizes: Sequence[int]) -> list[int]:
        """Bytes read per key, or a negative code (missing: OBJECT_NOT_FOUND; buffer smaller
        than the object or not registered: INVALID_PARAMS)."""
        views = self._views(buffer_ptrs, sizes, len(keys))
        if isinstance(views, int):
            return [views] * len(keys)
        results = self._call_batch("batch_get_into", keys, views)
        return [r if isinstance(r, int) else error_code(r) for r in results]

    def batch_get_into_multi_buffers(self, keys: Sequence[str],
                                     all_buffer_ptrs: Sequence[Sequence[int]],
                                     all_sizes: Sequence[Sequence[int]],
                                     prefer_alloc_in_same_node: bool = False) -> list[int]:
        """Object ``i`` is read and split over its buffers in order; bytes read per key."""
        if len(all_buffer_ptrs) != len(keys) or len(all_sizes) != len(keys):
            return [_INVALID] * len(keys)
        codes: list[int] = []
        for key, ptrs, sizes in zip(keys, all_buffer_ptrs, all_sizes):
            views = self._views(ptrs, sizes, len(ptrs))
            if isinstance(views, int):
                codes.append(views)
                continue
            staging = bytearray(sum(len(v) for v in views))
            num_read = self._call_batch("batch_get_into", [key], [staging])[0]
            if isinstance(num_read, KVStoreError):
                codes.append(error_code(num_read))
                continue
            offset = 0
            for view in views:
                view[:] = staging[offset:offset + len(view)]
                offset += len(view)
            codes.append(num_read)
        return codes

    def get_size(self, key: str) -> int:
        """The object's size in bytes, or a negative code. NOTE: kvstore's client has no
        size-only call, so this reads the object."""
        result = self._call_batch("batch_get", [key])[0]
        return len(result) if isinstance(result, bytes) else error_code(result)

    # == metadata ==============================================================================
    def is_exist(self, key: str) -> int:
        return self.batch_is_exist([key])[0]

    def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        """1 exists, 0 does not, -1 error (for every key when the call fails)."""
        try:
            return [1 if e else 0 for e in self._live().batch_exists(self._names(keys))]
        except KVStoreError:
            return [-1] * len(keys)

    def remove(self, key: str, force: bool = False) -> int:
        """0, OBJECT_NOT_FOUND, or OBJECT_HAS_LEASE for a leased/pinned object (not ``force``)."""
        try:
            removed = self._live().remove(self._name(key), force=force)
        except KeyNotFoundError:
            removed = False
        except InvalidArgumentError:
            return _INVALID
        except KVStoreError as exc:
            return error_code(exc) if error_code(exc) != -1 else int(ErrorCode.OBJECT_HAS_LEASE)
        return 0 if removed else int(ErrorCode.OBJECT_NOT_FOUND)

    def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        return [self.remove(key, force) for key in keys]

    def remove_by_regex(self, regex_pattern: str, force: bool = False) -> int:
        """How many objects were removed, or INVALID_PARAMS. NOTE: kvstore's master removes
        by key prefix, not by regex, so only anchored literal prefixes (``^abc``, ``^abc.*``)
        are supported; other patterns are refused."""
        prefix = _literal_prefix(regex_pattern)
        if prefix is None:
            log.error("remove_by_regex(%r): only '^literal' or '^literal.*' patterns are "
                      "supported on kvstore", regex_pattern)
            return _INVALID
        return self._remove_prefix(prefix, force)

    def remove_all(self, force: bool = False) -> int:
        """Remove every object Mooncake clients of this tenant stored; how many, or -1."""
        count = self._remove_prefix("", force)
        return count if count >= 0 else -1

    # == helpers ===============================================================================
    def _live(self) -> Any:
        if self._store is None:
            from kvstore._errors import ClosedError

            raise ClosedError("MooncakeDistributedStore is not set up (or closed)")
        return self._store

    def _name(self, key: Any) -> str:
        if not isinstance(key, str) or not key:
            raise InvalidArgumentError(f"key must be a non-empty str, got {key!r}")
        return self._prefix + key

    def _names(self, keys: Sequence[str]) -> list[str]:
        if isinstance(keys, (str, bytes)):
            raise InvalidArgumentError("keys must be a list of str")
        return [self._name(k) for k in keys]

    def _call_batch(self, method: str, keys: Sequence[str], *args: Any, **kwargs: Any
                    ) -> list[Any]:
        """A kvstore batch call's per-key results; the call's own error for every key."""
        try:
            return getattr(self._live(), method)(self._names(keys), *args, **kwargs)
        except KVStoreError as exc:
            return [exc] * len(keys)

    def _put_many(self, keys: Sequence[str], values: Sequence[Any],
                  config: ReplicateConfig | None) -> list[int]:
        if len(values) != len(keys):
            return [_INVALID] * len(keys)
        try:
            options = put_options(config)
        except InvalidArgumentError:
            return [_INVALID] * len(keys)
        return [error_code(r) for r in self._call_batch("batch_put", keys, values, **options)]

    def _upsert_many(self, keys: Sequence[str], values: Sequence[Any],
                     config: ReplicateConfig | None) -> list[int]:
        removed = [self.remove(key, force=True) for key in keys]
        if any(code not in (0, int(ErrorCode.OBJECT_NOT_FOUND)) for code in removed):
            return [c if c not in (0, int(ErrorCode.OBJECT_NOT_FOUND)) else _INVALID
                    for c in removed]
        return self._put_many(keys, values, config)

    def _remove_prefix(self, prefix: str, force: bool) -> int:
        try:
            return self._live().remove_prefix(self._prefix + prefix, force=force)
        except KVStoreError as exc:
            return error_code(exc)

    def _views(self, ptrs: Sequence[int], sizes: Sequence[int], count: int) -> list | int:
        if len(ptrs) != count or len(sizes) != count:
            return _INVALID
        try:
            return [self._buffers.view(p, s) for p, s in zip(ptrs, sizes)]
        except InvalidArgumentError as exc:
            log.error("%s", exc)
            return _INVALID


def _literal_prefix(pattern: Any) -> str | None:
    """``abc`` for ``^abc`` or ``^abc.*`` (regex escapes allowed); None for anything else."""
    if not isinstance(pattern, str) or not pattern.startswith("^"):
        return None
    body = pattern[1:].removesuffix(".*")
    if not re.search(r"[.^$*+?{}\[\]|()\\]", body):
        return body
    literal = re.sub(r"\\(.)", r"\1", body)
    return literal if re.escape(literal) == body else None


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")
