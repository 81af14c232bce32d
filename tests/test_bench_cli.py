"""`kvstore bench` runs end to end on a cluster of its own and writes what it printed; its
measuring primitives (kvstore.bench.measure) and batch sizing (kvstore.bench.transfer)."""

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
    rows = data["rows"]
    assert all(r["gbps"] > 0 and r["memcpy_gbps"] > 0 and r["cpu_s_per_gb"] > 0 for r in rows)
    assert all((r["batch_items"] == 1) == (r["mode"] == "single") for r in rows)
    # latency percentiles where the bench promises them (single 64 KiB calls), ordered
    singles = [r for r in rows if r["size_bytes"] == 65536 and r["mode"] == "single"]
    assert singles and all(0 < r["p50_us"] <= r["p99_us"] for r in singles)
    # the loopback ceiling is recorded for every size, and the load the figures ran under
    assert set(data["loopback_gbps"]) == {"65536", "1048576"} and data["loadavg_1m"] >= 0
    # what it printed is what it wrote: one table line per JSON row, same figures
    printed = [line.split() for line in result.stdout.splitlines()
               if line.startswith("transport ")]
    assert len(printed) == len(rows)
    for fields, row in zip(printed, rows):
        assert fields[1] == row["transport"] and fields[5] == row["batch_items"].__str__()
        assert fields[6] == row["op"] and float(fields[7]) == pytest.approx(row["gbps"], abs=0.006)
        assert float(fields[8]) == pytest.approx(row["memcpy_gbps"], abs=0.006)
        assert fields[9] == f"{100 * row['gbps'] / row['memcpy_gbps']:.0f}%"


def test_bench_cli_help_lists_options():
    result = subprocess.run([str(KVSTORE_BIN), "bench", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--master", "--transports", "--levels", "--sizes", "--min-time", "--json"):
        assert option in result.stdout


def test_measure_primitives_report_what_they_timed():
    import time

    from kvstore.bench.measure import latencies_us, make_cpu_probe, rate, rate_beside_memcpy

    def sleep_1ms():
        time.sleep(0.001)

    gbps = rate(sleep_1ms, 1_000_000, min_time_s=0.03)
    assert 0 < gbps < 1.0  # 1 MB per >= 1 ms is at most 1 GB/s
    p50_us, p99_us = latencies_us(sleep_1ms, 20)
    assert 1000 <= p50_us <= p99_us
    probe = make_cpu_probe([])
    fn_gbps, memcpy_gbps, cpu_s_per_gb = rate_beside_memcpy(sleep_1ms, 1_000_000, 0.03, probe)
    assert 0 < fn_gbps < 1.0 < memcpy_gbps  # a memcpy of 1 MB takes far less than 1 ms
    assert 0 <= cpu_s_per_gb < 0.5  # sleeping 1 ms per MB uses far less than 0.5 ms of CPU


def test_batches_move_about_64_mib_in_at_most_128_items():
    from kvstore.bench.transfer import batch_items

    assert batch_items(64 * 1024) == 128
    assert batch_items(1024 * 1024) == 64
    assert batch_items(256 * 1024 * 1024) == 1
