"""Prometheus metrics of a daemon, served on ``--metrics-port`` (bound to the daemon's host).

Exported, read at scrape time: ``kvstore_daemon_connections_total``,
``kvstore_daemon_reads_total``, ``kvstore_daemon_writes_total``,
``kvstore_daemon_errors_total`` (refused or malformed requests, wrong tokens),
``kvstore_daemon_read_bytes_total``, ``kvstore_daemon_written_bytes_total``,
``kvstore_daemon_segment_capacity_bytes{segment,tier}`` and ``kvstore_daemon_objects`` (size
of the local object table). Each daemon has its own registry, so several embedded daemons in
one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvstore._errors import ConfigError


class _DaemonCollector:
    def __init__(self, daemon):
        self._daemon = daemon

    def describe(self):
        return []

    def collect(self):
        daemon = self._daemon
        stats = daemon.dataplane.stats if daemon.dataplane is not None else None
        if stats is not None:
            for name, value, text in (
                    ("connections", stats.num_connections, "Data-plane connections accepted"),
                    ("reads", stats.num_reads, "READ requests served"),
                    ("writes", stats.num_writes, "WRITE requests served"),
                    ("write_checks", stats.num_write_checks,
                     "Ranges write-checked (capability checks before NIXL writes)"),
                    ("write_check_requests", stats.num_check_requests,
                     "CHECK_WRITE and CHECK_WRITES requests (one per range or per batch)"),
                    ("errors", stats.num_errors, "Requests refused or malformed"),
                    ("read_bytes", stats.bytes_read, "Bytes sent to clients"),
                    ("written_bytes", stats.bytes_written, "Bytes received from clients")):
                yield CounterMetricFamily(f"kvstore_daemon_{name}", text, value=value)
        capacity = GaugeMetricFamily("kvstore_daemon_segment_capacity_bytes",
                                     "Capacity of each segment", labels=["segment", "tier"])
        for segment in daemon.segments:
            capacity.add_metric([segment.segment_id, segment.tier.label], segment.size_bytes)
        yield capacity
        used = GaugeMetricFamily("kvstore_daemon_segment_used_bytes",
                                 "Bytes of the objects each segment holds",
                                 labels=["segment", "tier"])
        for segment in daemon.segments:
            used.add_metric([segment.segment_id, segment.tier.label], segment.used_bytes)
        yield used
        drain = daemon.ring_drain
        if drain is not None and drain.ring.layout is not None:
            for name, value, text in (
                    ("ring_records", drain.ring.num_records,
                     "Commit-ring records applied (same-host puts' commits)"),
                    ("ring_torn", drain.ring.num_torn,
                     "Commit-ring records dropped as torn (length or CRC did not check)"),
                    ("ring_refused", drain.num_refused,
                     "Commit-ring entries refused by the commit checks (never applied)")):
                yield CounterMetricFamily(f"kvstore_daemon_{name}", text, value=value)
        location_reads = getattr(daemon.dataplane, "location_reads", None)
        if location_reads is not None:
            for name, value, text in (
                    ("location_reads", location_reads.num_served,
                     "CHECKED_READs served (clients' location-cache hits)"),
                    ("location_reads_refused", location_reads.num_refused,
                     "CHECKED_READs refused: no location lease, or not that object")):
                yield CounterMetricFamily(f"kvstore_daemon_{name}", text, value=value)
        keyed_reads = getattr(daemon.dataplane, "keyed_reads", None)
        if keyed_reads is not None:
            for name, value, text in (
                    ("keyed_reads", keyed_reads.num_served,
                     "KEYED_READs served (clients' first gets at the key's home node)"),
                    ("keyed_reads_refused", keyed_reads.num_refused,
                     "KEYED_READs refused: not here, no lease, capability, too large"),
                    ("keyed_reads_located", keyed_reads.num_located,
                     "KEYED_READs of large objects answered with their location (of "
                     "keyed_reads)")):
                yield CounterMetricFamily(f"kvstore_daemon_{name}", text, value=value)
        objects = daemon.objects
        yield GaugeMetricFamily("kvstore_daemon_objects", "Objects in the local table",
                                value=len(objects) if objects is not None else 0)


def start_metrics_server(daemon, host: str, port: int):
    """Serve /metrics on host:port in a thread; return the server (``.shutdown()`` stops it).

    Raises ConfigError when the port cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_DaemonCollector(daemon))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    return server
