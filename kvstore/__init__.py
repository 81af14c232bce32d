"""kvstore: a KV-cache pool for prefill/decode disaggregated LLM inference.

Layering: ``_errors`` and ``_units`` depend on nothing; ``master`` (control plane) and
``daemon`` (storage node) depend on the generated stubs in ``v1``; ``transport`` moves bytes;
``client`` builds the public ``KVStore`` on master + transport; ``ops`` (kernels, torch) and
``engine`` (engine adapters) sit on top. This module only re-exports public names, and loads
the heavy ones (``client``, ``ops``, ``engine``) on first use so that ``kvstore master`` and
``kvstore daemon`` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvstore._errors import (
    AuthenticationError,
    CapacityError,
    ChecksumError,
    ClosedError,
    ConfigError,
    InvalidArgumentError,
    KeyNotFoundError,
    KVStoreError,
    MasterUnavailableError,
    TransferError,
    TransferTimeoutError,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "KVStore": "kvstore.client",
    "TLSConfig": "kvstore._tls",
    "connect": "kvstore.client",
    "local": "kvstore.client",
    "aio": "kvstore.aio",
    "engine": "kvstore.engine",
    "ops": "kvstore.ops",
}

__all__ = sorted(
    [
        "AuthenticationError",
        "CapacityError",
        "ChecksumError",
        "ClosedError",
        "ConfigError",
        "InvalidArgumentError",
        "KVStoreError",
        "KeyNotFoundError",
        "MasterUnavailableError",
        "TransferError",
        "TransferTimeoutError",
        "__version__",
        *_LAZY,
    ]
)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"kvstore.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
