"""``kvstore plan --measure``: the engine speeds of the demo's model on this machine.

Builds the model ``kvstore demo`` runs (``kvstore.demo.model``, the same seeded weights and
shape for a ``--model-size``) and times, with the demo's own code (``demo.generate``), a
prefill of the prompt length on the demo's schedule (median of three) and single decode steps
over the cache it left (median), each after a warm-up. Imports torch and transformers (the ``hf`` extra); ``kvstore
plan`` without ``--measure`` never does.
"""

from __future__ import annotations

import statistics
import time

from kvstore.plan.model import ModelShape


def measure_demo_model(prompt_tokens: int, model_size: str = "small", block_size: int = 16,
                       num_decode_steps: int = 8, num_threads: int | None = None,
                       num_prefills: int = 3) -> tuple[ModelShape, float, float]:
    """(the model's KV shape, prefill tokens/s at ``prompt_tokens``, decode step seconds at
    batch 1 over a cache of that many tokens), with ``num_threads`` torch threads (None:
    torch's choice, as the demo's engine processes). The prefill figure is the median of
    ``num_prefills`` runs and the step the median of the steps after the first.

    NOTE: the median, not the best run: the demo it is checked against times one prefill, and
    on a shared machine the best of a few runs is the luckiest, not the typical one."""
    import random

    import torch

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    from transformers import DynamicCache

    from kvstore.demo.generate import _forward, extend, prefill_schedule
    from kvstore.demo.model import ModelSpec, build_model, kv_shape_of
    from kvstore.demo.run import MODEL_SIZES

    spec = ModelSpec(**MODEL_SIZES[model_size])
    model = build_model(spec)
    rng = random.Random(0)
    token_ids = [rng.randrange(spec.vocab_size) for _ in range(prompt_tokens)]
    extend(model, DynamicCache(config=model.config), token_ids[:64], 0, [min(64, prompt_tokens)])
    prefill_s = []
    for _ in range(num_prefills):
        cache = DynamicCache(config=model.config)
        started_s = time.perf_counter()
        logits = extend(model, cache, token_ids, 0, prefill_schedule(prompt_tokens, block_size))
        prefill_s.append(time.perf_counter() - started_s)
    step_s = []
    with torch.inference_mode():
        ids = torch.tensor([[int(logits.argmax())]], dtype=torch.long)
        for _ in range(num_decode_steps + 1):
            started_s = time.perf_counter()
            out = _forward(model, ids, cache)
            step_s.append(time.perf_counter() - started_s)
            ids = out.logits[:, -1:].argmax(-1)
    num_layers, num_kv_heads, head_dim = kv_shape_of(model)
    shape = ModelShape(num_layers, num_kv_heads, head_dim, spec.dtype, f"demo {spec.tag}")
    return shape, prompt_tokens / statistics.median(prefill_s), statistics.median(step_s[1:])
