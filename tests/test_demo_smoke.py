"""`kvstore demo` end to end with tiny settings: real master, daemon, prefill and decode
processes; the table must say the tokens match, and the cluster must be gone afterwards."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

KVSTORE = str(Path(sys.executable).with_name("kvstore"))
TINY = ["--model-size", "tiny", "--prompt-tokens", "72", "--prefix-tokens", "32",
        "--decode-tokens", "6", "--dram", "64MiB"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([KVSTORE, "demo", *args], capture_output=True, text=True, timeout=240)


def _row(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(label))
    return re.split(r"\s{2,}", line[len(label):].strip())


def _assert_cluster_gone(output: str) -> None:
    host, port = re.search(r"master at (\S+):(\d+)", output).groups()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


@pytest.mark.slow
def test_demo_lossless_tokens_match_and_prefix_hit_shows() -> None:
    result = _run(*TINY)
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    for phase in ("[prefill] request-1", "[decode ] request-1", "[prefill] request-2"):
        assert phase in out  # progress is visible per phase
    assert _row(out, "prompt tokens") == ["72", "72"]
    assert _row(out, "tokens equal single-process") == ["yes (6/6)", "yes (6/6)"]
    # request 2 shares 32 tokens (2 blocks of 16): loaded, not computed
    assert _row(out, "prefill: tokens loaded / computed") == ["0 / 72", "32 / 40"]
    assert _row(out, "decode: tokens loaded") == ["64", "64"]
    assert "first-step logit rel. error" not in out
    _assert_cluster_gone(out)


@pytest.mark.slow
def test_demo_int8_with_a_local_checkpoint_reports_logit_error(tmp_path) -> None:
    from kvstore.demo import MODEL_SIZES
    from kvstore.engine.model import ModelSpec, build_model

    build_model(ModelSpec(**MODEL_SIZES["tiny"])).save_pretrained(tmp_path / "ckpt")
    result = _run(*TINY, "--quantize", "int8", "--model", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr + result.stdout
    errors = [float(v) for v in _row(result.stdout, "first-step logit rel. error")]
    assert all(0 < e < 0.05 for e in errors)
    agreement = _row(result.stdout, "token agreement (common prefix)")
    assert all(a.endswith("%") for a in agreement)
    raw, wire = _row(result.stdout, "KV bytes raw"), _row(result.stdout, "KV bytes on the wire")
    assert raw != wire  # INT8 moves fewer bytes
    assert "local-ckpt" in result.stdout  # the checkpoint's tag names the key namespace
    _assert_cluster_gone(result.stdout)


@pytest.mark.parametrize("args", [["--prompt-tokens", "1"], ["--prefix-tokens", "100"],
                                  ["--quantize", "fp4"], ["--model", "/nonexistent/ckpt"]])
def test_demo_rejects_bad_flags(args: list[str]) -> None:
    result = _run("--model-size", "tiny", "--prompt-tokens", "64", *args)
    assert result.returncode != 0
    assert "Error" in result.stderr and "Traceback" not in result.stderr


def test_local_cluster_stops_both_servers_on_error() -> None:
    from kvstore.engine.cluster import LocalCluster

    with pytest.raises(RuntimeError, match="engine failed"):
        with LocalCluster(dram="16MiB") as cluster:
            procs = [cluster.master.proc, cluster.daemon.proc]
            address = cluster.address
            import kvstore

            with kvstore.connect(address) as store:  # the cluster really serves
                store.put("k", b"v")
                assert store.get("k") == b"v"
            raise RuntimeError("engine failed")
    assert all(proc.poll() is not None for proc in procs)
    _assert_cluster_gone(f"master at {address}")
