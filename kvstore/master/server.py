"""Running a master: the gRPC server (grpc.aio or a thread pool), the fast metadata server
(``fast_server``), the sweeper thread and the metrics endpoint around one ``MasterState``.

Resource handling: ``MasterServer`` owns its gRPC server, fast server, sweeper thread and
metrics HTTP server; ``stop`` closes them all. ``run_in_thread`` runs the same server in a
background thread with its own event loop (embedded mode) and returns once it is listening.

Error handling: a port that cannot be bound raises ``kvstore.ConfigError`` before anything
is served (SO_REUSEPORT is off, so a port in use is an error, not a silent share).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from kvstore._advertise import advertised_host, loopback_warning
from kvstore._errors import ConfigError
from kvstore.master.auth import AsyncTokenInterceptor, Authenticator, TokenInterceptor
from kvstore.master.clock import MonotonicClock
from kvstore.master.commits import CommitPusher
from kvstore.master.config import MasterConfig
from kvstore.master.fast_server import FastRpcServer
from kvstore.master.metrics import MasterMetrics
from kvstore.master.grpc_handlers import make_handlers
from kvstore.master.service import MasterService
from kvstore.master.state import MasterState
from kvstore.rpc.fast_frames import MAX_FRAME_BYTES

log = logging.getLogger("kvstore.master")

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.so_reuseport", 0),
]
#: How often the sweeper thread runs due sweeps while no request arrives.
SWEEPER_PERIOD_S = 0.1
STOP_GRACE_S = 1.0


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MasterServer:
    """One master process's server. Start with ``start_threads()`` or ``await start_aio()``
    according to ``config.grpc_mode``; then ``address`` is ``"host:port"``."""

    def __init__(self, config: MasterConfig, clock=None):
        self.config = config
        self.clock = clock or MonotonicClock()
        self.state = MasterState(config, self.clock.monotonic())
        self.authenticator = Authenticator(config.token, config.tenants)
        self.service = MasterService(self.state, data_token=self.authenticator.data_token)
        # NOTE: commit deadlines run on the real clock: they bound how long a daemon may take
        # to answer, which an injected (test) clock does not model
        self.service.commits = CommitPusher(self.state, self.service.lock, token=config.token,
                                            tls=config.daemon_tls)
        self.election = None     # set by ``_start_election`` with --etcd
        if config.etcd is not None:
            from kvstore.ha.leadership import Leadership
            self.service.leadership = Leadership(config.cluster,
                                                 takeover_wait_s=config.takeover_wait_s)
        #: called once (from the election thread) when this master steps down
        self.on_deposed = lambda reason: None
        self.metrics = MasterMetrics(self.service)
        self.address: str | None = None
        self._grpc_server = None
        self._metrics_server = None
        self._fast_server: FastRpcServer | None = None
        self.fast_address: str | None = None  # "host:port" of the fast path; None when off
        self._stop_sweeper = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="kvstore-master-sweeper",
                                         daemon=True)

    def _bind(self, server) -> None:
        target = format_address(self.config.host, self.config.port)
        tls = self.config.tls
        try:
            port = (server.add_secure_port(target, tls.grpc_server_credentials())
                    if tls is not None else server.add_insecure_port(target))
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind the master to {target}: {exc}") from exc
        if not port:
            raise ConfigError(f"cannot bind the master to {target}")
        self.address = format_address(self.config.host, port)

    def _start_side_services(self) -> None:
        if self.config.metrics_port is not None:
            from prometheus_client import start_http_server
            metrics_host = self.config.metrics_host or self.config.host
            try:
                self._metrics_server, _ = start_http_server(
                    self.config.metrics_port, addr=metrics_host,
                    registry=self.metrics.registry)
            except OSError as exc:
                raise ConfigError(f"cannot bind the metrics port {self.config.metrics_port} "
                                  f"on {metrics_host}: {exc}") from exc
            self.service.metrics_port = self._metrics_server.server_port
            log.info("metrics on %s", format_address(metrics_host, self.service.metrics_port))
        if self.config.fast_port is not None:
            fast = FastRpcServer(self.service, self.clock, self.metrics, host=self.config.host,
                                 port=self.config.fast_port,
                                 authenticator=self.authenticator, tls=self.config.tls)
            try:
                self.service.fast_port = fast.start()
            except OSError as exc:
                raise ConfigError(f"cannot bind the fast metadata port {self.config.fast_port} "
                                  f"on {self.config.host}: {exc}") from exc
            self._fast_server = fast
            self.fast_address = format_address(self.config.host, fast.port)
        self._sweeper.start()
        if self.service.leadership is not None:
            self._start_election()

    def _start_election(self) -> None:
        """Join the cluster in etcd and campaign (``kvstore.ha.election``); the service
        answers UNAVAILABLE until this master is elected and has taken over."""
        from kvstore.ha.cluster import ClusterKeys, MasterInfo
        from kvstore.ha.election import Election
        from kvstore.ha.etcd import EtcdClient

        def node_ids():
            with self.service.lock:
                return list(self.state.nodes)

        host, chosen = advertised_host(self.config.host, self.config.advertise_host)
        port = self.address.rpartition(":")[2]
        fast = self.fast_address.rpartition(":")[2] if self.fast_address else None
        info = MasterInfo(self.state.master_id, format_address(host, int(port)),
                          format_address(host, int(fast)) if fast else None)
        log.info("publishing %s in etcd (%s)", info.grpc_address, chosen)
        if chosen.startswith("hostname") and (warning := loopback_warning(host)):
            log.warning("%s", warning)
        self.election = Election(EtcdClient(self.config.etcd), ClusterKeys(self.config.cluster),
                                 info, self.service.leadership,
                                 lease_ttl_s=self.config.election_ttl_s, node_ids=node_ids,
                                 on_deposed=lambda reason: self.on_deposed(reason))
        self.service.on_registered = self.election.publish_nodes
        self.election.start()

    def _sweep_loop(self) -> None:
        service, state, clock = self.service, self.state, self.clock
        while not self._stop_sweeper.wait(SWEEPER_PERIOD_S):
            try:
                with service.lock:
                    state.touched.clear()
                    num_nodes = len(state.nodes)
                    state.maybe_sweep(clock.monotonic())
                    needs = {node: node.seq for node in state.touched}
                    state.touched.clear()
                    dropped = len(state.nodes) != num_nodes
                if needs:        # evictions of a pressure pass: to the daemons at once
                    service.commits.kick(needs)
                if dropped:
                    service.commits.forget()
            except Exception:  # a bug here must not stop liveness checks for good
                log.exception("sweep failed")

    def _interceptors(self, asynchronous: bool):
        if self.config.token is None:
            return ()
        return ((AsyncTokenInterceptor if asynchronous else TokenInterceptor)(
            self.authenticator),)

    def start_threads(self) -> str:
        server = grpc.server(ThreadPoolExecutor(self.config.num_threads),
                             interceptors=self._interceptors(False), options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((make_handlers(
            self.service, self.clock, self.metrics, asynchronous=False,
            authenticator=self.authenticator),))
        self._bind(server)
        self._start_side_services()
        server.start()
        self._grpc_server = server
        return self.address

    async def start_aio(self) -> str:
        server = grpc.aio.server(interceptors=self._interceptors(True), options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((make_handlers(
            self.service, self.clock, self.metrics, asynchronous=True,
            authenticator=self.authenticator),))
        self._bind(server)
        self._start_side_services()
        await server.start()
        self._grpc_server = server
        return self.address

    def _stop_side_services(self) -> None:
        if self.election is not None:
            self.election.stop()
        if self._fast_server is not None:
            self._fast_server.stop()
        self._stop_sweeper.set()
        if self._sweeper.is_alive():
            self._sweeper.join()
        self.service.commits.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def stop_threads(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop(STOP_GRACE_S).wait()
        self._stop_side_services()

    async def stop_aio(self) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(STOP_GRACE_S)
        self._stop_side_services()


class RunningMaster:
    """A master serving from a background thread. ``address`` is ``"host:port"``;
    ``stop()`` shuts it down and joins the thread (idempotent)."""

    def __init__(self, server: MasterServer):
        self.server = server
        self.address = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def state(self) -> MasterState:
        return self.server.state

    def _run_aio(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve_aio())
        finally:
            loop.close()

    async def _serve_aio(self) -> None:
        self._stopping = asyncio.Event()
        try:
            self.address = await self.server.start_aio()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopping.wait()
        await self.server.stop_aio()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread is None:
            self.server.stop_threads()
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()

    def __enter__(self) -> "RunningMaster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(config: MasterConfig, clock=None) -> RunningMaster:
    """Start a master in this process and return once it listens (embedded mode).

    ``clock``: an object with ``monotonic()`` (default: the real clock); tests pass a
    ``ManualClock``. Raises ``kvstore.ConfigError`` if the address cannot be bound.
    """
    running = RunningMaster(MasterServer(config, clock))
    if config.grpc_mode == "threads":
        running.address = running.server.start_threads()
        return running
    running._thread = threading.Thread(target=running._run_aio, name="kvstore-master",
                                       daemon=True)
    running._thread.start()
    running._ready.wait()
    if running._error is not None:
        running._thread.join()
        raise running._error
    return running
