"""What ``kvstore plan`` reads: a Hugging Face ``config.json`` (the KV shape), a file of
request lengths (the workload) and a ``kvstore bench transfer`` JSON (the link's measured
speed). Each raises InvalidArgumentError naming the file and what is wrong with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvstore._errors import InvalidArgumentError
from kvstore.plan.model import DTYPE_BYTES, ModelShape


def _read_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise InvalidArgumentError(f"{what} {path}: cannot read it: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{what} {path}: not JSON: {exc}") from exc


def shape_from_config(path: str, dtype: str | None = None) -> ModelShape:
    """The KV shape of a Hugging Face config.json (a multimodal one's ``text_config``):
    num_hidden_layers, num_key_value_heads (else num_attention_heads), head_dim (else
    hidden_size / num_attention_heads), torch_dtype or dtype (bfloat16 when absent), which
    ``dtype`` overrides. MLA configs (kv_lora_rank) are refused: their cache is one latent
    vector per layer, not K and V per head."""
    config = _read_json(path, "--model")
    if not isinstance(config, dict):
        raise InvalidArgumentError(f"--model {path}: expected a JSON object")
    config = config.get("text_config") or config
    if config.get("kv_lora_rank"):
        raise InvalidArgumentError(f"--model {path}: MLA models (kv_lora_rank) are not "
                                   "supported yet; give --num-layers/--num-kv-heads/--head-dim "
                                   "of an equivalent cache")
    try:
        num_layers = int(config["num_hidden_layers"])
        num_heads = int(config["num_attention_heads"])
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        head_dim = int(config.get("head_dim") or config["hidden_size"] // num_heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise InvalidArgumentError(f"--model {path}: missing or bad field {exc}") from exc
    dtype = dtype or str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise InvalidArgumentError(f"--model {path}: dtype {dtype!r} unknown; give --dtype")
    name = config.get("_name_or_path") or (config.get("architectures") or [Path(path).stem])[0]
    return ModelShape(num_layers, num_kv_heads, head_dim, dtype, str(name))


def read_workload(path: str, default_output_tokens: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request from a file: a JSON list (of numbers, or of
    objects with prompt_len and optional output_len), JSON lines of such objects, or text
    lines ``PROMPT[,OUTPUT]`` (commas or spaces; ``#`` starts a comment)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidArgumentError(f"--requests {path}: cannot read it: {exc}") from exc

    def one(item, where: str) -> tuple[int, int]:
        if isinstance(item, dict):
            prompt, output = item.get("prompt_len"), item.get("output_len", default_output_tokens)
        elif isinstance(item, (list, tuple)) and item:
            prompt, output = item[0], item[1] if len(item) > 1 else default_output_tokens
        else:
            prompt, output = item, default_output_tokens
        try:
            prompt, output = int(prompt), int(output)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"--requests {path} {where}: not a length: {item!r}") \
                from exc
        if prompt <= 0 or output <= 0:
            raise InvalidArgumentError(f"--requests {path} {where}: lengths must be above 0")
        return prompt, output

    stripped = text.strip()
    if stripped.startswith("["):
        items = _read_json(path, "--requests")
        requests = [one(item, f"item {i}") for i, item in enumerate(items)]
    else:
        requests = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidArgumentError(f"--requests {path} line {number}: {exc}") \
                        from exc
            else:
                item = line.replace(",", " ").split()
            requests.append(one(item, f"line {number}"))
    if not requests:
        raise InvalidArgumentError(f"--requests {path}: no request in it")
    return requests


def bandwidth_from_bench(path: str, block_bytes: int, transport: str | None = None
                         ) -> tuple[float, str]:
    """Effective bytes/s of moving KV through the store, from a ``kvstore bench transfer``
    JSON, and a sentence saying which figures it used: the batched put and get rows (client
    level when measured, else transport level) of ``transport`` (default: the fastest) at
    the value size nearest ``block_bytes`` (one KV block), combined as a put followed by a
    get (1 / (1/put + 1/get)), which is how a prefill saves and a decode loads."""
    data = _read_json(path, "--from-bench")
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows:
        raise InvalidArgumentError(f"--from-bench {path}: no rows (not a kvstore bench "
                                   "transfer JSON?)")
    level = "client" if any(r.get("level") == "client" for r in rows) else "transport"
    rows = [r for r in rows if r.get("level") == level and r.get("mode") == "batch"
            and r.get("concurrency", 1) == 1]
    if transport is not None:
        rows = [r for r in rows if r.get("transport") == transport]
    if not rows:
        raise InvalidArgumentError(f"--from-bench {path}: no batched rows"
                                   + (f" for transport {transport}" if transport else ""))
    size = min({r["size_bytes"] for r in rows},
               key=lambda s: abs(math.log(s) - math.log(max(block_bytes, 1))))
    best = None
    for kind in sorted({r["transport"] for r in rows}):
        by_op = {r["op"]: r["gbps"] for r in rows
                 if r["transport"] == kind and r["size_bytes"] == size}
        if "put" in by_op and "get" in by_op:
            gbps = 1 / (1 / by_op["put"] + 1 / by_op["get"])
            if best is None or gbps > best[0]:
                best = (gbps, kind, by_op)
    if best is None:
        raise InvalidArgumentError(f"--from-bench {path}: no put and get pair at one size")
    gbps, kind, by_op = best
    return gbps * 1e9, (f"{level} {kind} batched {size} B values: put {by_op['put']:.2f} GB/s "
                        f"then get {by_op['get']:.2f} GB/s = {gbps:.2f} GB/s effective")
