"""`kvstore bench` end to end on a cluster of its own (transfer, master, kernels; tiny sizes),
its bad arguments, the byte check that aborts a run, its plot with and without matplotlib,
and its measuring primitives (kvstore.bench.measure) and batch sizing (kvstore.bench.transfer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from servers import KVSTORE_BIN

from kvstore.bench.report import link_ceiling

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_kvstore(*args, env=None, timeout=180):
    return subprocess.run([str(KVSTORE_BIN), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def without_matplotlib(tmp_path) -> dict:
    """An environment in which `import matplotlib` fails (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "nompl"
    site.mkdir()
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["matplotlib"] = None\n')
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.slow
def test_transfer_writes_every_figure_table_and_plot(tmp_path):
    out_path, png_path = tmp_path / "transfer.json", tmp_path / "transfer.png"
    result = run_kvstore("bench", "transfer", "--transports", "shm,tcp", "--sizes", "64KiB,1MiB",
                         "--duration", "0.02", "--dram", "512MiB", "--json", str(out_path), "--plot", str(png_path))
    assert result.returncode == 0, result.stderr
    data = json.loads(out_path.read_text())
    cases = {(r["level"], r["transport"], r["size_bytes"], r["mode"], r["op"])
             for r in data["rows"]}
    assert len(cases) == len(data["rows"]) == 2 * 2 * 2 * 2 * 2
    for row in data["rows"]:
        assert row["gbps"] > 0 and row["memcpy_gbps"] > 0 and row["cpu_s_per_gb"] > 0
        assert 0 < row["p50_us"] <= row["p90_us"] <= row["p99_us"]
        assert row["batch_items"] == (1 if row["mode"] == "single" else
                                      {65536: 128, 1048576: 64}[row["size_bytes"]])
    assert set(data["loopback_gbps"]) == {"65536", "1048576"}
    assert data["command"][-4:] == ["--json", str(out_path), "--plot", str(png_path)]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["versions"]["numpy"]
    assert data["interrupted"] is False and len(data["loadavg_at_start"]) == 3
    assert "%memcpy" in result.stdout and "%link" in result.stdout
    assert "p90 us" in result.stdout and "load average" in result.stdout
    assert png_path.read_bytes()[:8] == PNG_MAGIC

    # kvstore plan uses what the bench measured as the link
    plan = run_kvstore("plan", "--from-bench", str(out_path), "--num-layers", "8",
                       "--num-kv-heads", "4", "--head-dim", "64", "--dtype", "float32",
                       "--prefill-tps", "2000", "--decode-step-ms", "20", "--json",
                       str(tmp_path / "plan.json"))
    assert plan.returncode == 0, plan.stderr
    link = json.loads((tmp_path / "plan.json").read_text())["link"]
    # 16 tokens x 16 KiB = 256 KiB blocks: the nearest measured size is 64 KiB
    used = [r for r in data["rows"] if r["level"] == "client" and r["mode"] == "batch"
            and r["size_bytes"] == 65536]
    best = max(1 / (1 / p["gbps"] + 1 / g["gbps"]) for p in used for g in used
               if p["transport"] == g["transport"] and p["op"] == "put" and g["op"] == "get")
    assert link["bytes_per_s"] == pytest.approx(best * 1e9)
    assert "client" in link["source"] and "65536 B" in link["source"]


@pytest.mark.slow
def test_nixl_rows_stand_beside_raw_nixl(tmp_path):
    from kvstore.transport import nixl_installed

    if not nixl_installed():
        pytest.skip("NIXL is not installed (make install puts it in .venv: requirements-nixl.txt)")
    out_path = tmp_path / "transfer.json"
    result = run_kvstore("bench", "transfer", "--transports", "nixl", "--sizes", "64KiB,256KiB",
                         "--batch", "4", "--duration", "0.02", "--dram", "256MiB", "--json",
                         str(out_path))
    assert result.returncode == 0, result.stderr
    data = json.loads(out_path.read_text())
    # the bench's daemon runs with --nixl; raw NIXL WRITE/READ per size is the link ceiling,
    # of one value per transfer for single rows and of the whole batch for batch rows
    assert set(data["raw_nixl_gbps"]) == {"65536", "262144"}
    assert all(v["put"] > 0 and v["get"] > 0 and v["put_batch"] > 0 and v["get_batch"] > 0
               and v["items"] == 4 for v in data["raw_nixl_gbps"].values())
    assert len(data["rows"]) == 16 and {r["transport"] for r in data["rows"]} == {"nixl"}
    # every row's link ceiling is raw NIXL of its pattern measured in rounds beside its own;
    # without it (a row from elsewhere), the figure of the same op and mode measured up front
    raw_by_size = {int(k): v for k, v in data["raw_nixl_gbps"].items()}
    for row in data["rows"]:
        assert row["link_gbps"] > 0
        assert link_ceiling(row, {}, raw_by_size) == row["link_gbps"]
        raw = raw_by_size[row["size_bytes"]]
        up_front = raw[f"{row['op']}_batch"] if row["mode"] == "batch" else raw[row["op"]]
        del row["link_gbps"]
        assert link_ceiling(row, {}, raw_by_size) == up_front
    nixl_lines = [line for line in result.stdout.splitlines() if " nixl " in line]
    assert len(nixl_lines) == 16 and all(line.count("%") == 2 for line in nixl_lines)


@pytest.mark.slow
def test_ssd_rows_stand_beside_the_disk(tmp_path):
    out_path, ssd_dir = tmp_path / "transfer.json", tmp_path / "ssd"
    result = run_kvstore("bench", "transfer", "--levels", "client", "--transports", "shm",
                         "--sizes", "64KiB,256KiB", "--batch", "4", "--duration", "0.02",
                         "--dram", "256MiB", "--ssd", str(ssd_dir), "--json", str(out_path))
    assert result.returncode == 0, result.stderr
    data = json.loads(out_path.read_text())
    ssd_rows = [r for r in data["rows"] if r["level"] == "ssd"]
    assert len(ssd_rows) == 8 and {r["transport"] for r in ssd_rows} == {"tcp"}
    assert set(data["disk_gbps"]) == {"65536", "262144"} and data["disk_io"] in (
        "O_DIRECT", "buffered")
    assert all(v["put"] > 0 and v["get"] > 0 for v in data["disk_gbps"].values())
    assert data["settings"]["ssd_dir"] == str(ssd_dir)
    ssd_lines = [line for line in result.stdout.splitlines() if line.startswith("ssd       tcp")]
    assert len(ssd_lines) == 8 and all(line.count("%") == 2 for line in ssd_lines)
    assert list(ssd_dir.iterdir()) == []  # the SSD segment and the disk's test file are gone


@pytest.mark.slow
def test_transfer_from_several_threads_and_processes(tmp_path):
    out_path = tmp_path / "transfer.json"
    result = run_kvstore("bench", "transfer", "--levels", "client", "--transports", "shm",
                         "--sizes", "64KiB", "--batch", "4", "--threads", "2", "--processes",
                         "2", "--duration", "0.05", "--verify", "--dram", "256MiB", "--json", str(out_path))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out_path.read_text())["rows"]
    assert len(rows) == 4
    assert all(r["concurrency"] == 4 and r["gbps"] > 0 for r in rows)
    assert {r["batch_items"] for r in rows if r["mode"] == "batch"} == {4}
    assert all(r["cpu_s_per_gb"] is None for r in rows)  # worker CPU is not probed


def _node_hits(address: str) -> dict[str, int]:
    """Reads each node served, as the master counts them (TierStats.hits)."""
    from kvstore.rpc import grpc_client

    with grpc_client(address) as client:
        return {n.node_id: sum(t.hits for t in n.tiers) for n in client.list_nodes()}


@pytest.mark.slow
def test_target_node_puts_every_value_on_the_chosen_node(tmp_path):
    from client_cluster import Cluster

    cluster = Cluster(num_daemons=2, dram="256MiB")
    try:
        node_ids = sorted(_node_hits(cluster.address))
        args = ["bench", "transfer", "--master", cluster.address, "--levels", "client",
                "--transports", "shm", "--sizes", "64KiB,256KiB", "--batch", "4",
                "--duration", "0.02"]
        # without --target-node the master spreads the puts over both nodes: the control
        spread = run_kvstore(*args, "--json", str(tmp_path / "spread.json"))
        assert spread.returncode == 0, spread.stderr
        placement = json.loads((tmp_path / "spread.json").read_text())["placement"]
        assert {node for counts in placement.values() for node in counts} == set(node_ids)

        target, other = node_ids
        hits_before = _node_hits(cluster.address)
        pinned = run_kvstore(*args, "--target-node", target, "--json", str(tmp_path / "t.json"))
        assert pinned.returncode == 0, pinned.stderr
        data = json.loads((tmp_path / "t.json").read_text())
        assert data["settings"]["target_node"] == target
        assert len(data["rows"]) == 8 and len(data["placement"]) == 2
        for counts in data["placement"].values():
            # the fixed keys, the single puts (>= 2 calls x 3 rounds) and the batched puts
            assert set(counts) == {target} and counts[target] >= 4 + 6 + 6 * 4
        hits_after = _node_hits(cluster.address)
        # the master's own counters: every get of the pinned run was served by the target
        assert hits_after[other] == hits_before[other]
        assert hits_after[target] > hits_before[target]

        unknown = run_kvstore(*args, "--target-node", "no-such-node", timeout=60)
        assert unknown.returncode == 2, unknown.stderr
        assert "--target-node no-such-node" in unknown.stderr and target in unknown.stderr
        assert other in unknown.stderr and "Traceback" not in unknown.stderr
    finally:
        cluster.close()


@pytest.mark.slow
def test_a_target_node_without_room_stops_the_run(tmp_path):
    from client_cluster import Cluster

    cluster = Cluster(num_daemons=2, dram="8MiB")
    try:
        target = sorted(_node_hits(cluster.address))[0]
        result = run_kvstore("bench", "transfer", "--master", cluster.address, "--levels",
                             "client", "--transports", "shm", "--sizes", "1MiB", "--batch", "4",
                             "--duration", "0.3", "--target-node", target, "--json",
                             str(tmp_path / "t.json"))
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert f"than --target-node {target}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        cluster.close()


@pytest.mark.slow
def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default. NOTE: a shell started in the
    background (`cmd &`, as some CI runners start their jobs) ignores SIGINT, its children
    inherit that, and Python then never raises KeyboardInterrupt: the Ctrl-C under test
    would be a no-op."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_and_writes_what_was_measured(tmp_path):
    out_path = tmp_path / "transfer.json"
    # NOTE: the Ctrl-C comes once the progress bar counts 5 cases (the first size's rows
    # are in), so it always lands in the middle of the run (counting the bench's child
    # processes missed them on a loaded machine, and the signal came after the run ended)
    status, stdout, stderr = _interrupt_after(
        ["bench", "transfer", "--levels", "transport", "--transports", "shm",
         "--sizes", "64KiB,128KiB,256KiB,512KiB", "--duration", "2", "--dram", "256MiB",
         "--json", str(out_path)], "case", 5)
    assert status == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    data = json.loads(out_path.read_text())
    assert data["interrupted"] is True
    assert 1 <= len(data["rows"]) < 16  # stopped before the end
    assert "GB/s" in stdout


@pytest.mark.slow
def test_sigterm_stops_the_servers_it_started(tmp_path):
    proc = subprocess.Popen([str(KVSTORE_BIN), "bench", "transfer", "--levels", "transport",
                             "--transports", "shm", "--sizes", "64KiB", "--duration", "30",
                             "--dram", "64MiB", "--json", str(tmp_path / "t.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(children) < 2:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        time.sleep(0.1)
    assert len(children) >= 2, "the bench did not start its master and daemon"
    time.sleep(1.0)
    proc.terminate()
    # NOTE: a SIGTERM that comes while the servers start waits until they have (up to their
    # start timeout on a loaded machine), so that they can be stopped
    proc.communicate(timeout=180)
    assert proc.returncode == 143
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", pid


@pytest.mark.parametrize("args, message", [
    (["--transports", "shm,foo"], "unknown transport foo"),
    (["--levels", "wire"], "unknown level wire"),
    (["--sizes", "0"], "must be above 0"),
    (["--sizes", "12parsecs"], "--sizes"),
    (["--threads", "-1"], "--threads"),
    (["--processes", "0"], "--processes"),
    (["--batch", "0"], "--batch"),
    (["--duration", "0"], "must be above 0"),
    (["--master", "127.0.0.1:1", "--dram", "1GiB"], "not with --master"),
    (["--master", "127.0.0.1:1", "--levels", "client"], "cannot reach the master"),
    (["--target-node", "a"], "give --master too"),
    (["--master", "127.0.0.1:1", "--ssd", "/tmp"], "not with --master"),
])
def test_transfer_bad_arguments_are_usage_errors(args, message):
    result = run_kvstore("bench", "transfer", *args, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_recorded_transfer_bench_command_still_runs(tmp_path):
    # bench/RESULTS.md records `bench/transfer_bench.py --min-time 0.6` (the old flag name)
    result = subprocess.run([sys.executable, str(REPO / "bench" / "transfer_bench.py"),
                             "--min-time", "0.01", "--sizes", "64KiB,4MiB", "--dram", "256MiB",
                             "--json", str(tmp_path / "t.json")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["settings"]["duration_s"] == 0.01 and len(data["rows"]) == 32
    assert "PASS" in result.stdout or "MISS" in result.stdout


def test_transports_flag_takes_the_kinds_kvstore_transport_lists():
    from kvstore.transport import TRANSPORT_KINDS

    result = run_kvstore("bench", "transfer", "--help", timeout=60)
    assert f"of: {', '.join(TRANSPORT_KINDS)}" in " ".join(result.stdout.split())


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    out_path = tmp_path / "t.json"
    result = run_kvstore("bench", "transfer", "--sizes", "64KiB", "--plot",
                         str(tmp_path / "t.png"), "--json", str(out_path),
                         env=without_matplotlib(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "pip install 'kvstore[plot]'" in result.stderr
    assert not out_path.exists()  # refused before anything was measured


def test_bench_group_lists_its_subcommands():
    result = run_kvstore("bench", "--help", timeout=60)
    assert result.returncode == 0
    for name in ("transfer", "master", "kernels"):
        assert name in result.stdout


def test_the_bench_scripts_are_callers_of_the_commands():
    for script, option in (("transfer_bench.py", "--duration"), ("master_bench.py", "--quick"),
                           ("kernels_bench.py", "--layout")):
        result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert option in result.stdout


@pytest.mark.slow
def test_kernels_reports_each_op_beside_the_ceiling(tmp_path):
    out_path = tmp_path / "kernels.json"
    result = run_kvstore("bench", "kernels", "--layout", "kv_first", "--dtype", "float16",
                         "--num-layers", "2", "--num-blocks", "16", "--num-pages", "8",
                         "--block-size", "4", "--num-heads", "2", "--head-dim", "32",
                         "--rounds", "1", "--json", str(out_path))
    assert result.returncode == 0, result.stderr
    data = json.loads(out_path.read_text())
    assert data["layout"] == "kv_first" and data["dtype"] == "float16"
    ops = {r["op"]: r for r in data["rows"]}
    assert {"gather", "scatter", "gather_quantize", "memcpy (1 thread)", "torch copy_",
            "gather (1 thread)", "scatter (1 thread)"} <= set(ops)
    assert ops["memcpy (1 thread)"]["pct_of_ceiling"] == pytest.approx(100)
    assert data["num_bytes"] == 2 * 8 * 2 * 4 * 2 * 32 * 2  # layers x pages x K/V x page x fp16
    # the verdict's reference is the fastest copy of the same bytes, measured in the run
    copies = [r for r in data["rows"] if r["op"].startswith(("memcpy", "torch copy_"))]
    assert data["best_copy"] == max(copies, key=lambda r: r["gbps"])["op"]
    assert ops[data["best_copy"]]["of_best_copy"] == pytest.approx(1)
    assert all(r["of_best_copy"] <= 1 + 1e-9 for r in copies)
    assert all(r["gb_per_cpu_s"] > 0 for r in data["rows"])
    threads = data["threads"]
    assert (f"memcpy ({threads} threads)" in ops) == (threads > 1)
    assert "x best copy" in result.stdout and f"0.8x {data['best_copy']}" in result.stdout


def test_threaded_memcpy_copies_every_byte_in_slices():
    """The N-thread memcpy ceiling moves exactly the bytes of src, odd sizes included."""
    import torch

    from kvstore.bench.kernels import _threaded_memcpy

    for num_threads, num_bytes in ((1, 100), (2, 4097), (3, 64 * 3 + 5), (4, 3)):
        src = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8)
        dst = torch.zeros_like(src)
        _threaded_memcpy(dst, src, num_threads)()
        assert torch.equal(dst, src)


def test_kernels_bad_arguments_are_usage_errors():
    result = run_kvstore("bench", "kernels", "--num-pages", "9", "--num-blocks", "8",
                         timeout=120)
    assert result.returncode == 2 and "--num-pages" in result.stderr


@pytest.mark.slow
def test_master_reports_rates_beside_the_in_process_ceiling(tmp_path):
    out_path = tmp_path / "master.json"
    result = run_kvstore("bench", "master", "--quick", "--modes", "threads", "--paths", "fast",
                         "--seconds", "0.1", "--num-keys", "4096", "--json", str(out_path), timeout=240)
    assert result.returncode == 0, result.stderr
    data = json.loads(out_path.read_text())
    rows = data["modes"]["threads/fast"]["rows"]
    assert {(r["op"], r["batch"]) for r in rows} == {
        (op, b) for op in ("get_replicas", "exists", "put") for b in (1, 1024)}
    assert all(r["keys_per_s"] > 0 and 0 < r["pct_of_ceiling"] for r in rows)
    assert data["ceiling_in_process"]["get_replicas_keys_per_s"] > 0
    # the fast rows' ceiling is the fast path's wire form; the loopback floor is printed
    assert data["ceiling_in_process"]["fast_exists_keys_per_s"] > 0
    assert 0 < data["loopback_floor_p50_us"] < 1e6 and "loopback floor" in result.stdout
    assert "%ceiling" in result.stdout
    # the master's own CPU per call: counted over the cells (/proc ticks: 10 ms each)
    assert all(r["master_cpu_us_per_call"] >= 0 for r in rows)
    assert sum(r["master_cpu_us_per_call"] * r["calls"] for r in rows) > 0
    assert "keys/CPU-s" in result.stdout and "(issue 15)" in result.stdout


def _interrupt_after(args: list[str], unit: str, count: int, timeout_s: float = 180):
    """Start ``kvstore ARGS``, wait until its progress bar (stderr) counts ``count`` of
    ``unit``, send SIGINT, and return (exit status, stdout, stderr)."""
    import re
    import threading

    proc = subprocess.Popen([str(KVSTORE_BIN), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_sigint_default)
    seen = bytearray()
    reached = threading.Event()
    # tqdm's "3/6 [00:01<00:02, ...]" (with a total) or "30op [00:01, ...]" (without)
    pattern = re.compile(rb"(\d+)(?:/\d+|" + unit.encode() + rb") \[")

    def read_stderr():
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)
            counts = [int(m.group(1)) for m in pattern.finditer(seen)]
            if counts and max(counts) >= count:
                reached.set()
        reached.set()  # EOF: the process ended

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert reached.wait(timeout_s), seen.decode(errors="replace")[-2000:]
    assert proc.poll() is None, ("ended before the interrupt", seen.decode(errors="replace"))
    proc.send_signal(signal.SIGINT)
    stdout = proc.stdout.read()
    proc.wait(timeout=60)
    reader.join(timeout=10)
    return proc.returncode, stdout.decode(), seen.decode(errors="replace")


@pytest.mark.slow
def test_master_ctrl_c_prints_and_writes_what_was_measured(tmp_path):
    out_path = tmp_path / "master.json"
    # the ceiling, the floor and one cell of six, each cell 3 s: then Ctrl-C
    status, stdout, stderr = _interrupt_after(
        ["bench", "master", "--quick", "--modes", "aio", "--paths", "fast", "--seconds", "3",
         "--num-keys", "2048", "--json", str(out_path)], "cell", 3)
    assert status == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    data = json.loads(out_path.read_text())
    assert data["interrupted"] is True and data["ceiling_in_process"]["put_keys_per_s"] > 0
    rows = data["modes"]["aio/fast"]["rows"]
    assert 1 <= len(rows) < 6 and all(r["keys_per_s"] > 0 for r in rows)
    assert "keys/s" in stdout and not any(line.startswith("PASS") for line in
                                          stdout.splitlines())


@pytest.mark.slow
def test_kernels_ctrl_c_prints_and_writes_what_was_measured(tmp_path):
    out_path = tmp_path / "kernels.json"
    status, stdout, stderr = _interrupt_after(
        ["bench", "kernels", "--num-layers", "2", "--num-blocks", "64", "--num-pages", "32",
         "--rounds", "100000", "--json", str(out_path)], "op", 30)
    assert status == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    data = json.loads(out_path.read_text())
    assert data["interrupted"] is True
    ops = {r["op"]: r for r in data["rows"]}
    assert "gather" in ops and ops["memcpy (1 thread)"]["pct_of_ceiling"] == pytest.approx(100)
    assert 1 <= ops["gather"]["rounds"] < 100000
    assert "GB/s" in stdout


def test_master_bad_mode_is_a_usage_error():
    result = run_kvstore("bench", "master", "--modes", "fibers", timeout=60)
    assert result.returncode == 2 and "--modes" in result.stderr


def test_check_bytes_catches_an_injected_corruption():
    from kvstore.bench.verify import SAMPLE_WINDOW_BYTES, check_bytes, sample_offsets

    expected = np.random.default_rng(0).integers(0, 256, 1 << 20, np.uint8)
    check_bytes(expected, expected.copy(), verify_all=True, what="ok")
    check_bytes(expected, expected.copy(), verify_all=False, what="ok")
    sampled = sample_offsets(expected.nbytes)
    assert sampled[0] == 0 and sampled[-1] == expected.nbytes - SAMPLE_WINDOW_BYTES
    # in a sampled window: both checks catch it
    corrupt = expected.copy()
    corrupt[sampled[5] + 3] ^= 0xFF
    for verify_all in (True, False):
        with pytest.raises(click.ClickException, match=f"offset {sampled[5] + 3}"):
            check_bytes(expected, corrupt, verify_all=verify_all, what="case x")
    # between two windows: only --verify (every byte) catches it
    corrupt = expected.copy()
    between = sampled[5] + SAMPLE_WINDOW_BYTES + 100
    assert between < sampled[6]
    corrupt[between] ^= 0x01
    check_bytes(expected, corrupt, verify_all=False, what="sampled")
    with pytest.raises(click.ClickException, match="1 of 1048576 bytes"):
        check_bytes(expected, corrupt, verify_all=True, what="all")
    with pytest.raises(click.ClickException, match="read 10 bytes"):
        check_bytes(expected, expected[:10], verify_all=False, what="short")


def test_measure_primitives_report_what_they_timed():
    from kvstore.bench.measure import Budget, ColdCopy, make_cpu_probe, percentiles_us, rate, \
        rate_beside_memcpy

    def sleep_1ms():
        time.sleep(0.001)

    budget = Budget(duration_s=0.03)
    assert 0 < rate(sleep_1ms, 1_000_000, budget) < 1.0  # 1 MB per >= 1 ms: <= 1 GB/s
    figure = rate_beside_memcpy(sleep_1ms, 1_000_000, 1, budget, make_cpu_probe([]),
                                ColdCopy())
    assert 0 < figure.gbps < 1.0 < figure.memcpy_gbps  # a 1 MB memcpy takes far below 1 ms
    assert 0 <= figure.cpu_s_per_gb < 0.5  # sleeping 1 ms per MB uses far less CPU
    assert 1000 <= figure.latency_us["p50_us"] <= figure.latency_us["p99_us"]
    assert percentiles_us([i / 1e6 for i in range(1, 101)]) == {
        "p50_us": pytest.approx(50), "p90_us": pytest.approx(90), "p99_us": pytest.approx(99)}
    assert percentiles_us([]) == {}


def test_total_budget_moves_at_least_the_bytes_asked_for():
    from kvstore.bench.measure import Budget, _round

    calls = []
    num_calls, _, samples = _round(lambda: calls.append(1), 1000, Budget(total_bytes=30_000))
    assert num_calls == len(samples) == len(calls) == 10  # 30 kB over 3 rounds of 1 kB calls


def test_cold_copy_cycles_through_the_cases_working_set():
    from kvstore.bench.measure import ColdCopy

    cold = ColdCopy()
    copy = cold.fn(1 << 20, num_items=4, working_set_bytes=16 << 20)
    cold._src[:] = 7
    copy()
    copy()
    touched = np.flatnonzero(cold._dst[::1 << 20] == 7)
    assert list(touched) == list(range(8))  # 8 distinct 1 MiB slots, not one reused
    single = cold.fn(1 << 20)  # a working set of one value: the same pair every call
    cold._src[:] = 9
    single()
    single()
    assert list(np.flatnonzero(cold._dst[::1 << 20] == 9)) == [0]


def test_batches_move_about_64_mib_in_at_most_128_items():
    from kvstore.bench.transfer import batch_items

    assert batch_items(64 * 1024) == 128
    assert batch_items(1024 * 1024) == 64
    assert batch_items(256 * 1024 * 1024) == 1
    assert batch_items(1024 * 1024, batch=3) == 3
