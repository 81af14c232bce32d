"""``kvstore plan``: does PD disaggregation pay off for this model, workload and link, or is
colocated chunked prefill better? (docs/PLANNING.md: the model and its assumptions.)

Reads the KV shape (``--model CONFIG.json`` or the shape flags), the workload (``--prompt-len``
or ``--requests FILE``, ``--output-len``), the link (``--bandwidth`` or ``--from-bench``) and
the engine's speeds (``--prefill-tps`` and ``--decode-step-ms``, or ``--measure``: the demo's
model timed on this machine). Prints a table, and writes ``--json`` and ``--plot`` when asked.
Bad or missing inputs are usage errors (exit status 2) naming the flag.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import click

from kvstore._errors import InvalidArgumentError
from kvstore._units import format_size
from kvstore.plan.model import DTYPE_BYTES, Engine, Link, ModelShape, crossover_tokens, \
    parse_bandwidth, pd_ratio, request_figures

DEFAULT_PROMPT_LENS = "512,1024,2048,4096,8192,16384"


def _usage(exc: Exception) -> click.UsageError:
    return click.UsageError(str(exc))


def _shape(model_path, num_layers, num_kv_heads, head_dim, dtype, measured) -> ModelShape:
    from kvstore.plan.inputs import shape_from_config

    flags = (num_layers, num_kv_heads, head_dim)
    if measured is not None:
        return measured
    if model_path:
        if any(v is not None for v in flags):
            raise click.UsageError("give --model or --num-layers/--num-kv-heads/--head-dim, "
                                   "not both")
        return shape_from_config(model_path, dtype)
    if any(v is None for v in flags):
        raise click.UsageError("the model: give --model CONFIG.json, or --num-layers, "
                               "--num-kv-heads and --head-dim")
    return ModelShape(num_layers, num_kv_heads, head_dim, dtype or "bfloat16")


def _workload(prompt_len: str, output_len: int, requests_path) -> list[tuple[int, int]]:
    from kvstore.plan.inputs import read_workload

    if requests_path:
        return read_workload(requests_path, output_len)
    try:
        lengths = [int(x) for x in prompt_len.split(",") if x.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{prompt_len!r}: expected comma-separated token counts",
                                 param_hint="--prompt-len") from exc
    if not lengths or any(n <= 0 for n in lengths):
        raise click.BadParameter("lengths must be above 0", param_hint="--prompt-len")
    return [(n, output_len) for n in lengths]


def _row_lengths(workload: list[tuple[int, int]], from_file: bool) -> list[int]:
    """The prompt lengths the table shows: each given one, or a file's p50/p90/p99/max."""
    prompts = sorted(p for p, _ in workload)
    if not from_file:
        return list(dict.fromkeys(p for p, _ in workload))
    picks = [prompts[min(len(prompts) - 1, int(q * len(prompts)))] for q in (0.5, 0.9, 0.99)]
    return sorted(set(picks + [prompts[-1]]))


def format_table(result: dict) -> str:
    m, link, eng = result["model"], result["link"], result["engine"]
    lines = [
        f"model {m['name']}: {m['num_layers']} layers x {m['num_kv_heads']} KV heads x "
        f"{m['head_dim']} x {m['dtype']}; KV bytes per token {m['kv_bytes_per_token']:,} raw, "
        f"{m['kv_bytes_per_token_int8']:,} as INT8 with scales",
        f"link {link['bytes_per_s'] / 1e9:.3g} GB/s ({link['source']}), quantize "
        f"{link['quantize'] or 'none'}; engine: prefill {eng['prefill_tokens_per_s']:,.0f} "
        f"tokens/s, decode step {eng['decode_step_ms']:.3g} ms ({eng['source']}), chunk "
        f"{eng['chunk_tokens']}, decode batch {eng['decode_batch']}",
    ]
    header = (f"{'prompt':>7} {'KV/request':>11} {'transfer ms':>11} {'prefill ms':>10} "
              f"{'1st step ms':>11} {'TTFT PD ms':>10} {'TTFT colo ms':>12} "
              f"{'step colo ms':>12} {'faster':>8}")
    lines += ["", header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(
            f"{r['prompt_tokens']:>7} {format_size(r['kv_bytes_per_request']):>11} "
            f"{r['transfer_ms']:>11.3f} {r['prefill_ms']:>10.1f} {r['first_step_ms']:>11.1f} "
            f"{r['ttft_pd_ms']:>10.1f} "
            f"{r['ttft_colocated_ms']:>12.1f} {r['decode_step_colocated_ms']:>12.2f} "
            f"{'PD' if r['pd_wins'] else 'colo':>8}")
    ratio = result["pd_ratio"]
    lines += ["", f"P:D ratio {ratio['pd_ratio']} (prefill {ratio['prefill_requests_per_s']:.3g} "
              f"req/s per instance, decode {ratio['decode_requests_per_s']:.3g} req/s per "
              f"instance; mean prompt {result['workload']['mean_prompt_tokens']:.0f}, output "
              f"{result['workload']['mean_output_tokens']:.0f})",
              f"verdict: {result['verdict']}"]
    return "\n".join(lines)


def plot_plan(result: dict, shape, engine, link, path: str) -> None:
    """TTFT with PD and colocated against prompt length, the crossover as a dashed line."""
    from kvstore.bench.plot import require_matplotlib

    plt = require_matplotlib()
    longest = max(r["prompt_tokens"] for r in result["rows"])
    crossover = result["crossover_prompt_tokens"]
    top = max(longest, 2 * crossover if crossover else 0, 1024)
    lengths = sorted({max(1, int(top * i / 200)) for i in range(1, 201)})
    figures = [request_figures(n, shape, engine, link) for n in lengths]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    ax.plot(lengths, [f["ttft_pd_ms"] for f in figures], label="TTFT with PD")
    ax.plot(lengths, [f["ttft_colocated_ms"] for f in figures], label="TTFT colocated (chunked)")
    if crossover:
        ax.axvline(crossover, linestyle="--", color="grey",
                   label=f"PD wins from {crossover} tokens")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms")
    ax.set_title(f"kvstore plan: {shape.name}, {link.bytes_per_s / 1e9:.3g} GB/s", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@click.command("plan")
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="A Hugging Face config.json (layers, KV heads, head dim, dtype).")
@click.option("--num-layers", type=int, default=None, help="Instead of --model: layers.")
@click.option("--num-kv-heads", type=int, default=None, help="Instead of --model: KV heads.")
@click.option("--head-dim", type=int, default=None, help="Instead of --model: head dim.")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_BYTES)), default=None,
              help="KV dtype (default: the config's, else bfloat16).")
@click.option("--prompt-len", default=DEFAULT_PROMPT_LENS, show_default=True,
              help="Comma-separated prompt lengths in tokens.")
@click.option("--output-len", type=int, default=256, show_default=True,
              help="Output tokens per request.")
@click.option("--requests", "requests_path", default=None, type=click.Path(dir_okay=False),
              help="A file of request lengths (PROMPT[,OUTPUT] lines or JSON) instead.")
@click.option("--bandwidth", default=None, help="Link speed, e.g. 25GB/s, 200Gb/s.")
@click.option("--from-bench", "bench_path", default=None, type=click.Path(dir_okay=False),
              help="Instead: the link as `kvstore bench transfer --json` measured it.")
@click.option("--bench-transport", default=None,
              help="With --from-bench: the transport's rows (default: the fastest).")
@click.option("--block-size", type=int, default=16, show_default=True,
              help="Tokens per KV block: the decode side loads whole blocks and computes the "
                   "rest of the prompt in its first step (also picks the bench's value size).")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none",
              show_default=True, help="KV travels as INT8 with fp32 scales.")
@click.option("--prefill-tps", type=float, default=None,
              help="Prefill tokens/s of one engine instance.")
@click.option("--decode-step-ms", type=float, default=None,
              help="One decode step of the decode batch, in ms.")
@click.option("--measure", is_flag=True,
              help="Measure both on the demo's model on this machine (needs kvstore[hf]).")
@click.option("--model-size", type=click.Choice(["small", "tiny"]), default="small",
              show_default=True, help="With --measure: the demo model's shape.")
@click.option("--threads", "num_threads", type=click.IntRange(min=1), default=None,
              help="With --measure: torch threads, as `kvstore demo --threads` (default: "
                   "torch's choice).")
@click.option("--chunk-size", type=int, default=512, show_default=True,
              help="Tokens per chunk of colocated chunked prefill.")
@click.option("--decode-batch", type=int, default=16, show_default=True,
              help="Requests per decode step (for the P:D ratio).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write every figure here.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: TTFT with PD and colocated by prompt length (kvstore[plot]).")
def command(model_path, num_layers, num_kv_heads, head_dim, dtype, prompt_len, output_len,
            requests_path, bandwidth, bench_path, bench_transport, block_size, quantize,
            prefill_tps, decode_step_ms, measure, model_size, num_threads, chunk_size,
            decode_batch, json_path, plot_path):
    """Is PD worth it here? TTFT with PD beside colocated chunked prefill, P:D, verdict."""
    from kvstore.plan.inputs import bandwidth_from_bench

    if plot_path is not None:
        from kvstore.bench.plot import require_matplotlib
        require_matplotlib()
    if (bandwidth is None) == (bench_path is None):
        raise click.UsageError("the link: give exactly one of --bandwidth and --from-bench")
    if measure == (prefill_tps is not None or decode_step_ms is not None) or (
            not measure and (prefill_tps is None or decode_step_ms is None)):
        raise click.UsageError("the engine: give --prefill-tps and --decode-step-ms, or "
                               "--measure")
    if num_threads is not None and not measure:
        raise click.UsageError("--threads sets the threads of --measure: give --measure too")
    if measure and (model_path or any(v is not None for v in (num_layers, num_kv_heads,
                                                               head_dim))):
        raise click.UsageError("--measure times the demo's model: it takes no --model or "
                               "shape flags")
    try:
        if output_len <= 0 or block_size <= 0:
            raise InvalidArgumentError("--output-len and --block-size must be above 0")
        workload = _workload(prompt_len, output_len, requests_path)
        mean_prompt = statistics.fmean(p for p, _ in workload)
        mean_output = statistics.fmean(o for _, o in workload)
        measured = speeds_source = None
        if measure:
            from kvstore.plan.measure import measure_demo_model

            click.echo(f"measuring the demo's {model_size} model at {round(mean_prompt)} "
                       "prompt tokens ...", err=True)
            measured, prefill_tps, step_s = measure_demo_model(
                round(mean_prompt), model_size, block_size, num_threads=num_threads)
            decode_step_ms = step_s * 1e3
            speeds_source = f"measured on this machine, demo {model_size} model"
        shape = _shape(model_path, num_layers, num_kv_heads, head_dim, dtype, measured)
        engine = Engine(prefill_tps, decode_step_ms / 1e3, chunk_size, decode_batch, block_size)
        if bench_path:
            bytes_per_s, link_source = bandwidth_from_bench(
                bench_path, block_size * shape.kv_bytes_per_token, bench_transport)
        else:
            bytes_per_s, link_source = parse_bandwidth(bandwidth), f"--bandwidth {bandwidth}"
        link = Link(bytes_per_s, None if quantize == "none" else quantize)
        rows = [request_figures(n, shape, engine, link)
                for n in _row_lengths(workload, requests_path is not None)]
        ratio = pd_ratio(mean_prompt, mean_output, shape, engine, link)
        crossover = crossover_tokens(shape, engine, link)
    except InvalidArgumentError as exc:
        raise _usage(exc) from exc
    verdict = (f"PD's TTFT beats colocated chunked prefill for prompts of {crossover} tokens "
               "and longer" if crossover else
               "colocated chunked prefill has the lower TTFT at every prompt length: the link "
               "moves a chunk's KV slower than a decode step")
    result = {
        "model": {"name": shape.name, "num_layers": shape.num_layers,
                  "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                  "dtype": shape.dtype, "kv_bytes_per_token": shape.kv_bytes_per_token,
                  "kv_bytes_per_token_int8": shape.kv_bytes_per_token_int8},
        "link": {"bytes_per_s": link.bytes_per_s, "quantize": link.quantize,
                 "source": link_source},
        "engine": {"prefill_tokens_per_s": engine.prefill_tokens_per_s,
                   "decode_step_ms": engine.decode_step_s * 1e3,
                   "chunk_tokens": engine.chunk_tokens, "decode_batch": engine.decode_batch,
                   "block_tokens": engine.block_tokens,
                   "source": speeds_source or "--prefill-tps/--decode-step-ms"},
        "workload": {"num_requests": len(workload), "mean_prompt_tokens": mean_prompt,
                     "mean_output_tokens": mean_output},
        "rows": rows, "pd_ratio": ratio, "crossover_prompt_tokens": crossover,
        "verdict": verdict,
    }
    click.echo(format_table(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {json_path}")
    if plot_path:
        plot_plan(result, shape, engine, link, plot_path)
        click.echo(f"wrote {plot_path}")
