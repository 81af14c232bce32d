"""What an inference engine imports to keep its KV cache in kvstore: prefix-chunk keys, the
stored block form, the paged-KV connector and its results, heterogeneous tensor parallelism,
and the adapters (transformers cache, vLLM connector). The demo lives in kvstore.demo.

``prefix_keys`` and ``KeyNamespace`` need neither torch nor the kernels; the connectors load
``kvstore.ops`` when they first move bytes.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvstore.engine.keys import (HASH_SCHEME, KeyNamespace, canonical_token_bytes, loadable_tokens,
                                 prefix_keys)

_LAZY = {
    "PagedKVConnector": "kvstore.engine.connector",
    "SaveResult": "kvstore.engine.results",
    "LoadResult": "kvstore.engine.results",
    "PagedCache": "kvstore.engine.hf_cache",
    "cache_to_pages": "kvstore.engine.hf_cache",
    "pages_to_cache": "kvstore.engine.hf_cache",
    "KVStoreConnector": "kvstore.engine.vllm",
    "KVStoreConnectorV1": "kvstore.engine.vllm",
    "DynamicCacheConnector": "kvstore.engine.hf_connector",
}

__all__ = sorted(["HASH_SCHEME", "KeyNamespace", "canonical_token_bytes", "loadable_tokens",
                  "prefix_keys", *_LAZY])


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'kvstore.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
