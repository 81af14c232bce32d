"""`kvstore bench` runs end to end on a cluster of its own and writes what it printed."""

from __future__ import annotations

import json
import subprocess

import pytest
from servers import KVSTORE_BIN


@pytest.mark.slow
def test_bench_cli_writes_a_row_per_case(tmp_path):
    out_path = tmp_path / "transfer.json"
    result = subprocess.run(
        [str(KVSTORE_BIN), "bench", "--levels", "transport", "--transports", "shm,tcp",
         "--sizes", "64KiB,1MiB", "--min-time", "0.03", "--json", str(out_path)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(out_path.read_text())
    cases = {(r["transport"], r["size_bytes"], r["mode"], r["op"]) for r in data["rows"]}
    assert len(cases) == len(data["rows"]) == 2 * 2 * 2 * 2
    assert all(r["gbps"] > 0 for r in data["rows"])
    assert all("p50_us" in r for r in data["rows"] if r["size_bytes"] == 65536
               and r["mode"] == "single")
    assert all(r["memcpy_gbps"] > 0 and r["cpu_s_per_gb"] > 0 for r in data["rows"])
    assert "GB/s" in result.stdout and "%memcpy" in result.stdout


def test_bench_cli_help_lists_options():
    result = subprocess.run([str(KVSTORE_BIN), "bench", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--master", "--transports", "--levels", "--sizes", "--min-time", "--json"):
        assert option in result.stdout
