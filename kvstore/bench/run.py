"""One run of ``kvstore bench transfer`` once its flags are checked: the cluster (its own or
``--master``'s), the ceilings, the cases under a progress bar, the table and the JSON
document. Ctrl-C stops the cases and keeps what was measured so far (marked interrupted);
SIGTERM stops them too (exit status 143), the servers stopped either way."""

from __future__ import annotations

import signal
import sys

import click

from kvstore.bench.measure import Budget, ColdCopy, disk_gbps, loopback_gbps, make_cpu_probe
from kvstore.bench.report import document, format_table, loadavg
from kvstore.bench.placement import pick_node
from kvstore.bench.signals import signals_held
from kvstore.bench.transfer import CaseSettings, batch_items, client_cases, transport_cases


def run_transfer(master_addr: str | None, token: str | None, kinds: list[str],
                 levels: list[str], sizes: list[int], budget: Budget, settings: dict, *,
                 tls=None) -> dict:
    """Measure, print the table, and return the JSON document (see ``bench.report``).
    ``tls`` (a ``kvstore.TLSConfig``): every connection is TLS, and a local cluster serves
    it (``start_cluster``)."""
    from tqdm import tqdm

    from kvstore.bench.concurrent import concurrent_cases
    from kvstore.bench.transfer_cli import start_cluster

    # NOTE: SIGTERM stops the run like an error (exit status 143): the finally below still
    # stops our master and daemon, which would otherwise outlive us
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    load_at_start = loadavg()
    concurrency = settings["threads"] * settings["processes"]
    if master_addr is not None:
        # an unreachable master or an unknown --target-node is a usage error, up front
        pick_node(master_addr, token, settings["target_node"], tls=tls)
    servers = ()
    rows: list[dict] = []
    loopback_by_size: dict[int, float] = {}
    raw_nixl_by_size: dict[int, dict[str, float]] = {}
    raw_nixl = None     # nixl_ceiling.RawNixlCeiling, open for the run when nixl is measured
    disk_by_size: dict[int, dict[str, float]] = {}
    disk_io = None
    interrupted = False
    case = None
    try:
        if master_addr is None:
            largest_batch = max(s * batch_items(s, settings["batch"]) for s in sizes)
            # NOTE: SIGINT and SIGTERM wait until the servers have started: a ServerProcess
            # interrupted while it waits for its server could not be stopped
            with signals_held(signal.SIGINT, signal.SIGTERM):
                ssd = settings.get("ssd_dir")
                servers = start_cluster(dram_bytes=settings["dram_bytes"]
                                        or max(4 * largest_batch * concurrency, 2 * 1024**3),
                                        nixl="nixl" in kinds,
                                        ssd=ssd and f"{ssd}/store:{2 * largest_batch + 2**28}",
                                        tls=tls)
            master_addr = servers[0].address
        total = 4 * len(sizes) * (len(kinds) * len(levels) + bool(settings.get("ssd_dir")))
        with tqdm(total=total, desc="bench transfer", unit="case", leave=False) as progress:
            if "tcp" in kinds:
                loopback_by_size = loopback_gbps(sizes, budget)
            node = pick_node(master_addr, token, settings["target_node"], tls=tls)
            if "nixl" in kinds:
                from kvstore.bench.nixl_ceiling import RawNixlCeiling

                raw_nixl = RawNixlCeiling(
                    master_addr, token, node, sizes, tls=tls,
                    size_to_items={s: batch_items(s, settings["batch"]) for s in sizes})
                raw_nixl_by_size = raw_nixl.figures(budget)
            case = CaseSettings(budget, settings["verify"], settings["batch"],
                                make_cpu_probe([s.proc.pid for s in servers]), ColdCopy(),
                                progress, token, tls, settings["target_node"],
                                raw_nixl=raw_nixl)
            if "transport" in levels:
                transport_cases(master_addr, node, kinds, sizes, case, rows)
            if "client" in levels and concurrency > 1:
                concurrent_cases(master_addr, kinds, sizes, case, settings["threads"],
                                 settings["processes"], rows)
            elif "client" in levels:
                client_cases(master_addr, kinds, sizes, case, rows)
            if settings.get("ssd_dir"):
                # NOTE: the SSD tier is served over the data plane (tcp, whatever --transports
                # says), one connection and thread per client: the disk ceiling uses the same
                # pattern
                disk_by_size, direct = disk_gbps(settings["ssd_dir"], sizes, budget)
                disk_io = "O_DIRECT" if direct else "buffered"
                client_cases(master_addr, ["tcp"], sizes, case, rows, tier="ssd")
    except KeyboardInterrupt:
        interrupted = True
        click.echo(f"\ninterrupted: {len(rows)} figure(s) measured so far", err=True)
    finally:
        try:
            if raw_nixl is not None:   # its pinned object, before the servers stop
                raw_nixl.close()
        finally:
            for server in reversed(servers):  # the daemon first: it deregisters from a live master
                server.close()
            if servers and settings.get("ssd_dir"):   # the SSD segment the bench's daemon made
                import shutil

                shutil.rmtree(f"{settings['ssd_dir']}/store", ignore_errors=True)
    click.echo(format_table(rows, loopback_by_size, raw_nixl_by_size, disk_by_size))
    if disk_io:
        click.echo(f"ssd rows: the link ceiling is the disk in {settings['ssd_dir']} ({disk_io}, "
                   "requests of 1 MiB, 4 in flight, as the SSD tier issues them)")
    load = loadavg()
    click.echo(f"load average (1/5/15 min): {load_at_start} at start, {load} at end")
    result = document(rows, loopback_by_size, settings, load_at_start, interrupted)
    result["raw_nixl_gbps"] = {str(k): v for k, v in raw_nixl_by_size.items()}
    result["disk_gbps"] = {str(k): v for k, v in disk_by_size.items()}
    result["disk_io"] = disk_io
    result["placement"] = case.placement if case is not None else {}
    return result
