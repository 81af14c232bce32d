"""Prometheus metrics of the master, served on ``--metrics-port`` (same host as the master).

Exported: ``kvstore_master_rpc_total{method,transport}`` and
``kvstore_master_rpc_seconds{method,transport}`` (latency histogram; transport is ``grpc`` or
``fast``, the framed metadata path), and, read from the state at scrape time under the
master's lock:
``kvstore_master_objects``, ``kvstore_master_pending_objects``, ``kvstore_master_nodes``,
``kvstore_master_tier_replicas{tier}``, ``kvstore_master_tier_used_bytes{tier}``,
``kvstore_master_tier_capacity_bytes{tier}``, ``kvstore_master_hits_total``,
``kvstore_master_misses_total``, ``kvstore_master_evictions_total``; with tenants, per
tenant: ``kvstore_master_tenant_used_bytes{tenant,tier}``,
``kvstore_master_tenant_quota_bytes{tenant,tier}`` (tiers with a quota),
``kvstore_master_tenant_objects{tenant}``, ``kvstore_master_tenant_refused_total{tenant}``
(keys refused for the quota) and ``kvstore_master_tenant_rpc_total{tenant,method}``. Each
master has its own registry, so several embedded masters in one process do not collide.

NOTE: RPC counts and latencies are plain counters updated under the service lock (each call
already holds it) and turned into Prometheus families at scrape time: prometheus_client's
Counter + Histogram took their own locks and cost ~4.6 us per call, a tenth of a fast-path
round trip.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

from kvstore.master.nodes import tier_usage

_LATENCY_BUCKETS_S = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.1, 1.0)


class MasterMetrics:
    """Holds the registry; ``for_method(name, transport)`` gives the per-call recorder."""

    def __init__(self, service):
        self.registry = CollectorRegistry(auto_describe=True)
        # (method, transport) -> [num_calls, sum_s, per-bucket counts (last: over the top)]
        self._rpc_stats: dict[tuple[str, str], list] = {}
        self.registry.register(_StateCollector(service, self._rpc_stats))

    def for_method(self, method: str, transport: str = "grpc"):
        """The recorder of ``method``'s calls over ``transport``. Call it with the service
        lock held (it updates plain counters, read by the scrape under the same lock)."""
        stats = self._rpc_stats.setdefault((method, transport),
                                           [0, 0.0, [0] * (len(_LATENCY_BUCKETS_S) + 1)])
        bucket_counts = stats[2]

        def record(duration_s: float) -> None:
            stats[0] += 1
            stats[1] += duration_s
            bucket_counts[bisect_left(_LATENCY_BUCKETS_S, duration_s)] += 1
        return record


def _rpc_families(rpc_stats: dict[tuple[str, str], list]):
    calls = CounterMetricFamily("kvstore_master_rpc", "Master RPCs served",
                                labels=["method", "transport"])
    latency = HistogramMetricFamily("kvstore_master_rpc_seconds", "Master RPC latency",
                                    labels=["method", "transport"])
    for (method, transport), (num_calls, sum_s, bucket_counts) in sorted(rpc_stats.items()):
        calls.add_metric([method, transport], num_calls)
        cumulative, buckets = 0, []
        for bound, count in zip(_LATENCY_BUCKETS_S, bucket_counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        buckets.append(("+Inf", num_calls))
        latency.add_metric([method, transport], buckets, sum_s)
    return calls, latency


def _tenant_rows(book) -> list[tuple]:
    """A copy of each tenant's figures, taken under the lock."""
    if book is None:
        return []
    return [(u.tenant.name, dict(u.tier_to_used_bytes), dict(u.tenant.tier_to_quota_bytes),
             u.num_objects, u.num_refused, dict(u.method_to_calls))
            for u in book.usages.values()]


def _tenant_families(rows: list[tuple]):
    if not rows:
        return
    used = GaugeMetricFamily("kvstore_master_tenant_used_bytes",
                             "Bytes of a tenant's replicas per tier", labels=["tenant", "tier"])
    quota = GaugeMetricFamily("kvstore_master_tenant_quota_bytes", "A tenant's quota per tier",
                              labels=["tenant", "tier"])
    objects = GaugeMetricFamily("kvstore_master_tenant_objects",
                                "A tenant's objects (pending and complete)", labels=["tenant"])
    refused = CounterMetricFamily("kvstore_master_tenant_refused",
                                  "A tenant's keys refused for its quota", labels=["tenant"])
    calls = CounterMetricFamily("kvstore_master_tenant_rpc", "Master RPCs a tenant called",
                                labels=["tenant", "method"])
    for name, tier_to_used, tier_to_quota, num_objects, num_refused, method_to_calls in rows:
        for tier, num_bytes in sorted(tier_to_used.items()):
            used.add_metric([name, tier.label], num_bytes)
        for tier, num_bytes in sorted(tier_to_quota.items()):
            quota.add_metric([name, tier.label], num_bytes)
        objects.add_metric([name], num_objects)
        refused.add_metric([name], num_refused)
        for method, num_calls in sorted(method_to_calls.items()):
            calls.add_metric([name, method], num_calls)
    yield from (used, quota, objects, refused, calls)


class _StateCollector:
    def __init__(self, service, rpc_stats: dict[tuple[str, str], list]):
        self._service = service
        self._rpc_stats = rpc_stats

    def describe(self):
        return []

    def collect(self):
        service = self._service
        with service.lock:
            state = service.state
            usage = {tier.label: (u.num_replicas, u.used_bytes, u.capacity_bytes)
                     for tier, u in tier_usage(state.nodes.values()).items()}
            values = (len(state.objects), len(state.pending), len(state.nodes),
                      state.hits, state.misses, state.evictions)
            moves = (state.demotions, state.promotions, len(state.moves))
            rpc_stats = {key: [n, total, list(counts)]
                         for key, (n, total, counts) in self._rpc_stats.items()}
            tenants = _tenant_rows(state.tenants)
        yield from _rpc_families(rpc_stats)
        yield from _tenant_families(tenants)
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
        demotions, promotions, in_flight = moves
        yield CounterMetricFamily("kvstore_master_demotions",
                                  "Objects moved to a slower tier (copied and switched)",
                                  value=demotions)
        yield CounterMetricFamily("kvstore_master_promotions",
                                  "Objects moved to a faster tier (copied and switched)",
                                  value=promotions)
        yield GaugeMetricFamily("kvstore_master_moves_in_flight",
                                "Tier moves ordered and not yet acknowledged", value=in_flight)
