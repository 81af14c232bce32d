"""``kvstore demo``: the command line of ``demo.run`` (flags map 1:1 to ``DemoConfig``).

Before anything starts it checks that the demo's model library, transformers, is installed: if
not, it exits with status 1 and a one-line error naming the install command, and no server or
engine process has been started.
"""

from __future__ import annotations

import importlib.util
import time

import click

from kvstore._errors import KVStoreError
from kvstore.demo.report import report
from kvstore.demo.run import MODEL_SIZES, DemoConfig, run_demo

INSTALL_HINT = "pip install 'kvstore[hf]'"


def require_transformers() -> None:
    """Raise click.ClickException (exit status 1) when transformers cannot be imported."""
    # NOTE: find_spec, not an import: it answers without loading transformers in a process
    # that never runs the model (the engine processes import it).
    if importlib.util.find_spec("transformers") is None:
        raise click.ClickException(
            f"kvstore demo needs transformers, which is not installed: {INSTALL_HINT}")


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
    require_transformers()
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
