"""``kvstore demo``: prefill/decode disaggregation on this machine, end to end.

1. Starts a cluster: ``kvstore master`` and ``kvstore daemon`` processes on loopback.
2. Runs a prefill process, then a decode process (``python -m kvstore.engine.pd_worker``);
   they share nothing but the store and receive only the requests' token ids and the key
   namespace. Request 1 is a random prompt; request 2 shares its first ``--prefix-tokens``
   tokens, so its prefill finds them in the store (a prefix hit) and computes only the rest.
3. Prints a table of the handover (sizes, times, bandwidth, time to first token) and whether
   the decode side's tokens equal the single-process generation of the same prompt.

The cluster is stopped when the demo ends, on error and on Ctrl-C alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from kvstore._errors import KVStoreError

# Model shapes selectable with --model-size; "small" is the default demo model.
MODEL_SIZES = {
    "small": {},
    "tiny": {"num_layers": 2, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 256, "vocab_size": 1024},
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What one demo run does (CLI flags map 1:1)."""

    prompt_tokens: int = 2048
    decode_tokens: int = 64
    prefix_tokens: int | None = None  # None: min(1536, 3/4 of the prompt), block-aligned
    block_size: int = 16
    quantize: str | None = None
    model_path: str | None = None
    model_size: str = "small"
    dram: str = "2GiB"
    seed: int = 0
    num_threads: int | None = None  # torch threads per engine process; None: torch's default

    def __post_init__(self) -> None:
        from kvstore._errors import ConfigError

        if self.prompt_tokens < 2:
            raise ConfigError("--prompt-tokens must be >= 2")
        if self.decode_tokens < 1:
            raise ConfigError("--decode-tokens must be >= 1")
        if self.block_size < 1:
            raise ConfigError("--block-size must be >= 1")
        if self.prefix_tokens is None:
            shared = min(1536, self.prompt_tokens * 3 // 4)
            object.__setattr__(self, "prefix_tokens", shared - shared % self.block_size)
        if not 0 <= self.prefix_tokens < self.prompt_tokens:
            raise ConfigError("--prefix-tokens must be >= 0 and below --prompt-tokens")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("--threads must be >= 1")
        if self.model_size not in MODEL_SIZES:
            raise ConfigError(f"--model-size must be one of {sorted(MODEL_SIZES)}")


def make_requests(config: DemoConfig, vocab_size: int) -> list[dict[str, Any]]:
    """Request 1: random tokens; request 2 (when prefix_tokens > 0): its first prefix_tokens
    tokens, then fresh ones, same length."""
    rng = random.Random(config.seed)
    first = [rng.randrange(vocab_size) for _ in range(config.prompt_tokens)]
    requests = [{"name": "request-1", "token_ids": first, "decode_tokens": config.decode_tokens}]
    if config.prefix_tokens:
        num_new = config.prompt_tokens - config.prefix_tokens
        tail = [rng.randrange(vocab_size) for _ in range(num_new)]
        requests.append({"name": "request-2", "token_ids": first[:config.prefix_tokens] + tail,
                         "decode_tokens": config.decode_tokens,
                         "reference_prefix_tokens": config.prefix_tokens})
    return requests


def _model_fields(config: DemoConfig) -> dict[str, Any]:
    from kvstore.engine.model import ModelSpec

    if config.model_path:
        tag = "local-" + "".join(c if c.isalnum() or c in "._-" else "_"
                                 for c in Path(config.model_path).resolve().name)
        return {"model_path": config.model_path, "tag": tag, "vocab_size": _vocab_of(config)}
    spec = ModelSpec(seed=config.seed, **MODEL_SIZES[config.model_size])
    return {"model_spec": dataclasses.asdict(spec), "tag": spec.tag,
            "vocab_size": spec.vocab_size}


def _vocab_of(config: DemoConfig) -> int:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(config.model_path, local_files_only=True).vocab_size
    except (OSError, ValueError) as exc:
        raise KVStoreError(
            f"--model {config.model_path!r} is not a loadable checkpoint: {exc}") from exc


def run_worker(role: str, job: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    """Run one pd_worker process to completion; its progress lines pass through to stdout."""
    job_path = work_dir / f"{role}-job.json"
    job = {**job, "role": role, "result_path": str(work_dir / f"{role}-result.json")}
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "kvstore.engine.pd_worker", str(job_path)],
                          env=env)
    if proc.returncode != 0:
        raise KVStoreError(f"the {role} process failed (exit status {proc.returncode})")
    return json.loads(Path(job["result_path"]).read_text())


def run_demo(config: DemoConfig, *, echo: Any = print) -> list[dict[str, Any]]:
    """Run the whole demo; returns one row of measurements per request (see ``report``)."""
    from kvstore.engine.cluster import LocalCluster

    fields = _model_fields(config)
    requests = make_requests(config, fields["vocab_size"])
    echo(f"[demo   ] starting master and daemon ({config.dram} DRAM) on 127.0.0.1")
    with LocalCluster(dram=config.dram) as cluster, \
            tempfile.TemporaryDirectory(prefix="kvstore-demo-") as tmp:
        echo(f"[demo   ] cluster up in {cluster.start_s:.1f} s; master at {cluster.address}")
        echo(f"[demo   ] {len(requests)} request(s) of {config.prompt_tokens} tokens; key "
             f"namespace demo/{fields['tag']}; prefill and decode share only the store")
        job = {
            "master": cluster.address, "block_size": config.block_size,
            "quantize": config.quantize, "requests": requests,
            "num_threads": config.num_threads,
            "namespace": {"model": fields["tag"], "prefix": "demo"},
            **{k: fields[k] for k in ("model_spec", "model_path") if k in fields},
        }
        prefill = run_worker("prefill", job, Path(tmp))
        decode = run_worker("decode", job, Path(tmp))
        return [_row(p, d, Path(tmp)) for p, d in zip(prefill["requests"], decode["requests"])]


def _row(prefill: dict[str, Any], decode: dict[str, Any], work_dir: Path) -> dict[str, Any]:
    import torch

    reference = torch.load(work_dir / f"{prefill['name']}-reference-logits.pt")
    first = torch.load(work_dir / f"{prefill['name']}-decode-logits.pt")
    expected, actual = prefill["reference_tokens"], decode["tokens"]
    divergence = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), None)
    # after a first differing token the two continue from different contexts, so agreement
    # is the length of the common prefix, not a count of coincidences after it
    num_equal = len(expected) if divergence is None else divergence
    move_s = prefill["save_s"] + decode["load_s"]
    ttft_s = prefill["prefix_load_s"] + prefill["prefill_s"] + move_s + decode["first_step_s"]
    return {
        **{k: prefill[k] for k in ("name", "num_tokens", "prefix_hit_tokens", "prefill_s",
                                   "save_s", "raw_bytes", "wire_bytes")},
        "load_s": decode["load_s"], "loaded_tokens": decode["loaded_tokens"],
        "first_step_s": decode["first_step_s"], "ttft_s": ttft_s, "move_s": move_s,
        "load_gbps": decode["bytes_read"] / max(decode["load_s"], 1e-9) / 1e9,
        "save_gbps": prefill["bytes_written"] / max(prefill["save_s"], 1e-9) / 1e9,
        "decode_tps": decode["num_decode_steps"] / max(decode["decode_s"], 1e-9),
        "num_equal": num_equal, "num_generated": len(expected), "divergence": divergence,
        "logit_rel_error": float((first - reference).norm() / reference.norm()),
        "logit_max_abs_error": float((first - reference).abs().max()),
        "failed_keys": prefill["failed_keys"] + decode["failed_keys"],
    }


def report(rows: list[dict[str, Any]], config: DemoConfig) -> str:
    """The demo's table: one column per request."""
    from kvstore._units import format_size

    def prefix(row: dict[str, Any]) -> str:
        computed = row["num_tokens"] - row["prefix_hit_tokens"]
        return f"{row['prefix_hit_tokens']} / {computed}"

    def match(row: dict[str, Any]) -> str:
        same = row["num_equal"] == row["num_generated"]
        return f"{'yes' if same else 'no'} ({row['num_equal']}/{row['num_generated']})"

    lines = [
        ("prompt tokens", lambda r: f"{r['num_tokens']}"),
        ("prefill: tokens loaded / computed", prefix),
        ("KV bytes raw", lambda r: format_size(r["raw_bytes"])),
        ("KV bytes on the wire", lambda r: format_size(r["wire_bytes"])),
        ("prefill time", lambda r: f"{r['prefill_s'] * 1e3:.0f} ms"),
        ("save time (prefill side)", lambda r: f"{r['save_s'] * 1e3:.1f} ms"),
        ("load time (decode side)", lambda r: f"{r['load_s'] * 1e3:.1f} ms"),
        ("decode: tokens loaded", lambda r: f"{r['loaded_tokens']}"),
        ("transfer GB/s (save / load)", lambda r: f"{r['save_gbps']:.2f} / {r['load_gbps']:.2f}"),
        ("time to first token", lambda r: f"{r['ttft_s'] * 1e3:.0f} ms"),
        ("KV moving share of TTFT", lambda r: f"{100 * r['move_s'] / r['ttft_s']:.1f} %"),
        ("decode tokens/s", lambda r: f"{r['decode_tps']:.1f}"),
        ("tokens equal single-process", match),
    ]
    if config.quantize:
        lines += [
            ("first-step logit rel. error", lambda r: f"{r['logit_rel_error']:.2e}"),
            ("first-step logit max abs error", lambda r: f"{r['logit_max_abs_error']:.2e}"),
            ("token agreement (common prefix)",
             lambda r: f"{100 * r['num_equal'] / r['num_generated']:.1f} %"),
        ]
    width = max(len(label) for label, _ in lines)
    columns = [[fn(row) for row in rows] for _, fn in lines]
    col_width = max(14, *(len(cell) for cells in columns for cell in cells))
    header = f"{'':{width}}  " + "  ".join(f"{r['name']:>{col_width}}" for r in rows)
    out = [f"kvstore demo: quantize={config.quantize or 'none'}, block size {config.block_size}",
           header, "-" * len(header)]
    for (label, _), cells in zip(lines, columns):
        out.append(f"{label:{width}}  " + "  ".join(f"{c:>{col_width}}" for c in cells))
    return "\n".join(out)


@click.command("demo")
@click.option("--prompt-tokens", default=2048, show_default=True, help="Prompt length.")
@click.option("--decode-tokens", default=64, show_default=True, help="Tokens to generate.")
@click.option("--prefix-tokens", type=int, default=None,
              help="Leading tokens request 2 shares with request 1 (0: no second request; "
                   "default: 1536, or 3/4 of a shorter prompt).")
@click.option("--block-size", default=16, show_default=True, help="Tokens per KV block.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none",
              show_default=True, help="Store KV as INT8 (with fp32 scales).")
@click.option("--model", "model_path", default=None,
              help="Local transformers checkpoint directory (default: a seeded random Llama).")
@click.option("--model-size", type=click.Choice(sorted(MODEL_SIZES)), default="small",
              show_default=True, help="Shape of the random Llama.")
@click.option("--dram", default="2GiB", show_default=True, help="DRAM of the demo daemon.")
@click.option("--seed", default=0, show_default=True, help="Seed of the weights and prompts.")
@click.option("--threads", "num_threads", type=int, default=None,
              help="torch threads in each engine process (default: torch's choice).")
def command(prompt_tokens: int, decode_tokens: int, prefix_tokens: int | None, block_size: int,
            quantize: str, model_path: str | None, model_size: str, dram: str, seed: int,
            num_threads: int | None) -> None:
    """Prefill/decode disaggregation demo on this machine (cluster, prefill, decode, table)."""
    try:
        config = DemoConfig(prompt_tokens, decode_tokens, prefix_tokens, block_size,
                            None if quantize == "none" else quantize, model_path, model_size,
                            dram, seed, num_threads)
        started = time.perf_counter()
        rows = run_demo(config, echo=lambda m: click.echo(m))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("")
    click.echo(report(rows, config))
    click.echo(f"\n(total demo wall time {time.perf_counter() - started:.1f} s; TTFT = prefill "
               "+ save + load + decode-side last-token step, process start-up excluded)")
    if any(row["failed_keys"] for row in rows):
        click.echo("warning: some blocks failed and were recomputed", err=True)
