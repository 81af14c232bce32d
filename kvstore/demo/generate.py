"""Greedy generation with a transformers causal LM on an explicit prefill schedule.

A PD handover changes *where* each part of the prompt is computed, never *how*: the prompt is
computed in chunks whose ends are given by a schedule (``chunk_ends``), then decoding runs one
token at a time. The single-process reference and the disaggregated run use the same schedule,
so with lossless KV transfer their tokens are equal bit for bit; any difference is the store's.
The cache goes to the model under the keyword its forward declares (``cache``, or
``past_key_values`` in transformers releases before the rename), so no deprecation warns.

``prefill_schedule`` is the schedule the demo uses: every full block that leaves at least one
prompt token to compute (so the decode side always gets the last position's logits, as vLLM's
decode side does), then the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from typing import Any, Sequence

import torch

from kvstore._errors import InvalidArgumentError
from kvstore.engine.keys import loadable_tokens


@dataclasses.dataclass
class Generation:
    """What a generation produced: ``tokens`` (greedy, the first from the prompt's last
    logits), ``first_logits`` (fp32 logits of the prompt's last position), ``decode_s``
    (wall time of the decode steps after the first token)."""

    tokens: list[int]
    first_logits: torch.Tensor
    decode_s: float


def prefill_schedule(num_tokens: int, block_size: int, start: int = 0) -> list[int]:
    """Chunk ends for computing tokens ``[start, num_tokens)``: up to the loadable boundary,
    then to the end (empty chunks dropped)."""
    boundary = loadable_tokens(num_tokens, block_size)
    return ([boundary] if boundary > start else []) + [num_tokens]


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class: type) -> str:
    """The forward keyword that takes the KV cache: ``cache`` in newer transformers (which
    deprecate ``past_key_values`` with a FutureWarning), ``past_key_values`` in older ones."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _forward(model: Any, ids: torch.Tensor, cache: Any, **kwargs: Any) -> Any:
    """One forward step of ``ids`` (``[1, num_tokens]``) on ``cache``, which it extends."""
    return model(input_ids=ids, use_cache=True, **{_cache_keyword(type(model)): cache}, **kwargs)


@torch.inference_mode()
def extend(model: Any, cache: Any, token_ids: Sequence[int], start: int,
           chunk_ends: Sequence[int]) -> torch.Tensor:
    """Compute tokens ``[start, chunk_ends[-1])`` into ``cache`` (which holds ``start``
    tokens), one forward per chunk. Returns fp32 logits of the last computed position."""
    logits = None
    device = next(model.parameters()).device
    for end in chunk_ends:
        if end <= start:
            raise InvalidArgumentError(f"chunk ends must increase past {start}, got {end}")
        ids = torch.as_tensor(list(token_ids[start:end]), dtype=torch.long, device=device)
        out = _forward(model, ids[None], cache, logits_to_keep=1)
        logits = out.logits[0, -1].float()
        start = end
    if logits is None:
        raise InvalidArgumentError("nothing to compute: empty schedule")
    return logits


@torch.inference_mode()
def decode(model: Any, cache: Any, first_logits: torch.Tensor,
           num_decode_tokens: int) -> Generation:
    """Greedy decoding: the first token is ``argmax(first_logits)``, each later one costs one
    forward step on ``cache``. Returns ``num_decode_tokens`` tokens."""
    if num_decode_tokens < 1:
        raise InvalidArgumentError(f"num_decode_tokens must be >= 1, got {num_decode_tokens}")
    device = next(model.parameters()).device
    tokens = [int(first_logits.argmax())]
    started = time.perf_counter()
    for _ in range(num_decode_tokens - 1):
        ids = torch.tensor([[tokens[-1]]], dtype=torch.long, device=device)
        out = _forward(model, ids, cache)
        tokens.append(int(out.logits[0, -1].argmax()))
    return Generation(tokens, first_logits, time.perf_counter() - started)


def reference_generate(model: Any, token_ids: Sequence[int], *, block_size: int,
                       num_decode_tokens: int, prefix_tokens: int = 0) -> Generation:
    """Single-process generation on the demo's schedule: ``[0, prefix_tokens)`` first when a
    prefix split is given (the second request's stored prefix), then ``prefill_schedule``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ends = ([prefix_tokens] if prefix_tokens else []) + prefill_schedule(
        len(token_ids), block_size, start=prefix_tokens)
    logits = extend(model, cache, token_ids, 0, ends)
    return decode(model, cache, logits, num_decode_tokens)
