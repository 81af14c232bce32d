"""The storage daemon: its segments, data-plane server and link to the master, wired together.

``Daemon.start`` creates the tier backends (``kvstore.daemon.backends``), binds the data
plane, registers with the master (the inventory holds the objects the SSD backend recovered
from its index) and starts heartbeats (the first one before it returns), in that order, so
that when it returns the node is serving, known and (unless that beat failed) holds its
location lease; DRAM pages are then allocated in the background. Each start draws a new
``incarnation``, so the master can tell a restarted daemon from the one it replaces.
``Daemon.stop`` unregisters, stops the data plane and releases the backends (shm names
unlinked; SSD files kept: they survive restarts). ``run_in_thread`` is the embedded mode
(``kvstore.local()``): the same code as ``kvstore daemon``, inside the caller's process.

Errors: ``start`` raises ConfigError for a configuration the host cannot satisfy (shm too
small, unusable SSD directory, no CUDA for --gpu, port in use) and MasterUnavailableError
when registration gives up (only with a ``register_timeout_s``); it cleans up whatever it
created before raising.
"""

from __future__ import annotations

import functools

import logging
import platform
import secrets
import threading
import time
from typing import Callable

from kvstore._advertise import advertised_host, loopback_warning
from kvstore._errors import ConfigError
from kvstore.daemon.config import DaemonConfig
from kvstore.daemon.dataplane import DataPlaneServer
from kvstore.daemon.write_guard import WriteGuard
from kvstore.daemon.backends import Backend, ShmBackend
from kvstore.transport.hostid import local_host_id

log = logging.getLogger("kvstore.daemon")
#: How often a daemon of an etcd cluster reads the leader key (``kvstore.ha.carrier``).
#: Machines whose store order the commit ring's publication relies on (kvstore/commit_ring.py).
RING_MACHINES = ("x86_64", "AMD64")
LEADER_WATCH_S = 0.2


class Daemon:
    """One storage node. Not reusable: ``start`` once, ``stop`` once (idempotent)."""

    def __init__(self, config: DaemonConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.node_id = config.node_id
        self.host_id = local_host_id()
        self._clock = clock
        self.incarnation = secrets.token_hex(8)
        self.segments: list[Backend] = []
        self.dataplane: DataPlaneServer | None = None
        self.master_link = None
        self.objects = None
        self._master_client = None
        self.reserved_puts = None   # WRITE_RESERVED's PutEnds (daemon/reserved_puts.py)
        self._metrics_server = None
        self._interrupted = threading.Event()
        self.address = ""            # the bound data-plane "host:port"
        self.advertised_address = ""  # what it registers (--advertise-host; see _advertise)
        self.nixl_agent = None      # daemon/nixl_agent.py, with config.nixl
        self.ring_drain = None      # daemon/ring_drain.py, with config.commit_ring

    def interrupt(self) -> None:
        """Make a ``start`` that is still retrying registration give up (signal-safe)."""
        self._interrupted.set()

    def start(self) -> str:
        """Create segments, serve, register; return the data-plane "host:port"."""
        try:
            # NOTE: before the reaper, which unlinks the tables (clients keep their mappings)
            from kvstore.daemon.shm_locations import retire_dead_tables
            retire_dead_tables()
            if self.config.reap_orphans:
                from kvstore.daemon.orphans import reap_orphans
                reap_orphans(self.config.ssd_dir)
            self.segments = self._create_segments()
            if self.config.nixl:
                from kvstore.daemon.nixl_agent import DaemonNixlAgent
                self.nixl_agent = DaemonNixlAgent(self.segments)
            self.guard = WriteGuard(self.node_id)
            self.dataplane = DataPlaneServer(
                self.segments, node_id=self.node_id, host=self.config.host,
                port=self.config.port, token=self.config.token, tls=self.config.tls,
                max_connections=self.config.max_connections,
                handshake_timeout_s=self.config.handshake_timeout_s, guard=self.guard)
            try:
                self.address = self.dataplane.start()
            except OSError as exc:
                raise ConfigError(f"cannot bind data plane to {self.config.host}:"
                                  f"{self.config.port}: {exc}") from exc
            self.advertised_address = self._advertised_address()
            if self.config.metrics_port is not None:
                from kvstore.daemon.metrics import start_metrics_server
                self._metrics_server = start_metrics_server(
                    self, self.config.metrics_host or self.config.host, self.config.metrics_port)
            if self.config.master_addr is not None:
                self._register()
        except BaseException:
            self.stop()
            raise
        for segment in self.segments:
            if isinstance(segment, ShmBackend):
                if self.config.prefault:
                    segment.allocate_in_background()
                segment.pin_with_cuda()
        log.info("node %s serving %s (%s)", self.node_id, self.address,
                 ", ".join(f"{s.segment_id}={s.tier}:{s.size_bytes}" for s in self.segments))
        return self.address

    def _register(self) -> None:
        # NOTE: imported here so that a standalone data plane needs no gRPC at all
        from kvstore.daemon import client_commits
        from kvstore.daemon.master_link import MasterLink
        from kvstore.daemon.objects import ObjectTable
        from kvstore.rpc import grpc_client

        # NOTE: a daemon of an etcd cluster polls the leader key (LEADER_WATCH_S): a new
        # leader waits for its daemons before it serves, so they must find it at once.
        self._master_client = grpc_client(self.config.master_addr, token=self.config.token,
                                          rpc_timeout_s=self.config.rpc_timeout_s,
                                          watch_s=LEADER_WATCH_S, tls=self.config.master_tls)
        self.objects = ObjectTable(self.segments, self.guard)
        from kvstore.daemon.objects import StoredObject
        for segment in self.segments:
            for entry in getattr(segment, "recovered", ()):
                self.objects.seed(entry.key, StoredObject(segment.segment_id, entry.offset,
                                                          entry.length, entry.checksum,
                                                          entry.codec))
        self.dataplane.on_commit = self.objects.apply_pushed
        objects, guard = self.objects, self.guard
        self.dataplane.on_client_commit = \
            lambda body, writer: client_commits.apply(objects, guard, body, writer)
        self.dataplane.on_write_commit = functools.partial(client_commits.apply_one, objects,
                                                           guard)
        from kvstore.daemon.reserved_puts import ReservedPuts
        self.reserved_puts = ReservedPuts(objects, guard, self._reserved_puts_master,
                                          timeout_s=self.config.rpc_timeout_s)
        self.dataplane.reserved_puts = self.reserved_puts
        self._open_commit_ring()
        from kvstore.daemon.location_reads import LocationReads
        location_reads = LocationReads(self.objects, clock=self._clock)
        location_reads.on_lease = self._publish_lease
        self.dataplane.location_reads = location_reads
        from kvstore.daemon.keyed_reads import KeyedReads
        self.dataplane.keyed_reads = KeyedReads(
            self.objects, location_reads, self.guard, {s.segment_id: s for s in self.segments},
            self.dataplane.send_from)
        self.master_link = MasterLink(self._master_client, self.node_spec(), self.objects,
                                      clock=self._clock, stop_event=self._interrupted,
                                      segments={s.segment_id: s for s in self.segments},
                                      guard=self.guard, location_reads=location_reads)
        on_change = getattr(self._master_client.carrier, "on_change", None)
        if on_change is not None:
            on_change(self.master_link.wake)
        self.master_link.register(timeout_s=self.config.register_timeout_s)
        self.master_link.start_heartbeats()

    def _reserved_puts_master(self):
        """A second client of this node's master for WRITE_RESERVED's PutEnds, on the fast
        metadata path where the master offers it.
        NOTE: not the heartbeat's gRPC client: a PutEnd on the fast path costs both ends
        less, and a put's PutEnd then never queues behind a long heartbeat resync."""
        from kvstore.rpc.connect import connect_master
        client, _ = connect_master(self.config.master_addr, token=self.config.token,
                                   rpc_timeout_s=self.config.rpc_timeout_s,
                                   tls=self.config.master_tls)
        return client

    def _open_commit_ring(self) -> None:
        """Create the commit ring (``--commit-ring``, with a DRAM segment) and wire its
        drain into the table and the data plane (daemon/ring_drain.py)."""
        if not self.config.commit_ring or \
                not any(isinstance(s, ShmBackend) for s in self.segments):
            return
        if platform.machine() not in RING_MACHINES:
            # NOTE: the ring's publication relies on x86-64's store order (commit_ring.py);
            # elsewhere writers send CLIENT_COMMIT frames, as with --no-commit-ring
            log.info("no commit ring on %s (needs x86-64 store order): shm puts commit with "
                     "a CLIENT_COMMIT frame", platform.machine())
            return
        from kvstore._posix_shm import unique_shm_name
        from kvstore.commit_ring import RingReader
        from kvstore.daemon.ring_drain import RingDrain

        try:
            ring = RingReader(unique_shm_name(f"kvstore-{self.node_id}"))
        except OSError as exc:
            raise ConfigError(f"cannot create the commit ring in /dev/shm: {exc}") from exc
        self.ring_drain = RingDrain(ring, self.objects, self.guard)
        self.objects.before_change = self.ring_drain.drain
        self.dataplane.before_write_check = self.ring_drain.drain
        self.ring_drain.start()

    def _advertised_address(self) -> str:
        """The data-plane address registered with the master (``kvstore._advertise``)."""
        host, chosen = advertised_host(self.config.host, self.config.advertise_host)
        address = (f"[{host}]" if ":" in host else host) + ":" + self.address.rpartition(":")[2]
        if address != self.address:
            log.info("registering data-plane address %s (%s; bound %s)", address, chosen,
                     self.address)
            if chosen.startswith("hostname") and (warning := loopback_warning(host)):
                log.warning("%s", warning)
        return address

    def node_spec(self):
        """This node as it registers with the master (``kvstore.rpc.NodeSpec``)."""
        from kvstore.rpc import NodeSpec, SegmentSpec

        return NodeSpec(node_id=self.node_id, host_id=self.host_id,
                        data_addr=self.advertised_address or self.address,
                        segments=[SegmentSpec(s.segment_id, s.tier, s.size_bytes, s.shm_name,
                                              s.path) for s in self.segments],
                        incarnation=self.incarnation,
                        nixl_metadata=self.nixl_agent.metadata if self.nixl_agent else b"",
                        commit_push=True, client_commit=True, batch_capabilities=True,
                        commit_ring=self.ring_drain.ring.name if self.ring_drain else "",
                        write_capabilities=self.config.write_capabilities,
                        read_capabilities=(self.config.write_capabilities
                                           and self.config.read_capabilities))

    def _publish_lease(self, until_s: float) -> None:
        """The location lease's end, to the shm location tables of the DRAM segments
        (daemon/shm_locations.py) in CLOCK_MONOTONIC nanoseconds; none when this daemon
        runs on another clock (an injected one: same-host clients could not compare)."""
        until_ns = (int(until_s * 1e9) if self._clock is time.monotonic
                    and until_s != float("-inf") else 0)
        for segment in self.segments:
            if isinstance(segment, ShmBackend) and segment.locations is not None:
                segment.locations.set_lease(until_ns)

    def _create_segments(self) -> list[Backend]:
        config = self.config
        segments: list[Backend] = []
        prefix = f"kvstore-{self.node_id}"
        try:
            if config.dram_bytes:
                try:
                    segments.append(ShmBackend("dram0", config.dram_bytes, name_prefix=prefix,
                                                prefault=config.prefault))
                except OSError as exc:
                    raise ConfigError(f"cannot create a {config.dram_bytes}-byte shared-memory "
                                      f"segment (is /dev/shm large enough?): {exc}") from exc
            if config.ssd_dir is not None:
                from kvstore.daemon.ssd import SsdBackend
                try:
                    segments.append(SsdBackend("ssd0", config.ssd_bytes,
                                               directory=config.ssd_dir, node_id=self.node_id,
                                               codec=config.ssd_codec))
                except OSError as exc:
                    raise ConfigError(f"cannot create the SSD segment in {config.ssd_dir!r}: "
                                      f"{exc}") from exc
            if config.gpu_device is not None:
                from kvstore.daemon.gpu import GpuBackend
                segments.append(GpuBackend("hbm0", config.gpu_bytes, device=config.gpu_device))
        except BaseException:
            for segment in segments:
                segment.close()
            raise
        return segments

    def stop(self) -> None:
        """Unregister, stop serving, release the segments. Idempotent; never raises."""
        # NOTE: first: unregistering drops this node's objects at the master, and a
        # same-host client must not serve them from its location cache after that
        self._publish_lease(float("-inf"))
        if self.master_link is not None:
            self.master_link.stop(unregister=True)
        if self._master_client is not None:
            self._master_client.close()
            self._master_client = None
        if self.reserved_puts is not None:
            self.reserved_puts.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.dataplane is not None:
            self.dataplane.stop()
        if self.nixl_agent is not None:
            # NOTE: before the segments: NIXL deregisters memory that must still be mapped
            self.nixl_agent.close()
            self.nixl_agent = None
        if self.ring_drain is not None:
            # NOTE: after the data plane and the link: nothing drains it any more
            self.ring_drain.stop()
            self.ring_drain.ring.close()
            self.ring_drain = None
        for segment in self.segments:
            segment.close()
        self.segments = []


class RunningDaemon:
    """A daemon serving inside this process (embedded mode). ``stop()`` is idempotent."""

    def __init__(self, daemon: Daemon):
        self._daemon = daemon
        self.address = daemon.address
        self.node_id = daemon.node_id
        self._lock = threading.Lock()

    @property
    def daemon(self) -> Daemon:
        return self._daemon

    def stop(self) -> None:
        with self._lock:
            self._daemon.stop()

    def __enter__(self) -> "RunningDaemon":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(config: DaemonConfig) -> RunningDaemon:
    """Start a daemon in this process; return once it serves (and is registered, if it has a
    master). Its data plane and heartbeats run on background daemon threads.

    Raises what ``Daemon.start`` raises, with everything it created released.
    """
    daemon = Daemon(config)
    daemon.start()
    return RunningDaemon(daemon)
