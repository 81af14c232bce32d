"""What the vLLM connector (``kvstore.engine.vllm``) reads: its ``ConnectorConfig``, the
settings of a vLLM config (``kv_transfer_config.kv_connector_extra_config``, model, block
size, TP), ``kv_role``, and the block ids in vLLM's scheduler structures.

No vLLM import: every vLLM object is read by attribute, so this also runs where vLLM is not
installed. Bad settings raise ConfigError when the engine builds its connectors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvstore._errors import ConfigError, InvalidArgumentError
from kvstore.engine.keys import KeyNamespace


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """``namespace`` (model, TP rank/size), ``block_size`` (tokens per page), ``quantize``
    (None or "int8"), ``kv_dtype`` (the cache dtype, e.g. "float16"), ``async_save`` (saves
    run on a background thread and vLLM frees a request's pages once its save ended; both
    sides must agree). The scheduler has no cache to look at, so it builds keys from these;
    the worker checks its cache agrees."""

    namespace: KeyNamespace
    block_size: int
    quantize: str | None = None
    kv_dtype: str = "float32"
    async_save: bool = True

    def key_namespace(self) -> KeyNamespace:
        """The namespace both sides key blocks under (layout, dtype, quantization filled)."""
        return dataclasses.replace(self.namespace, layout=f"L2BHD{self.block_size}",
                                   dtype=self.kv_dtype, quantization=self.quantize)


def block_id_list(blocks: Any) -> list[int]:
    """vLLM's KVCacheBlocks (``get_block_ids()`` -> one list per KV-cache group), a tuple of
    lists as in NewRequestData, or a plain list of ints."""
    if hasattr(blocks, "get_block_ids"):
        blocks = blocks.get_block_ids()
    if isinstance(blocks, tuple):
        blocks = blocks[0] if blocks else []
    return [int(b) for b in blocks]


def cached_new_blocks(cached: Any) -> list[tuple[str, Any]]:
    """(req_id, new block ids) of continuing requests: vLLM's CachedRequestData holds parallel
    lists ``req_ids`` / ``new_block_ids`` (older releases: a list of per-request objects)."""
    if cached is None:
        return []
    if hasattr(cached, "req_ids"):
        return [(r, b) for r, b in zip(cached.req_ids, cached.new_block_ids) if b is not None]
    return [(c.req_id, c.new_block_ids) for c in cached if c.new_block_ids is not None]


def role_flags(vllm_config: Any) -> tuple[bool, bool]:
    """(saves, loads) from ``kv_role``; both without a vLLM config or role (driven directly)."""
    role = getattr(getattr(vllm_config, "kv_transfer_config", None), "kv_role", None)
    if role is None:
        return True, True
    if role not in ("kv_producer", "kv_consumer", "kv_both"):
        raise ConfigError(f"kv_role must be kv_producer, kv_consumer or kv_both, not {role!r}")
    return role != "kv_consumer", role != "kv_producer"


def config_from_vllm(vllm_config: Any, store: Any) -> tuple[ConnectorConfig, Any]:
    """Settings from a vLLM config: model name, block size, TP rank/size, and the extra config
    keys ``master`` (HOST:PORT; required unless a store is given, else ConfigError; the older
    spelling ``kvstore_master`` works too), ``token``, ``transport``, ``quantize``,
    ``namespace`` and ``async_save`` (a bool, else ConfigError)."""
    if vllm_config is None:
        raise InvalidArgumentError("pass config= (ConnectorConfig) or a vLLM config")
    extra = dict(getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", {}) or {})
    parallel = vllm_config.parallel_config
    tp_size = parallel.tensor_parallel_size
    tp_rank = getattr(parallel, "rank", 0) % tp_size
    model = "".join(c if c.isalnum() or c in "._-" else "_"
                    for c in str(extra.get("namespace") or vllm_config.model_config.model))
    namespace = KeyNamespace(model=model, tp_rank=tp_rank, tp_size=tp_size)
    kv_dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
    async_save = extra.get("async_save", True)
    if not isinstance(async_save, bool):
        raise ConfigError(f'kv_connector_extra_config["async_save"] must be true or false, '
                          f'not {async_save!r}')
    config = ConnectorConfig(namespace, vllm_config.cache_config.block_size,
                             extra.get("quantize"), kv_dtype, async_save)
    if store is None:
        import kvstore

        master = extra.get("master") or extra.get("kvstore_master")
        if not master:
            # NOTE: no default address: a guessed master would connect to the wrong cluster
            # (or hang on none) far from the config line that forgot it.
            raise ConfigError('kv_transfer_config.kv_connector_extra_config["master"] must name '
                              'the kvstore master (HOST:PORT); the older spelling '
                              'kv_connector_extra_config["kvstore_master"] works too')
        store = kvstore.connect(master, token=extra.get("token"),
                                transport=extra.get("transport", "auto"))
    return config, store
