"""The arithmetic of ``kvstore plan`` (no torch, no I/O): KV bytes, transfer time, TTFT with
PD beside colocated chunked prefill, the P:D ratio and the verdict. docs/PLANNING.md states
the model and its assumptions; every function here is a formula from it.

Units are in the names: ``_bytes``, ``_s``, ``_ms``, ``_per_s``. Bandwidth is bytes/s
(``parse_bandwidth`` reads ``25GB/s``, ``200Gb/s``, ``12.5GiB/s``). Invalid inputs raise
kvstore.InvalidArgumentError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re

from kvstore._errors import InvalidArgumentError

#: bytes per element of the KV dtypes a config may name
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "fp8": 1,
               "float8_e4m3fn": 1, "int8": 1}
#: an INT8 scale is one fp32 per group of head_dim values (kvstore.ops.int8, engine.blocks)
INT8_SCALE_BYTES = 4

_BANDWIDTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"
                        r"(|[kKMGT]i?[Bb])\s*(?:/s|ps)?\s*$")
_PREFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_bandwidth(text: str) -> float:
    """Bytes/s of ``25GB/s`` (bytes, decimal), ``200Gb/s`` (bits), ``12.5GiB/s`` (binary), or
    a bare number of bytes/s. Raises InvalidArgumentError for anything else or a value <= 0."""
    match = _BANDWIDTH.match(str(text))
    if not match:
        raise InvalidArgumentError(
            f"bandwidth {text!r}: expected a number with a unit such as 25GB/s, 200Gb/s, "
            "12.5GiB/s")
    value, unit = float(match.group(1)), match.group(2)
    scale = 1.0 if not unit else _PREFIX[unit[:-1]] / (8 if unit[-1] == "b" else 1)
    if value <= 0:
        raise InvalidArgumentError(f"bandwidth {text!r} must be above 0")
    return value * scale


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the KV cache of a model is made of: layers, KV heads, head dim, bytes per value."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    name: str = "model"

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(f"{field} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise InvalidArgumentError(
                f"dtype {self.dtype!r}: expected one of {', '.join(sorted(DTYPE_BYTES))}")

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x KV heads x head dim x bytes per value."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token_int8(self) -> int:
        """The same in INT8 with its fp32 scales: one scale per (layer, K/V, head) per token."""
        return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + INT8_SCALE_BYTES)


@dataclasses.dataclass(frozen=True)
class Engine:
    """How fast one engine instance computes: prefill tokens/s (one prompt at a time, no
    decode beside it), the time of one decode step of the decode batch, the chunk size of
    colocated chunked prefill, the decode batch (concurrent requests per decode step) and the
    KV block size (tokens per stored block: the decode side loads whole blocks only)."""

    prefill_tokens_per_s: float
    decode_step_s: float
    chunk_tokens: int = 512
    decode_batch: int = 16
    block_tokens: int = 16

    def __post_init__(self) -> None:
        for field in ("prefill_tokens_per_s", "decode_step_s", "chunk_tokens", "decode_batch",
                      "block_tokens"):
            value = getattr(self, field)
            if not value > 0:
                raise InvalidArgumentError(f"{field} must be above 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Link:
    """The path KV takes from a prefill to a decode instance: effective bytes/s and whether
    KV travels as INT8 with its scales."""

    bytes_per_s: float
    quantize: str | None = None

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:
            raise InvalidArgumentError(f"bandwidth must be above 0, got {self.bytes_per_s!r}")
        if self.quantize not in (None, "int8"):
            raise InvalidArgumentError(f"quantize must be None or 'int8', got {self.quantize!r}")


def wire_bytes_per_token(shape: ModelShape, link: Link) -> int:
    """KV bytes per token as they travel (INT8 with scales when the link quantizes)."""
    return shape.kv_bytes_per_token_int8 if link.quantize == "int8" else shape.kv_bytes_per_token


def transfer_s(num_tokens: int, shape: ModelShape, link: Link) -> float:
    """Seconds to move the KV of ``num_tokens`` over the link."""
    return num_tokens * wire_bytes_per_token(shape, link) / link.bytes_per_s


def loaded_tokens(prompt_tokens: int, block_tokens: int) -> int:
    """Prompt tokens whose KV the decode side loads: whole blocks only, and never the last
    token (the rule of ``kvstore.engine.keys.loadable_tokens``: the decode side computes at
    least one position, whose logits give the first token)."""
    return block_tokens * ((prompt_tokens - 1) // block_tokens)


def first_step_s(tail_tokens: int, engine: Engine) -> float:
    """The decode side's first step: one forward of the ``tail_tokens`` prompt tokens after
    the loaded blocks (1 to a block) over the loaded cache. Costed as a decode step plus the
    extra tokens at the prefill rate (a one-token forward is a decode step)."""
    return engine.decode_step_s + (tail_tokens - 1) / engine.prefill_tokens_per_s


def request_figures(prompt_tokens: int, shape: ModelShape, engine: Engine, link: Link) -> dict:
    """Every figure of one prompt length (the JSON/table row): bytes, transfer, TTFT with PD
    and colocated, and the decode step time while a colocated prefill runs beside it."""
    if prompt_tokens <= 0:
        raise InvalidArgumentError(f"prompt length must be above 0, got {prompt_tokens}")
    prefill_s = prompt_tokens / engine.prefill_tokens_per_s
    moved_tokens = loaded_tokens(prompt_tokens, engine.block_tokens)
    move_s = transfer_s(moved_tokens, shape, link)
    first_s = first_step_s(prompt_tokens - moved_tokens, engine)
    num_chunks = math.ceil(prompt_tokens / engine.chunk_tokens)
    # NOTE: the KV of whole blocks moves; the decode side computes the rest of the prompt (1
    # to a block of tokens) in its first step, which yields the first token, as `kvstore demo`
    # and the engine connectors do. Counting a one-token decode step there instead made the
    # plan's TTFT short of the demo's by a block's forward.
    ttft_pd_s = prefill_s + move_s + first_s
    # NOTE: colocated, each chunk runs in one engine step beside the running decode batch,
    # so the prompt waits for the batch's decode work once per chunk (and the batch waits
    # for the chunk: the interference below); the last chunk yields the first token.
    ttft_colocated_s = prefill_s + num_chunks * engine.decode_step_s
    chunk_s = min(engine.chunk_tokens, prompt_tokens) / engine.prefill_tokens_per_s
    return {
        "prompt_tokens": prompt_tokens,
        "kv_bytes_per_token": shape.kv_bytes_per_token,
        "kv_bytes_per_token_int8": shape.kv_bytes_per_token_int8,
        "kv_bytes_per_request": prompt_tokens * wire_bytes_per_token(shape, link),
        "kv_tokens_moved": moved_tokens,
        "kv_bytes_moved": moved_tokens * wire_bytes_per_token(shape, link),
        "prefill_ms": prefill_s * 1e3,
        "transfer_ms": move_s * 1e3,
        "first_step_ms": first_s * 1e3,
        "ttft_pd_ms": ttft_pd_s * 1e3,
        "ttft_colocated_ms": ttft_colocated_s * 1e3,
        "num_chunks": num_chunks,
        "decode_step_ms": engine.decode_step_s * 1e3,
        "decode_step_colocated_ms": (engine.decode_step_s + chunk_s) * 1e3,
        "pd_wins": ttft_pd_s < ttft_colocated_s,
    }


#: crossover_tokens scans at most this many chunk intervals (a link barely faster than the
#: break-even point would need more; the verdict then says PD never wins within them)
MAX_SCANNED_CHUNKS = 1_000_000


def crossover_tokens(shape: ModelShape, engine: Engine, link: Link) -> int | None:
    """The smallest prompt length from which on PD's TTFT is below colocated chunked prefill's
    for every longer prompt; None when it never is (the link is too slow for this engine).

    PD wins at P when transfer(L(P)) + first(P - L(P)) < ceil(P/C) d, L the loaded tokens
    (whole blocks of B, never the last token), d the decode step, C the chunk. With P = jB + r
    (r in 1..B) the left side is jBb + d + (r - 1)t (b transfer, t prefill seconds per token):
    at most Pb + d + (B - 1)t, so every chunk interval ((k-1)C, kC] is won once
    kCb + d + (B - 1)t < kd, i.e. for k above (d + (B - 1)t) / (d - Cb) when d > Cb (never
    otherwise). Below that bound the intervals are checked one by one, from the bound down:
    an interval is won when its largest left side (at its end or at its last block end) is,
    and in the highest interval not won the last length lost is found by a scan.
    """
    b = wire_bytes_per_token(shape, link) / link.bytes_per_s
    t = 1 / engine.prefill_tokens_per_s
    d, c, block = engine.decode_step_s, engine.chunk_tokens, engine.block_tokens
    margin_s = d - c * b
    if margin_s <= 0:
        return None
    bound = math.floor((d + (block - 1) * t) / margin_s) + 1   # every k >= bound is won
    if bound > MAX_SCANNED_CHUNKS:
        return None

    def gap_s(p: int) -> float:      # PD's TTFT minus colocated's, prefill cancelled out
        moved = loaded_tokens(p, block)
        return moved * b + first_step_s(p - moved, engine) - math.ceil(p / c) * d

    for k in range(bound - 1, 0, -1):
        end = k * c
        last_block_end = block * (end // block)
        worst = [end] + ([last_block_end] if last_block_end > end - c else [])
        if all(gap_s(p) < 0 for p in worst):
            continue
        for p in range(end, end - c, -1):       # the last length lost in this interval
            if gap_s(p) >= 0:
                return p + 1
    return 1


def pd_ratio(mean_prompt_tokens: float, mean_output_tokens: float, shape: ModelShape,
             engine: Engine, link: Link) -> dict:
    """Prefill instances per decode instance that balance the two throughputs.

    A prefill instance finishes tps / P requests/s (its transfers overlap the next prefill,
    unless the link is slower: then the link's rate); a decode instance finishes B / (O x d)
    requests/s (B the decode batch, O output tokens, d the step at that batch)."""
    if mean_prompt_tokens <= 0 or mean_output_tokens <= 0:
        raise InvalidArgumentError("prompt and output lengths must be above 0")
    prefill_rps = min(engine.prefill_tokens_per_s / mean_prompt_tokens,
                      link.bytes_per_s / (mean_prompt_tokens * wire_bytes_per_token(shape, link)))
    decode_rps = engine.decode_batch / (mean_output_tokens * engine.decode_step_s)
    ratio = decode_rps / prefill_rps
    return {"prefill_requests_per_s": prefill_rps, "decode_requests_per_s": decode_rps,
            "prefill_per_decode": ratio,
            "pd_ratio": (f"{ratio:.2g}:1" if ratio >= 1 else f"1:{1 / ratio:.2g}")}
