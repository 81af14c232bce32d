"""``kvstore bench transfer``: put/get bandwidth and latency between this machine and a
daemon, by value size, batch size, concurrency and transport.

Two levels, both across processes: ``transport`` (each transport against fixed ranges of a
private daemon's segment: the data path alone) and ``client`` (``kvstore.connect`` put/get:
master round trips, allocation and checksums included; from ``--threads`` x ``--processes``
workers when either is above 1). Every figure is printed beside a ceiling measured in the same
run, as a ratio: a single-thread memcpy with the same access pattern (as many distinct buffers
as the case touches; rounds interleaved with the figure's own), and a link ceiling: for tcp
rows raw Python TCP over loopback to another process, for nixl rows raw NIXL of the row's
pattern (one agent of this process, WRITE/READ between as many distinct ranges of the daemon's
segment as the case touches, the batch rows' whole batch in one transfer; rounds alternating
with the row's; no kvstore code: ``bench.nixl_ceiling``).
``--ssd DIR`` adds the SSD tier (level ``ssd``: the client cases over tcp with tier "ssd" on
an SSD segment of the bench's daemon in DIR) beside the disk's own bandwidth in DIR
(``measure.disk_gbps``).
``cpu s/GB`` (this process plus our master and daemon) hardly depends on what else runs, so it
compares busy runs. The load average at start and end is recorded.

Without ``--master`` it starts its own ``kvstore master`` and ``kvstore daemon`` (port 0; a
server that fails to start is quoted from its log) and stops them at the end, on error and on
Ctrl-C. With ``--master`` it measures an existing cluster (client level only: the transport
level writes fixed ranges and needs a private daemon); ``--target-node NODE`` then puts every
value on that node (run ``kvstore daemon`` on host A, the bench on host B: the A-B link is
measured) and checks with the master that each one landed there. Ctrl-C prints and writes what was
measured so far (exit status 130). Bad arguments and an unreachable master are usage errors
(exit status 2); bytes read that differ from bytes written abort with exit status 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kvstore._errors import KVStoreError
from kvstore._process import ServerProcess
from kvstore._tls_options import tls_from_flags, tls_options
from kvstore._units import parse_duration, parse_size
from kvstore.transport import TRANSPORT_KINDS

DEFAULT_SIZES = ("64KiB", "256KiB", "1MiB", "4MiB", "16MiB", "64MiB")
LEVELS = ("transport", "client")


def start_cluster(dram_bytes: int, nixl: bool = False, ssd: str | None = None,
                  tls=None) -> tuple[ServerProcess, ServerProcess]:
    """A master and a daemon process of our own, the daemon with a NIXL agent when ``nixl``
    and an SSD segment when ``ssd`` ("DIR:SIZE"; the master then promotes nothing, so gets
    read the SSD tier); with ``tls`` both serve TLS with its files (mutual TLS when it has a
    CA). click.ClickException, with the server's log, when one does not start; nothing is
    left running then."""
    tls_args = []
    for flag, path in (("--tls-ca", tls and tls.ca), ("--tls-cert", tls and tls.cert),
                       ("--tls-key", tls and tls.key)):
        tls_args += [flag, path] if path else []
    try:
        # NOTE: the transport level writes ranges allocated once by PutStart (with their
        # write capabilities) for the whole run: they must stay allocated that long
        master = ServerProcess(["master", "--port", "0", "--log-level", "WARNING",
                                "--pending-timeout", "1h", *tls_args,
                                *(["--promote", "off"] if ssd else [])])
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        daemon = ServerProcess(["daemon", "--master", master.address, "--dram", str(dram_bytes),
                                "--log-level", "WARNING", *tls_args,
                                *(["--nixl"] if nixl else []),
                                *(["--ssd", ssd, "--no-reap-orphans"] if ssd else [])])
    except KVStoreError as exc:
        master.close()
        raise click.ClickException(str(exc)) from exc
    return master, daemon


def _split(text: str, what: str, allowed: tuple[str, ...]) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise click.BadParameter(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                                 f"expected some of: {', '.join(allowed)}")
    return items


def parse_sizes(text: str) -> list[int]:
    """Comma-separated sizes, each above 0 (click.BadParameter otherwise)."""
    sizes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            size_bytes = parse_size(item)
        except (KVStoreError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--sizes") from exc
        if size_bytes <= 0:
            raise click.BadParameter(f"size {item!r} must be above 0", param_hint="--sizes")
        sizes.append(size_bytes)
    if not sizes:
        raise click.BadParameter("no size given", param_hint="--sizes")
    return sizes


@click.command("transfer")
@click.option("--master", "master_addr", default=None, metavar="HOST:PORT",
              help="Measure this cluster (client level only). Default: start a local one.")
@click.option("--target-node", "target_node", default=None, metavar="NODE",
              help="With --master: put every value on this node (its node id, as `kvstore "
                   "status` lists it); a put that lands elsewhere is an error.")
@click.option("--token", envvar="KVSTORE_TOKEN", default=None, help="[env KVSTORE_TOKEN]")
@click.option("--transports", default="shm,tcp", show_default=True,
              help=f"Comma-separated, of: {', '.join(TRANSPORT_KINDS)}.")
@click.option("--levels", default=",".join(LEVELS), show_default=True,
              help="Comma-separated: transport (data path), client (kvstore.connect).")
@click.option("--sizes", default=",".join(DEFAULT_SIZES), show_default=True,
              help="Comma-separated value sizes.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Values per batched call (default: about 64 MiB, at most 128).")
@click.option("--threads", "num_threads", type=click.IntRange(min=1), default=1,
              show_default=True, help="Client threads per process (client level).")
@click.option("--processes", "num_processes", type=click.IntRange(min=1), default=1,
              show_default=True, help="Client processes (client level).")
@click.option("--dram", default=None,
              help="DRAM of the local daemon (default: 4 x the largest batch x concurrency, "
                   "at least 2GiB).")
@click.option("--duration", default="0.25s", show_default=True,
              help="Time per measurement (3 rounds, at least 2 calls each).")
@click.option("--min-time", "min_time_s", type=float, default=None,
              help="The old name of --duration, in seconds (recorded commands use it).")
@click.option("--total", default=None,
              help="Instead of --duration: bytes each measurement moves (e.g. 4GiB).")
@click.option("--ssd", "ssd_dir", default=None, type=click.Path(file_okay=False),
              help="Also measure the SSD tier in this directory (own cluster: its daemon "
                   "gets an SSD segment there), beside the disk's own bandwidth.")
@click.option("--verify", "verify_all", is_flag=True,
              help="Check every byte read (default: a sample of each value).")
@click.option("--json", "json_path", default="bench/out/transfer.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write every figure.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Write a PNG: GB/s against value size (needs kvstore[plot]).")
@tls_options("client")
def command(master_addr, target_node, token, transports, levels, sizes, batch, num_threads,
            num_processes, dram, duration, min_time_s, total, ssd_dir, verify_all, json_path,
            plot_path, tls_ca, tls_cert, tls_key):
    """Measure put/get bandwidth and latency by size, batch, concurrency and transport."""
    from kvstore.bench.measure import Budget

    kinds = _split(transports, "transport", TRANSPORT_KINDS)
    level_list = _split(levels, "level", LEVELS)
    size_list = parse_sizes(sizes)
    try:
        duration_s = parse_duration(duration) if min_time_s is None else min_time_s
        total_bytes = None if total is None else parse_size(total)
        dram_bytes = None if dram is None else parse_size(dram)
    except (KVStoreError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc
    if duration_s <= 0 or (total_bytes is not None and total_bytes <= 0) or (
            dram_bytes is not None and dram_bytes <= 0):
        raise click.BadParameter("--duration, --total and --dram must be above 0")
    if target_node is not None and master_addr is None:
        raise click.UsageError("--target-node names a node of an existing cluster: give "
                               "--master too")
    if target_node is not None and not target_node.strip():
        raise click.BadParameter("must be a node id", param_hint="--target-node")
    if ssd_dir is not None and master_addr is not None:
        raise click.UsageError("--ssd gives the bench's own daemon an SSD segment: not with "
                               "--master")
    if ssd_dir is not None:
        import os

        os.makedirs(ssd_dir, exist_ok=True)
    if dram_bytes is not None and master_addr is not None:
        raise click.UsageError("--dram sizes the local daemon: not with --master")
    if plot_path is not None:
        from kvstore.bench.plot import require_matplotlib
        require_matplotlib()  # before measuring: a missing extra must not cost a whole run
    if master_addr is not None and "transport" in level_list:
        click.echo("note: --master given: skipping the transport level (needs its own daemon)",
                   err=True)
        level_list.remove("transport")
        if not level_list:
            raise click.UsageError("--master measures the client level only: add it to "
                                   "--levels")
    budget = Budget(duration_s=duration_s, total_bytes=total_bytes)
    settings = {"transports": kinds, "levels": level_list, "sizes": size_list, "batch": batch,
                "threads": num_threads, "processes": num_processes, "duration_s": duration_s,
                "total_bytes": total_bytes, "verify": verify_all, "master": master_addr,
                "target_node": target_node, "dram_bytes": dram_bytes, "ssd_dir": ssd_dir}
    from kvstore.bench.run import run_transfer

    tls = tls_from_flags(tls_ca, tls_cert, tls_key)
    if tls is not None and master_addr is None and tls.cert is None:
        raise click.UsageError("a local cluster serves TLS with --tls-cert and --tls-key")
    settings["tls"] = tls is not None
    result = run_transfer(master_addr, token, kinds, level_list, size_list, budget, settings,
                          tls=tls)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2))
    click.echo(f"wrote {json_path}")
    if plot_path is not None and result["rows"]:
        from kvstore.bench.plot import plot_transfer

        load = result["loadavg_at_start"]
        plot_transfer(result["rows"], {int(k): v for k, v in result["loopback_gbps"].items()},
                      {int(k): v for k, v in result["raw_nixl_gbps"].items()},
                      {int(k): v for k, v in result["disk_gbps"].items()},
                      plot_path, f"kvstore bench transfer on {result['machine']['host']} "
                      f"({result['date']}, load {load[0] if load else '?'})")
        click.echo(f"wrote {plot_path}")
    if result["interrupted"]:
        raise SystemExit(130)
