"""`kvstore plan`: the arithmetic against known figures (Llama-2-7B's KV bytes per token,
1,000 tokens at 200 Gb/s in about 21 ms), the crossover against a brute-force scan, the
inputs (config.json, request files) and their errors, the command's table/JSON/plot, and
--measure on the demo's tiny model."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from servers import KVSTORE_BIN
from test_bench_cli import PNG_MAGIC, without_matplotlib

from kvstore._errors import InvalidArgumentError
from kvstore.plan.inputs import read_workload, shape_from_config
from kvstore.plan.model import Engine, Link, ModelShape, crossover_tokens, parse_bandwidth, \
    pd_ratio, request_figures, transfer_s

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
             "torch_dtype": "bfloat16", "intermediate_size": 11008}
LLAMA3_8B = {**LLAMA2_7B, "num_key_value_heads": 8, "intermediate_size": 14336}


def run_plan(*args, env=None):
    return subprocess.run([str(KVSTORE_BIN), "plan", *args], capture_output=True, text=True,
                          timeout=180, env=env)


@pytest.fixture
def llama2_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    return str(path)


def test_llama2_7b_kv_bytes_and_transfer_time(llama2_config):
    shape = shape_from_config(llama2_config)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.dtype) == (
        32, 32, 128, "bfloat16")
    assert shape.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524_288
    assert shape.kv_bytes_per_token_int8 == 2 * 32 * 32 * (128 + 4)  # int8 + one fp32 scale
    link = Link(parse_bandwidth("200Gb/s"))
    assert transfer_s(1000, shape, link) * 1e3 == pytest.approx(20.97, abs=0.01)  # "about 21"
    figures = request_figures(1000, shape, Engine(10_000, 0.03), link)
    assert figures["kv_bytes_per_request"] == 524_288_000
    # the decode side loads the 62 whole blocks of 16 that leave a token: 992 tokens move
    assert figures["kv_tokens_moved"] == 992
    assert figures["transfer_ms"] == pytest.approx(20.97 * 992 / 1000, abs=0.01)
    int8 = request_figures(1000, shape, Engine(10_000, 0.03), Link(link.bytes_per_s, "int8"))
    assert int8["transfer_ms"] == pytest.approx(20.97 * 992 / 1000 * 132 / 256, abs=0.01)


@pytest.mark.parametrize("prompt, moved, tail", [(1, 0, 1), (16, 0, 16), (17, 16, 1),
                                                 (2048, 2032, 16), (2049, 2048, 1)])
def test_the_decode_side_computes_the_prompt_after_its_whole_blocks(prompt, moved, tail):
    # as kvstore demo and the connectors do: whole blocks load, never the last token; the
    # first step is one forward of the rest: a decode step plus its extra tokens' prefill
    engine = Engine(prefill_tokens_per_s=1000, decode_step_s=0.05, block_tokens=16)
    figures = request_figures(prompt, ModelShape(2, 2, 64), engine, Link(1e9))
    assert figures["kv_tokens_moved"] == moved
    assert figures["first_step_ms"] == pytest.approx(50 + (tail - 1) * 1.0)
    assert figures["ttft_pd_ms"] == pytest.approx(
        prompt + figures["transfer_ms"] + figures["first_step_ms"])


def test_gqa_config_and_overrides(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"text_config": LLAMA3_8B}))
    assert shape_from_config(str(path)).kv_bytes_per_token == 128 * 1024  # OPERATIONS.md
    assert shape_from_config(str(path), dtype="float32").kv_bytes_per_token == 256 * 1024
    path.write_text(json.dumps({**LLAMA3_8B, "head_dim": 64}))
    assert shape_from_config(str(path)).head_dim == 64


@pytest.mark.parametrize("text, bytes_per_s", [
    ("25GB/s", 25e9), ("200Gb/s", 25e9), ("12.5GiB/s", 12.5 * 2**30), ("100Gbps", 12.5e9),
    ("3e9", 3e9), ("800MB/s", 8e8)])
def test_parse_bandwidth(text, bytes_per_s):
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("text", ["fast", "0GB/s", "-1GB/s", "25 parsecs", ""])
def test_parse_bandwidth_refuses_nonsense(text):
    with pytest.raises(InvalidArgumentError):
        parse_bandwidth(text)


@pytest.mark.parametrize("step_ms, chunk, gbps, block, tps", [
    (30, 512, 25, 16, 8000), (5, 256, 10, 16, 8000), (12, 2048, 100, 16, 8000),
    (20, 512, 5, 16, 8000), (20, 512, 5, 64, 500), (8, 100, 3, 48, 2000), (2, 8, 1, 16, 300)])
def test_crossover_matches_a_brute_force_scan(step_ms, chunk, gbps, block, tps):
    shape = ModelShape(32, 8, 128)
    engine, link = Engine(tps, step_ms / 1e3, chunk, block_tokens=block), Link(gbps * 1e9)
    crossover = crossover_tokens(shape, engine, link)
    assert crossover is not None
    wins = [request_figures(n, shape, engine, link)["pd_wins"]
            for n in range(1, 4 * crossover + 4 * chunk)]
    assert all(wins[crossover - 1:])  # every length from the crossover on
    assert not wins[crossover - 2]    # and not the one before it


def test_a_slow_link_never_wins():
    shape, engine = ModelShape(32, 32, 128), Engine(8000, 0.010, 512)
    link = Link(parse_bandwidth("10Gb/s"))  # 512 tokens move in 215 ms >> a 10 ms step
    assert crossover_tokens(shape, engine, link) is None
    assert not any(request_figures(n, shape, engine, link)["pd_wins"]
                   for n in (100, 1000, 10_000, 100_000))


def test_pd_ratio_balances_throughputs():
    shape = ModelShape(32, 8, 128)
    engine = Engine(prefill_tokens_per_s=10_000, decode_step_s=0.02, decode_batch=32)
    ratio = pd_ratio(2000, 200, shape, engine, Link(100e9))
    assert ratio["prefill_requests_per_s"] == pytest.approx(5.0)          # 10k / 2k
    assert ratio["decode_requests_per_s"] == pytest.approx(32 / (200 * 0.02))  # 8
    assert ratio["prefill_per_decode"] == pytest.approx(1.6)
    assert ratio["pd_ratio"] == "1.6:1"
    slow = pd_ratio(2000, 200, shape, engine, Link(1e8))  # the link caps prefill's rate
    assert slow["prefill_requests_per_s"] == pytest.approx(1e8 / (2000 * 131072))


def test_colocated_decode_steps_carry_the_chunk():
    figures = request_figures(1000, ModelShape(2, 2, 64), Engine(1000, 0.01, 256), Link(1e9))
    assert figures["num_chunks"] == 4
    assert figures["ttft_colocated_ms"] == pytest.approx(1000 + 4 * 10)
    assert figures["decode_step_colocated_ms"] == pytest.approx(10 + 256)


def test_read_workload_formats(tmp_path):
    text = tmp_path / "r.txt"
    text.write_text("# prompt, output\n100, 10\n200\n\n300 30\n")
    assert read_workload(str(text), 7) == [(100, 10), (200, 7), (300, 30)]
    js = tmp_path / "r.json"
    js.write_text(json.dumps([{"prompt_len": 5, "output_len": 2}, 9, [4, 1]]))
    assert read_workload(str(js), 3) == [(5, 2), (9, 3), (4, 1)]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text('{"prompt_len": 8}\n{"prompt_len": 9, "output_len": 1}\n')
    assert read_workload(str(jsonl), 3) == [(8, 3), (9, 1)]
    for bad in ("abc\n", "0, 5\n", "", "{bad json\n"):
        text.write_text(bad)
        with pytest.raises(InvalidArgumentError, match="--requests"):
            read_workload(str(text), 3)


def test_bad_model_configs(tmp_path):
    path = tmp_path / "config.json"
    for content, message in ((json.dumps({"kv_lora_rank": 512, **LLAMA2_7B}), "MLA"),
                             (json.dumps({"hidden_size": 8}), "missing or bad field"),
                             ("not json", "not JSON"),
                             (json.dumps({**LLAMA2_7B, "torch_dtype": "float64"}), "unknown")):
        path.write_text(content)
        with pytest.raises(InvalidArgumentError, match=message):
            shape_from_config(str(path))
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        shape_from_config(str(tmp_path / "missing.json"))


def test_plan_command_table_json_and_plot(tmp_path, llama2_config):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    result = run_plan("--model", llama2_config, "--bandwidth", "200Gb/s", "--prompt-len",
                      "1000,8000", "--output-len", "200", "--prefill-tps", "10000",
                      "--decode-step-ms", "30", "--json", str(out), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["model"]["kv_bytes_per_token"] == 524_288
    assert [r["prompt_tokens"] for r in data["rows"]] == [1000, 8000]
    row = data["rows"][0]
    assert row["kv_bytes_per_token"] == 524_288  # 992 of the 1,000 tokens' KV moves:
    assert row["transfer_ms"] == pytest.approx(20.97 * 992 / 1000, abs=0.01)
    assert data["engine"]["block_tokens"] == 16 and "1st step ms" in result.stdout
    assert data["crossover_prompt_tokens"] == 513
    assert "513 tokens" in data["verdict"] and "513 tokens" in result.stdout
    assert data["pd_ratio"]["pd_ratio"] in result.stdout
    assert "TTFT PD ms" in result.stdout and "524,288 raw" in result.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plan_with_a_requests_file_shows_percentiles(tmp_path):
    requests = tmp_path / "requests.txt"
    requests.write_text("".join(f"{n}, 100\n" for n in range(100, 10_100, 100)))
    out = tmp_path / "plan.json"
    result = run_plan("--num-layers", "32", "--num-kv-heads", "8", "--head-dim", "128",
                      "--requests", str(requests), "--bandwidth", "25GB/s", "--quantize",
                      "int8", "--prefill-tps", "5000", "--decode-step-ms", "20", "--json",
                      str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["workload"] == {"num_requests": 100, "mean_prompt_tokens": 5050.0,
                                "mean_output_tokens": 100.0}
    assert [r["prompt_tokens"] for r in data["rows"]] == [5100, 9100, 10000]
    assert data["rows"][0]["kv_bytes_per_request"] == 5100 * 2 * 32 * 8 * 132
    assert data["link"]["quantize"] == "int8"


@pytest.mark.parametrize("args, message", [
    (["--prefill-tps", "1", "--decode-step-ms", "1", "--num-layers", "2", "--num-kv-heads",
      "2", "--head-dim", "8"], "exactly one of --bandwidth and --from-bench"),
    (["--bandwidth", "1GB/s", "--from-bench", "x.json", "--prefill-tps", "1",
      "--decode-step-ms", "1", "--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "8"],
     "exactly one of"),
    (["--bandwidth", "fast", "--prefill-tps", "1", "--decode-step-ms", "1", "--num-layers",
      "2", "--num-kv-heads", "2", "--head-dim", "8"], "bandwidth 'fast'"),
    (["--bandwidth", "1GB/s", "--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "8"],
     "--prefill-tps and --decode-step-ms, or --measure"),
    (["--bandwidth", "1GB/s", "--prefill-tps", "1", "--decode-step-ms", "1"], "the model"),
    (["--bandwidth", "1GB/s", "--prefill-tps", "1", "--decode-step-ms", "1", "--num-layers",
      "0", "--num-kv-heads", "2", "--head-dim", "8"], "num_layers must be a positive"),
    (["--bandwidth", "1GB/s", "--prefill-tps", "-5", "--decode-step-ms", "1", "--num-layers",
      "2", "--num-kv-heads", "2", "--head-dim", "8"], "prefill_tokens_per_s must be above 0"),
    (["--bandwidth", "1GB/s", "--prefill-tps", "1", "--decode-step-ms", "1", "--num-layers",
      "2", "--num-kv-heads", "2", "--head-dim", "8", "--prompt-len", "0"], "--prompt-len"),
    (["--bandwidth", "1GB/s", "--measure", "--num-layers", "2", "--num-kv-heads", "2",
      "--head-dim", "8"], "takes no --model"),
    (["--from-bench", "/nonexistent.json", "--prefill-tps", "1", "--decode-step-ms", "1",
      "--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "8"], "cannot read"),
    (["--bandwidth", "1GB/s", "--prefill-tps", "1", "--decode-step-ms", "1", "--num-layers",
      "2", "--num-kv-heads", "2", "--head-dim", "8", "--threads", "1"], "give --measure too"),
    (["--bandwidth", "1GB/s", "--measure", "--threads", "0"], "--threads"),
])
def test_plan_bad_arguments_are_usage_errors(args, message):
    result = run_plan(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_plan_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    result = run_plan("--num-layers", "2", "--num-kv-heads", "2", "--head-dim", "8",
                      "--bandwidth", "1GB/s", "--prefill-tps", "1", "--decode-step-ms", "1",
                      "--plot", str(tmp_path / "p.png"), env=without_matplotlib(tmp_path))
    assert result.returncode == 2 and "pip install 'kvstore[plot]'" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_plan_arithmetic_needs_no_torch():
    code = ("import sys; import kvstore.plan.model, kvstore.plan.inputs, kvstore.plan.cli; "
            "print('torch' in sys.modules)")
    result = subprocess.run([str(KVSTORE_BIN.with_name("python")), "-c", code],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.slow
def test_plan_measure_times_the_demo_model(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "plan.json"
    result = run_plan("--measure", "--model-size", "tiny", "--prompt-len", "128",
                      "--bandwidth", "5GB/s", "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    # the tiny demo model: 2 layers x 2 KV heads x 32 head dim in fp32
    assert data["model"]["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4
    assert data["engine"]["source"].startswith("measured on this machine")
    assert data["engine"]["prefill_tokens_per_s"] > 0 and data["engine"]["decode_step_ms"] > 0
    row = data["rows"][0]
    assert row["prefill_ms"] == pytest.approx(128 / data["engine"]["prefill_tokens_per_s"] * 1e3)
    assert math.isfinite(row["ttft_pd_ms"])
    # 128 tokens: 7 blocks of 16 load, the decode side computes the last 16 in its first step
    assert row["kv_tokens_moved"] == 112
    assert row["first_step_ms"] == pytest.approx(
        data["engine"]["decode_step_ms"] + 15 / data["engine"]["prefill_tokens_per_s"] * 1e3)


@pytest.mark.parametrize("prefix, target", [
    ("bench transfer", "kvstore.bench.transfer_cli:command"),
    ("bench master", "kvstore.bench.master:command"),
    ("bench kernels", "kvstore.bench.kernels:command"),
    ("plan", "kvstore.plan.cli:command")])
def test_every_flag_is_in_operations_md(prefix, target):
    import importlib
    from pathlib import Path

    module_name, attribute = target.split(":")
    command = getattr(importlib.import_module(module_name), attribute)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md").read_text()
    rows = [line for line in docs.splitlines() if line.startswith(f"| `{prefix} ")]
    flags = [opt for param in command.params for opt in param.opts if opt.startswith("--")]
    assert flags
    for flag in flags:
        assert any(f"{flag}`" in row or f"{flag} " in row for row in rows), flag
