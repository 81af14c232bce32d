"""`kvstore demo` end to end with tiny settings: real master, daemon, prefill and decode
processes; the table must say the tokens match, and the cluster must be gone afterwards."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

KVSTORE = str(Path(sys.executable).with_name("kvstore"))
# NOTE: one torch thread: a 2-layer model gains nothing from a second, and on a loaded
# machine each op then waits for the other thread's time slice (prefill of 72 tokens 2.3 s
# against 0.15 s at load 19)
TINY = ["--model-size", "tiny", "--prompt-tokens", "72", "--prefix-tokens", "32",
        "--decode-tokens", "6", "--dram", "64MiB", "--threads", "1"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([KVSTORE, "demo", *args], capture_output=True, text=True, timeout=240,
                          env=env)


def _assert_no_deprecation_warnings(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    for word in ("FutureWarning", "DeprecationWarning", "deprecated"):
        assert word not in output, output


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
    # each side's GB/s beside a memcpy of the same bytes in its process: positive shares
    # for request 1 (request 2's load moves bytes too; its save may find every block stored)
    shares = [[float(x) for x in cell.split(" / ")]
              for cell in _row(out, "x of a memcpy of the bytes (save / load)")]
    assert len(shares) == 2 and shares[0][0] > 0 and shares[0][1] > 0 and shares[1][1] > 0
    assert "first-step logit rel. error" not in out
    _assert_no_deprecation_warnings(result)
    _assert_cluster_gone(out)


@pytest.mark.slow
def test_demo_int8_with_a_local_checkpoint_reports_logit_error(tmp_path) -> None:
    from kvstore.demo.model import ModelSpec, build_model
    from kvstore.demo.run import MODEL_SIZES

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
    _assert_no_deprecation_warnings(result)
    _assert_cluster_gone(result.stdout)


def _pids_with_env(marker: str) -> list[int]:
    """Processes of any kind whose environment holds ``marker`` (what the demo started)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return pids


def test_demo_without_transformers_says_how_to_install_it(tmp_path) -> None:
    # NOTE: a None entry in sys.modules makes `import transformers` raise ImportError, exactly
    # as when the package is missing; sitecustomize sets it in every Python the demo starts.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    marker = f"KVSTORE_DEMO_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH"))
                                         if p)}
    probe = subprocess.run([sys.executable, "-c", "import transformers"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr  # the setup hides it
    result = _run(*TINY, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "Error: kvstore demo needs transformers, which is not installed: "
        "pip install 'kvstore[hf]'"]
    assert "starting master" not in result.stdout  # it stopped before any server
    assert _pids_with_env(marker) == []


@pytest.mark.parametrize("args", [["--prompt-tokens", "1"], ["--prefix-tokens", "100"],
                                  ["--quantize", "fp4"], ["--model", "/nonexistent/ckpt"]])
def test_demo_rejects_bad_flags(args: list[str]) -> None:
    result = _run("--model-size", "tiny", "--prompt-tokens", "64", *args)
    assert result.returncode != 0
    assert "Error" in result.stderr and "Traceback" not in result.stderr


def test_local_cluster_stops_both_servers_on_error() -> None:
    from kvstore.demo.cluster import LocalCluster

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
