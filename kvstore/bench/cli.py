"""``kvstore bench``: transfer bandwidth and latency between this process and a daemon process.

Two levels, both across processes: ``transport`` (the shm/tcp transports against fixed ranges
of the daemon's segment: the data path alone) and ``client`` (``kvstore.connect`` put/get:
master round trips, allocation and checksums included). For each (level, transport, size,
single|batched, put|get) it reports GB/s (1 GB = 1e9 bytes); for 64 KiB single it also reports
p50/p99 latency. A single-thread memcpy of the bytes each call moves, measured in rounds
interleaved with the figure's own (same moments, same load), is printed beside it as the
ceiling (``% memcpy``); for tcp rows, raw Python TCP over loopback to another process (one
stream) is printed too (``loopbk``). ``cpu s/GB`` is the CPU time of this process plus our
master and daemon per GB moved: unlike GB/s it hardly depends on what else runs, so it
compares busy runs. The 1-minute load average at the end is recorded. The cases live in
``kvstore.bench.transfer``, the measuring primitives in ``kvstore.bench.measure``.

Without ``--master`` it starts its own ``kvstore master`` and ``kvstore daemon`` processes
(port 0, as ``kvstore._process.ServerProcess``: their stderr is kept as a log and quoted when
one fails to start) and stops them at the end; with ``--master`` it measures an existing
cluster (first node listed) and writes only to ranges it allocated through ``put`` (client
level) — the transport level needs a private daemon and is skipped.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click

from kvstore._errors import KVStoreError
from kvstore._process import ServerProcess
from kvstore._units import format_size, parse_size
from kvstore.bench.measure import loopback_gbps, make_cpu_probe
from kvstore.bench.transfer import batch_items, client_cases, first_node, transport_cases

DEFAULT_SIZES = ("64KiB", "1MiB", "4MiB", "16MiB", "64MiB")


def start_cluster(dram_bytes: int) -> tuple[ServerProcess, ServerProcess]:
    """A master and a daemon process of our own (click.ClickException, with the server's
    log, when one does not start; nothing is left running then)."""
    try:
        master = ServerProcess(["master", "--port", "0", "--log-level", "WARNING"])
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        daemon = ServerProcess(["daemon", "--master", master.address, "--dram", str(dram_bytes),
                                "--log-level", "WARNING"])
    except KVStoreError as exc:
        master.close()
        raise click.ClickException(str(exc)) from exc
    return master, daemon


def print_table(rows, loopback_by_size) -> None:
    header = (f"{'level':<9} {'transport':<9} {'size':>10} {'mode':<6} {'items':>5} {'op':<4}"
              f" {'GB/s':>7} {'memcpy':>7} {'%memcpy':>7} {'loopbk':>7} {'cpu s/GB':>8} "
              f"{'p50 us':>8} {'p99 us':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ceiling = row["memcpy_gbps"]
        p50 = f"{row['p50_us']:.0f}" if "p50_us" in row else ""
        p99 = f"{row['p99_us']:.0f}" if "p99_us" in row else ""
        loopback = loopback_by_size.get(row["size_bytes"])
        loopback_text = f"{loopback:.2f}" if loopback is not None and row["transport"] == "tcp" \
            else ""
        print(f"{row['level']:<9} {row['transport']:<9} {format_size(row['size_bytes']):>10} "
              f"{row['mode']:<6} {row['batch_items']:>5} {row['op']:<4} {row['gbps']:>7.2f} "
              f"{ceiling:>7.2f} {100 * row['gbps'] / ceiling:>6.0f}% {loopback_text:>7} "
              f"{row['cpu_s_per_gb']:>8.3f} {p50:>8} {p99:>8}")


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return None


@click.command("bench")
@click.option("--master", "master_addr", default=None, metavar="HOST:PORT",
              help="Measure this cluster (client level only). Default: start a local one.")
@click.option("--token", envvar="KVSTORE_TOKEN", default=None, help="[env KVSTORE_TOKEN]")
@click.option("--transports", default="shm,tcp", show_default=True,
              help="Comma-separated transports to measure.")
@click.option("--levels", default="transport,client", show_default=True,
              help="Comma-separated: transport (data path), client (kvstore.connect).")
@click.option("--sizes", default=",".join(DEFAULT_SIZES), show_default=True,
              help="Comma-separated value sizes.")
@click.option("--min-time", "min_time_s", default=0.5, show_default=True, type=float,
              help="Seconds per measurement (best of 3 rounds, at least 2 calls each).")
@click.option("--json", "json_path", default="bench/out/transfer.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the results.")
def command(master_addr, token, transports, levels, sizes, min_time_s, json_path):
    """Measure put/get bandwidth and latency over each transport; print a table, write JSON."""
    from tqdm import tqdm

    kinds = [k for k in transports.split(",") if k]
    level_list = [v for v in levels.split(",") if v]
    size_list = [parse_size(s) for s in sizes.split(",") if s]
    if master_addr is not None and "transport" in level_list:
        click.echo("note: --master given: skipping the transport level (needs its own daemon)",
                   err=True)
        level_list.remove("transport")
    servers: tuple[ServerProcess, ...] = ()
    if master_addr is None:
        largest_batch = max(s * batch_items(s) for s in size_list)
        servers = start_cluster(dram_bytes=max(4 * largest_batch, 2 * 1024**3))
        master_addr = servers[0].address
    try:
        loopback_by_size = loopback_gbps(size_list, min_time_s) if "tcp" in kinds else {}
        node = first_node(master_addr, token)
        cpu_probe = make_cpu_probe([server.proc.pid for server in servers])
        total = 4 * len(kinds) * len(size_list) * len(level_list)
        rows = []
        with tqdm(total=total, desc="bench", unit="case", leave=False) as progress:
            if "transport" in level_list:
                rows += transport_cases(node, kinds, size_list, token, min_time_s, progress,
                                        cpu_probe)
            if "client" in level_list:
                rows += client_cases(master_addr, kinds, size_list, token, min_time_s, progress,
                                     cpu_probe)
    finally:
        for server in reversed(servers):  # the daemon first: it deregisters from a live master
            server.close()
    print_table(rows, loopback_by_size)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": platform.node(),
              "loopback_gbps": {str(k): v for k, v in loopback_by_size.items()},
              "loadavg_1m": _loadavg(),
              "rows": rows}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2))
    click.echo(f"wrote {json_path}")
