"""The causal LM the demo and the tests run: a small Llama with seeded random weights, or a
real local checkpoint.

Nothing is downloaded: ``build_model`` builds a ``LlamaForCausalLM`` from a ``LlamaConfig`` and
initialises it from a ``torch.Generator`` seeded with ``seed``, so every process that calls it
with the same arguments holds bit-identical weights. ``load_model(path)`` reads a checkpoint
from a local directory only (``local_files_only``).
"""

from __future__ import annotations

import dataclasses

import torch

from kvstore._errors import InvalidArgumentError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of the random demo model. Defaults: ~25M parameters, GQA (8 query heads, 4 KV
    heads), 16 KiB of fp32 KV per token, so a 2,048-token prefill takes seconds on a CPU."""

    num_layers: int = 8
    hidden_size: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1408
    vocab_size: int = 8192
    max_positions: int = 16384
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InvalidArgumentError(
                f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError("hidden_size must divide by num_heads, and num_heads by "
                                       "num_kv_heads")

    @property
    def tag(self) -> str:
        """A name for the key namespace: the same tag means the same weights."""
        return (f"rand-llama-l{self.num_layers}h{self.hidden_size}a{self.num_heads}"
                f"kv{self.num_kv_heads}v{self.vocab_size}s{self.seed}")


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with weights drawn from a generator seeded by ``spec.seed``.

    Weights are drawn in parameter-name order on CPU in fp32, then cast, so they do not depend
    on the global RNG, the thread count or the process. The model is in eval mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                # std 0.05 keeps activations O(1) through a few layers, so logits are spread
                # and greedy decoding is not a string of near-ties.
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.to(_DTYPES[spec.dtype]).eval()


def load_model(path: str, dtype: str = "float32") -> torch.nn.Module:
    """A causal LM from a local checkpoint directory (no network). Raises
    InvalidArgumentError when the path holds no loadable checkpoint."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype],
                                                     local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot load a causal LM from {path!r}: {exc}") from exc
    return model.eval()


def kv_shape_of(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers causal LM."""
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return config.num_hidden_layers, num_kv_heads, head_dim
