"""``kvstore daemon``: run a storage node until SIGTERM/SIGINT.

Prints ``listening on HOST:PORT`` (the data-plane address) on stdout, one flushed line, once
it serves and has registered with the master; logs go to stderr. On SIGTERM it unregisters,
stops serving and unlinks its shared memory, then exits 0. torch is imported only for --gpu.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from kvstore._errors import ConfigError, KVStoreError
from kvstore._tls import exposure_warning
from kvstore._tls_options import tls_options
from kvstore._units import parse_size

log = logging.getLogger("kvstore.daemon")


def _size(ctx, param, value):
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc


def _tier_spec(ctx, param, value):
    if value is None:
        return None, 0
    from kvstore.daemon.config import split_tier_spec
    try:
        return split_tier_spec(value, f"--{param.name}")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("daemon")
@click.option("--master", "master_addr", default=None, metavar="HOST:PORT",
              help="The metadata master (required unless --standalone): HOST:PORT, "
                   "HOST:PORT,HOST:PORT,... or etcd://HOST:PORT/CLUSTER (its leader).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the data plane binds (exactly this one).")
@click.option("--advertise-host", default=None, metavar="HOST",
              help="Host in the data-plane address registered with the master, which "
                   "clients connect to (default: --host, or for 0.0.0.0/:: the address this "
                   "machine's hostname resolves to).")
@click.option("--port", default=0, show_default=True, type=int, help="0: pick a free port.")
@click.option("--dram", default="1GiB", show_default=True, callback=_size,
              help="DRAM tier size, in POSIX shared memory (e.g. 4GiB; 0: no DRAM tier).")
@click.option("--ssd", default=None, callback=_tier_spec, metavar="DIR:SIZE",
              help="SSD tier: a preallocated file of SIZE in DIR, served over the data plane; "
                   "its objects survive restarts (an index in DIR).")
@click.option("--ssd-codec", default="none", show_default=True,
              type=click.Choice(["none", "lz4"]),
              help="Compress what the SSD tier writes (lz4: less disk bandwidth for "
                   "compressible values; capacity is still counted in raw bytes).")
@click.option("--gpu", default=None, callback=_tier_spec, metavar="DEVICE:SIZE",
              help="HBM tier on a CUDA device (e.g. cuda:0:8GiB); needs CUDA torch.")
@click.option("--token", envvar="KVSTORE_TOKEN", default=None,
              help="Shared token for the master and the data plane [env KVSTORE_TOKEN].")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics here.")
@click.option("--metrics-host", default=None,
              help="Address the metrics port binds (default: --host).")
@click.option("--node-id", default=None,
              help="Node id (default: the one recorded in the --ssd directory by an earlier "
                   "start, else HOSTNAME-RANDOM).")
@click.option("--standalone", is_flag=True,
              help="Serve the data plane without a master (benchmarks, debugging).")
@click.option("--reap-orphans/--no-reap-orphans", default=True, show_default=True,
              help="At start, remove shm/SSD segments of dead daemons of this user and host.")
@click.option("--prefault/--no-prefault", default=True, show_default=True,
              help="Check at start that /dev/shm has room for the DRAM tier (a too-small "
                   "/dev/shm fails now rather than later), then allocate its pages in the "
                   "background after listening.")
@click.option("--commit-ring/--no-commit-ring", default=True, show_default=True,
              help="Give same-host writers a commit ring in shared memory: a put to the "
                   "DRAM tier commits there without waking this daemon (off: they send a "
                   "CLIENT_COMMIT frame per put, as tcp writers do).")
@click.option("--nixl/--no-nixl", default=False, show_default=True,
              help="Register the DRAM segment with a NIXL agent (UCX) and publish it through "
                   "the master, for one-sided reads and writes (needs kvstore[nixl]).")
@click.option("--write-capabilities/--no-write-capabilities", default=True, show_default=True,
              help="Refuse data-plane WRITEs without the master's capability for exactly "
                   "that range (off: accept any authenticated WRITE, as before capabilities; "
                   "for clients older than them).")
@click.option("--read-capabilities/--no-read-capabilities", default=True, show_default=True,
              help="With --write-capabilities: refuse data-plane READs without the master's "
                   "read capability for that range, issued with each GetReplicas (off: any "
                   "authenticated READ, for clients older than read capabilities).")
@click.option("--rpc-timeout", default=5.0, show_default=True, type=float,
              help="Seconds per master RPC.")
@tls_options("server")
@click.option("--tls-master-ca", default=None, metavar="FILE",
              help="PEM CA bundle that verifies the master, when it is not --tls-ca (a "
                   "server-only TLS data plane with a private CA).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def command(master_addr, host, advertise_host, port, dram, ssd, ssd_codec, gpu, token, metrics_port,
            metrics_host, node_id, standalone, reap_orphans, prefault, commit_ring, nixl,
            write_capabilities, read_capabilities, rpc_timeout, tls_ca, tls_cert, tls_key,
            tls_master_ca, log_level):
    """Run a storage node: DRAM/SSD/HBM segments served over a data plane."""
    logging.basicConfig(stream=sys.stderr, level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if master_addr is None and not standalone:
        raise click.UsageError("--master HOST:PORT is required (or --standalone)")
    from kvstore.daemon.config import DaemonConfig
    from kvstore.daemon.server import Daemon

    try:
        if not node_id and ssd[0] is not None:
            # NOTE: a restart on the same SSD directory keeps the node id that owns its data
            from kvstore.daemon.ssd_files import recorded_node_id
            node_id = recorded_node_id(ssd[0])
        extra = {"node_id": node_id} if node_id else {}
        config = DaemonConfig(
            master_addr=None if standalone else master_addr, host=host, port=port,
            advertise_host=advertise_host,
            dram_bytes=dram, ssd_dir=ssd[0], ssd_bytes=ssd[1], ssd_codec=ssd_codec,
            gpu_device=gpu[0], gpu_bytes=gpu[1], token=token, metrics_port=metrics_port,
            metrics_host=metrics_host, rpc_timeout_s=rpc_timeout,
            reap_orphans=reap_orphans, prefault=prefault, commit_ring=commit_ring, nixl=nixl,
            write_capabilities=write_capabilities, read_capabilities=read_capabilities,
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, tls_master_ca=tls_master_ca,
            **extra)
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    daemon = Daemon(config)
    stopping = threading.Event()

    def on_signal(*_: object) -> None:
        stopping.set()
        daemon.interrupt()  # a registration still waiting for the master gives up

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        daemon.start()
    except KVStoreError as exc:
        if stopping.is_set():
            log.info("stopped before the master answered")
            return
        raise click.ClickException(str(exc)) from exc
    print(f"listening on {daemon.address}", flush=True)
    warning = exposure_warning(config.host, token=config.token, tls=config.tls)
    if warning:
        log.warning("%s", warning)
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        log.info("stopping node %s", daemon.node_id)
        daemon.stop()
