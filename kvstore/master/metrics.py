"""Prometheus metrics of the master, served on ``--metrics-port`` (same host as the master).

Exported: ``kvstore_master_rpc_total{method,transport}`` and
``kvstore_master_rpc_seconds{method,transport}`` (latency histogram; transport is ``grpc`` or
``fast``, the framed metadata path), and, read from the state at scrape time under the master's lock:
``kvstore_master_objects``, ``kvstore_master_pending_objects``, ``kvstore_master_nodes``,
``kvstore_master_tier_replicas{tier}``, ``kvstore_master_tier_used_bytes{tier}``,
``kvstore_master_tier_capacity_bytes{tier}``, ``kvstore_master_hits_total``,
``kvstore_master_misses_total``, ``kvstore_master_evictions_total``. Each master has its own
registry, so several embedded masters in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvstore.v1 import master_pb2 as pb

_LATENCY_BUCKETS_S = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.1, 1.0)


class MasterMetrics:
    """Holds the registry; ``for_method(name)`` gives the per-call recorder."""

    def __init__(self, service):
        self.registry = CollectorRegistry(auto_describe=True)
        self._calls = Counter("kvstore_master_rpc", "Master RPCs served", ["method", "transport"],
                              registry=self.registry)
        self._latency = Histogram("kvstore_master_rpc_seconds", "Master RPC latency",
                                  ["method", "transport"], buckets=_LATENCY_BUCKETS_S,
                                  registry=self.registry)
        self.registry.register(_StateCollector(service))

    def for_method(self, method: str, transport: str = "grpc"):
        count = self._calls.labels(method, transport).inc
        observe = self._latency.labels(method, transport).observe

        def record(duration_s: float) -> None:
            count()
            observe(duration_s)
        return record


class _StateCollector:
    def __init__(self, service):
        self._service = service

    def describe(self):
        return []

    def collect(self):
        service = self._service
        with service.lock:
            state = service.state
            usage: dict[str, list[int]] = {}
            for node in state.nodes.values():
                for segment in node.segments.values():
                    entry = usage.setdefault(pb.Tier.Name(segment.tier)[5:].lower(), [0, 0, 0])
                    entry[0] += segment.num_replicas
                    entry[1] += segment.allocator.used_bytes
                    entry[2] += segment.allocator.capacity_bytes
            values = (len(state.objects), len(state.pending), len(state.nodes),
                      state.hits, state.misses, state.evictions)
        objects, pending, nodes, hits, misses, evictions = values
        yield GaugeMetricFamily("kvstore_master_objects", "COMPLETE objects", value=objects)
        yield GaugeMetricFamily("kvstore_master_pending_objects", "PENDING objects",
                                value=pending)
        yield GaugeMetricFamily("kvstore_master_nodes", "Registered live nodes", value=nodes)
        for name, index, help_text in (("replicas", 0, "Replicas stored per tier"),
                                       ("used_bytes", 1, "Allocated bytes per tier"),
                                       ("capacity_bytes", 2, "Capacity per tier")):
            family = GaugeMetricFamily(f"kvstore_master_tier_{name}", help_text,
                                       labels=["tier"])
            for tier, entry in sorted(usage.items()):
                family.add_metric([tier], entry[index])
            yield family
        yield CounterMetricFamily("kvstore_master_hits", "Keys found by get_replicas",
                                  value=hits)
        yield CounterMetricFamily("kvstore_master_misses", "Keys not found by get_replicas",
                                  value=misses)
        yield CounterMetricFamily("kvstore_master_evictions", "Objects evicted",
                                  value=evictions)
