"""One run of the PD demo, end to end (``kvstore demo`` is its command line, ``demo.cli``).

1. Starts a cluster: ``kvstore master`` and ``kvstore daemon`` processes on loopback.
2. Runs a prefill process, then a decode process (``python -m kvstore.demo.pd_worker``);
   they share nothing but the store and receive only the requests' token ids and the key
   namespace. Request 1 is a random prompt; request 2 shares its first ``--prefix-tokens``
   tokens, so its prefill finds them in the store (a prefix hit) and computes only the rest.
3. Returns one row of measurements per request (``demo.report`` prints them as a table):
   sizes, times, bandwidth, time to first token, and whether the decode side's tokens equal
   the single-process generation of the same prompt.

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
from pathlib import Path
from typing import Any

from kvstore._errors import ConfigError, KVStoreError

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
    from kvstore.demo.model import ModelSpec

    if config.model_path:
        tag = "local-" + "".join(c if c.isalnum() or c in "._-" else "_"
                                 for c in Path(config.model_path).resolve().name)
        return {"model_path": config.model_path, "tag": tag, "vocab_size": _vocab_of(config)}
    spec = ModelSpec(seed=config.seed, **MODEL_SIZES[config.model_size])
    return {"model_spec": dataclasses.asdict(spec), "tag": spec.tag,
            "vocab_size": spec.vocab_size}


def _vocab_of(config: DemoConfig) -> int:
    """The checkpoint's vocabulary size, from its config.json when that names one (the
    common case), else through transformers' AutoConfig. Raises KVStoreError when the path
    holds no loadable checkpoint.

    NOTE: why not AutoConfig always: importing transformers costs this process about 6 s of
    CPU (torch with it), before any worker starts; a loaded machine stretched that to a
    minute and took the int8 smoke test near its timeout. The workers load the model
    (and check the checkpoint fully) anyway."""
    try:
        fields = json.loads((Path(config.model_path) / "config.json").read_text())
    except (OSError, ValueError):
        fields = None
    if isinstance(fields, dict) and isinstance(fields.get("model_type"), str):
        vocab_size = fields.get("vocab_size")
        if isinstance(vocab_size, int) and vocab_size > 0:
            return vocab_size
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
    proc = subprocess.run([sys.executable, "-m", "kvstore.demo.pd_worker", str(job_path)],
                          env=env)
    if proc.returncode != 0:
        raise KVStoreError(f"the {role} process failed (exit status {proc.returncode})")
    return json.loads(Path(job["result_path"]).read_text())


def run_demo(config: DemoConfig, *, echo: Any = print) -> list[dict[str, Any]]:
    """Run the whole demo; returns one row of measurements per request (see ``demo.report``)."""
    from kvstore.demo.cluster import LocalCluster

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
        "save_copy_gbps": prefill["copy_gbps"], "load_copy_gbps": decode["copy_gbps"],
        "decode_tps": decode["num_decode_steps"] / max(decode["decode_s"], 1e-9),
        "num_equal": num_equal, "num_generated": len(expected), "divergence": divergence,
        "logit_rel_error": float((first - reference).norm() / reference.norm()),
        "logit_max_abs_error": float((first - reference).abs().max()),
        "failed_keys": prefill["failed_keys"] + decode["failed_keys"],
    }
