"""``kvstore master``: run the metadata master until SIGTERM/SIGINT.

Prints ``listening on HOST:PORT`` (the gRPC port) on stdout as its first line once bound,
before serving, then ``fast metadata on HOST:PORT`` unless ``--no-fast-rpc``; logs go to
stderr.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import threading

import click

from kvstore._errors import ConfigError
from kvstore._tls import exposure_warning
from kvstore._tls_options import tls_options
from kvstore._units import parse_duration
from kvstore.master.config import GRPC_MODES, MasterConfig
from kvstore.master.server import MasterServer
from kvstore.master.tenants import load_tenants

log = logging.getLogger("kvstore.master")


def _duration(ctx, param, value):
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("master")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=50051, show_default=True, type=int, help="0: pick a free port.")
@click.option("--advertise-host", default=None, metavar="HOST",
              help="Host published in etcd for others to reach this master (default: "
                   "--host, or for 0.0.0.0/:: the address this machine's hostname resolves "
                   "to).")
@click.option("--token", envvar="KVSTORE_TOKEN", default=None,
              help="Require 'authorization: Bearer TOKEN' on every call [env KVSTORE_TOKEN].")
@click.option("--tenants", "tenants_file", default=None, metavar="FILE",
              help="Tenants (TOML or JSON: name, token, namespace, quota per tier); "
                   "needs --token, which daemons and operators then use.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics here.")
@click.option("--metrics-host", default=None,
              help="Address the metrics port binds (default: --host).")
@click.option("--lease-ttl", default="10s", show_default=True, callback=_duration,
              help="Default read lease granted by get_replicas.")
@click.option("--node-ttl", default="10s", show_default=True, callback=_duration,
              help="Drop a node that has not heartbeated for this long.")
@click.option("--heartbeat-interval", default="1s", show_default=True, callback=_duration,
              help="Heartbeat interval the daemons are told to use.")
@click.option("--pending-timeout", default="30s", show_default=True, callback=_duration,
              help="Reclaim a put_start never ended by put_end/put_revoke after this long.")
@click.option("--high-watermark", default=0.95, show_default=True, type=float,
              help="Demote (or, in a node's last tier, evict) when a tier is fuller than "
                   "this fraction...")
@click.option("--low-watermark", default=0.85, show_default=True, type=float,
              help="... down to this fraction.")
@click.option("--move-timeout", default="30s", show_default=True, callback=_duration,
              help="Give up a tier move (free its destination) not acknowledged by then.")
@click.option("--commit-timeout", default="2s", show_default=True, callback=_duration,
              help="A put (or remove) waits this long for its replicas' daemons to "
                   "acknowledge the commit; a put not acknowledged fails, retryable. "
                   "0: do not wait (faster, not durable).")
@click.option("--client-commit/--no-client-commit", default=True, show_default=True,
              help="Writers commit their replicas on the daemons themselves, in parallel "
                   "with PutEnd (the master then answers PutEnd without waiting); off: the "
                   "master's push, which PutEnd waits for.")
@click.option("--reservation-ttl", default="10s", show_default=True, callback=_duration,
              help="Longest a writer's reservation (space granted ahead of its puts, "
                   "Reserve) lives before its unused space is taken back; 0: grant none.")
@click.option("--promote", default="on-hit", show_default=True,
              help="Promote objects read from SSD to DRAM: off, on-hit or after:N reads.")
@click.option("--max-batch", default=65536, show_default=True, type=int,
              help="Most keys one request may carry.")
@click.option("--max-changes-per-heartbeat", default=262144, show_default=True, type=int,
              help="Most object-table changes one heartbeat reply carries.")
@click.option("--grpc-mode", type=click.Choice(GRPC_MODES), default="aio",
              show_default=True,
              help="gRPC thread pool (faster single-key calls here), or grpc.aio.")
@click.option("--num-threads", default=8, show_default=True, type=int,
              help="Worker threads in --grpc-mode threads.")
@click.option("--fast-port", default=0, show_default=True, type=int,
              help="Port of the framed-TCP metadata path (same host); 0: pick a free port.")
@click.option("--no-fast-rpc", is_flag=True, default=False,
              help="Serve metadata over gRPC only (clients in metadata='auto' use gRPC).")
@click.option("--etcd", default=None, metavar="http://HOST:PORT",
              help="etcd to elect a leader in (master HA; with --cluster).")
@click.option("--cluster", default=None, metavar="NAME",
              help="Name of this master's cluster in etcd (with --etcd).")
@click.option("--election-ttl", default=3, show_default=True, type=int,
              help="Seconds of the leader's etcd lease: how long a dead leader holds on.")
@click.option("--takeover-wait", default="3s", show_default=True, callback=_duration,
              help="Longest a new leader waits for the daemons before it serves.")
@tls_options("server")
@click.option("--tls-daemon-ca", default=None, metavar="FILE",
              help="PEM CA bundle that verifies the daemons' data planes (commit pushes), "
                   "when it is not --tls-ca (server-only TLS with a private CA).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def command(host, port, advertise_host, token, tenants_file, metrics_port, metrics_host, lease_ttl, node_ttl,
            heartbeat_interval, pending_timeout, high_watermark, low_watermark, max_batch,
            max_changes_per_heartbeat, move_timeout, commit_timeout, client_commit,
            reservation_ttl, promote, grpc_mode,
            num_threads, fast_port, no_fast_rpc, etcd, cluster, election_ttl, takeover_wait,
            tls_ca, tls_cert, tls_key, tls_daemon_ca, log_level):
    """Run the metadata master."""
    logging.basicConfig(stream=sys.stderr, level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tenants = load_tenants(tenants_file) if tenants_file else ()
        config = MasterConfig(
            host=host, port=port, advertise_host=advertise_host,
            token=token or None,   # an empty KVSTORE_TOKEN: no token
            metrics_port=metrics_port, metrics_host=metrics_host,
            lease_ttl_s=lease_ttl, node_ttl_s=node_ttl, heartbeat_interval_s=heartbeat_interval,
            pending_timeout_s=pending_timeout, high_watermark=high_watermark,
            low_watermark=low_watermark, max_batch=max_batch,
            max_changes_per_heartbeat=max_changes_per_heartbeat, grpc_mode=grpc_mode,
            num_threads=num_threads, fast_port=None if no_fast_rpc else fast_port,
            move_timeout_s=move_timeout, commit_timeout_s=commit_timeout,
            client_commit=client_commit, reservation_ttl_s=reservation_ttl,
            promote=promote, etcd=etcd, cluster=cluster,
            election_ttl_s=election_ttl, takeover_wait_s=takeover_wait,
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, tls_daemon_ca=tls_daemon_ca,
            tenants=tenants)
        # NOTE: the master holds millions of long-lived metadata objects and makes no
        # reference cycles per key (dropped objects are freed by reference counting). The
        # default thresholds make the cycle collector rescan them all every few batches
        # (hundreds of ms of pause at 200k keys); rarer collections keep p99 latency flat.
        # Only the dedicated process does this, never the embedded mode inside a user's app.
        gc.set_threshold(100_000, 50, 100)
        gc.freeze()
        server = MasterServer(config)
        if grpc_mode == "aio":
            asyncio.run(_serve_aio(server))
        else:
            _serve_threads(server)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if server.election is not None and server.service.leadership.deposed_reason:
        # NOTE: a deposed leader exits rather than stand by with its stale tables; its
        # supervisor restarts it as a fresh standby (docs/OPERATIONS.md, Master HA).
        click.echo(f"stepped down: {server.service.leadership.deposed_reason}", err=True)
        sys.exit(DEPOSED_EXIT_STATUS)


#: Exit status of a master that stepped down as leader (EX_TEMPFAIL: restart me).
DEPOSED_EXIT_STATUS = 75


def _announce(server: MasterServer) -> None:
    config = server.config
    print(f"listening on {server.address}", flush=True)
    if server.fast_address is not None:
        print(f"fast metadata on {server.fast_address}", flush=True)
    warning = exposure_warning(config.host, token=config.token, tls=config.tls)
    if warning:
        log.warning("%s", warning)
    tls = "" if config.tls is None else (", mutual TLS" if config.tls.mutual else ", TLS")
    log.info("master %s listening on %s (%s mode%s%s)", server.state.master_id, server.address,
             config.grpc_mode, ", token required" if config.token else "", tls)
    if config.tenants:
        log.info("%d tenant(s): %s", len(config.tenants),
                 ", ".join(t.name for t in config.tenants))


async def _serve_aio(server: MasterServer) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server.on_deposed = lambda reason: loop.call_soon_threadsafe(stopping.set)
    await server.start_aio()
    _announce(server)
    await stopping.wait()
    log.info("stopping")
    await server.stop_aio()


def _serve_threads(server: MasterServer) -> None:
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.on_deposed = lambda reason: stopping.set()
    server.start_threads()
    _announce(server)
    while not stopping.wait(1.0):
        pass
    log.info("stopping")
    server.stop_threads()
