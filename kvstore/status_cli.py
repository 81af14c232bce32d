"""``kvstore status``: what a master knows, as a table (default) or JSON (``--json``): the
cluster's tiers, then each node's tiers with their counters (hits: reads served, counted on
an object's first listed replica; demotions: objects moved out to a slower tier; promotions:
moved in from a slower tier; evictions: dropped). A node's counters leave with it. On a
master with tenants, each tenant's usage per tier against its quota (all tenants with the
cluster token, only the caller's own with a tenant's token)."""

from __future__ import annotations

import json

import click

from kvstore._errors import KVStoreError
from kvstore._tls import TLSConfig
from kvstore._tls_options import tls_from_flags, tls_options
from kvstore._units import format_size


def fetch_status(address: str, token: str | None, timeout_s: float = 5.0,
                 tls: TLSConfig | None = None) -> dict:
    """Stats and node list of the master at ``address`` as plain data. Raises the
    ``kvstore`` error of the failed call (MasterUnavailableError, AuthenticationError, ...)."""
    from kvstore.rpc import grpc_client

    cluster = _cluster_status(address, timeout_s) if address.startswith("etcd://") else None
    with grpc_client(address, token=token, rpc_timeout_s=timeout_s, tls=tls) as client:
        stats = client.stats()
        nodes = client.list_nodes()
        served_by, epoch = client.address, client.epoch
    return {
        "address": served_by, "cluster": cluster, "epoch": epoch,
        "master_id": stats.master_id, "uptime_s": stats.uptime_s,
        "num_nodes": stats.num_nodes, "num_objects": stats.num_objects,
        "num_pending": stats.num_pending, "num_leased": stats.num_leased,
        "hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions,
        "metrics_port": stats.metrics_port, "max_batch": stats.max_batch,
        "fast_port": stats.fast_port,
        "tiers": [_tier_entry(t) for t in stats.tiers],
        "tenants": [{"name": t.name, "namespace": t.namespace, "num_objects": t.num_objects,
                     "num_refused": t.num_refused,
                     "tiers": [{"tier": _tier_name(tier), "used_bytes": used,
                                "quota_bytes": t.tier_to_quota_bytes.get(tier)}
                               for tier, used in sorted(t.tier_to_used_bytes.items(),
                                                        key=lambda item: item[0] or 0)]}
                    for t in stats.tenants],
        "nodes": [{"node_id": n.node_id, "host_id": n.host_id, "data_addr": n.data_addr,
                   "used_bytes": n.used_bytes, "reserved_bytes": n.reserved_bytes,
                   "num_objects": n.num_objects,
                   "last_heartbeat_age_s": round(n.last_heartbeat_age_s, 3),
                   "segments": [{"segment_id": s.segment_id, "tier": _tier_name(s.tier),
                                 "capacity_bytes": s.capacity_bytes} for s in n.segments],
                   "tiers": [_tier_entry(t) for t in n.tiers],
                   "nixl": _nixl_summary(n.node_id, n.nixl_metadata)}
                  for n in nodes],
    }


def _cluster_status(address: str, timeout_s: float) -> dict:
    """The leader (with its epoch) and the standbys of the etcd cluster ``address`` names."""
    from kvstore.ha.cluster import ClusterKeys, MasterSpec, read_members, wait_for_leader
    from kvstore.ha.etcd import EtcdClient

    spec = MasterSpec.parse(address)
    etcd, keys = EtcdClient(spec.etcd_url, timeout_s=min(timeout_s, 5.0)), ClusterKeys(spec.cluster)
    leader = wait_for_leader(etcd, keys, min_epoch=1, timeout_s=timeout_s)
    standbys = [m for m in read_members(etcd, keys) if m.master_id != leader.master_id]

    def entry(m):
        return {"master_id": m.master_id, "grpc": m.grpc_address, "fast": m.fast_address}

    return {"name": spec.cluster, "etcd": spec.etcd_url, "epoch": leader.epoch,
            "leader": entry(leader), "standbys": [entry(m) for m in standbys]}


def _tier_entry(t) -> dict:
    return {"tier": _tier_name(t.tier), "used_bytes": t.used_bytes,
            "capacity_bytes": t.capacity_bytes, "num_replicas": t.num_replicas,
            "hits": t.hits, "demotions": t.demotions, "promotions": t.promotions,
            "evictions": t.evictions}


def _nixl_summary(node_id: str, metadata: bytes) -> dict | None:
    """The node's NIXL agent (``daemon --nixl``): its name, backend and registered segments;
    None when it publishes none."""
    from kvstore.transport import nixl_meta

    info = nixl_meta.unpack(metadata, node_id)
    if info is None:
        return None
    return {"agent": info.agent_name, "backend": "UCX", "segments": sorted(info.segments)}


def _tier_name(tier) -> str:
    """How the table and the JSON name a tier: "HBM", "DRAM", "SSD" ("?" if unknown)."""
    return tier.name if tier is not None else "?"


def render_table(status: dict) -> str:
    lines = [f"master {status['master_id']} at {status['address']}, "
             f"up {status['uptime_s']:.1f} s, {status['num_nodes']} node(s), fast metadata "
             f"port {status['fast_port'] or 'off'}",
             f"objects {status['num_objects']} (pending {status['num_pending']}, leased "
             f"{status['num_leased']})  hits {status['hits']}  misses {status['misses']}  "
             f"evictions {status['evictions']}", ""]
    cluster = status.get("cluster")
    if cluster:
        standbys = ", ".join(f"{m['master_id']} at {m['grpc']}" for m in cluster["standbys"])
        lines[:0] = [f"cluster {cluster['name']} (etcd {cluster['etcd']}): leader "
                     f"{cluster['leader']['master_id']} at {cluster['leader']['grpc']}, epoch "
                     f"{cluster['epoch']}; standbys: {standbys or 'none'}"]
    lines += _columns([_TIER_HEADER] + [_tier_row("*", t) for t in status["tiers"]]) + [""]
    rows = [("NODE", "HOST", "DATA ADDR", "SEGMENTS", "USED", "RESERVED", "OBJECTS",
             "LAST HEARTBEAT", "NIXL")]
    for n in status["nodes"]:
        segments = ",".join(f"{s['tier']}:{format_size(s['capacity_bytes'])}"
                            for s in n["segments"])
        rows.append((n["node_id"], n["host_id"], n["data_addr"], segments,
                     format_size(n["used_bytes"]), format_size(n["reserved_bytes"]),
                     str(n["num_objects"]),
                     f"{n['last_heartbeat_age_s']:.1f} s ago",
                     f"{n['nixl']['backend']}:{','.join(n['nixl']['segments'])}"
                     if n["nixl"] else "-"))
    lines += _columns(rows)
    per_node = [_tier_row(n["node_id"], t) for n in status["nodes"] for t in n["tiers"]]
    if per_node:
        lines += ["", *_columns([_TIER_HEADER] + per_node)]
    tenant_rows = [(t["name"], t["namespace"] + "/", x["tier"], format_size(x["used_bytes"]),
                    "-" if x["quota_bytes"] is None else format_size(x["quota_bytes"]),
                    str(t["num_objects"]), str(t["num_refused"]))
                   for t in status["tenants"] for x in t["tiers"] or [_NO_TIER]]
    if tenant_rows:
        lines += ["", *_columns([("TENANT", "KEYS UNDER", "TIER", "USED", "QUOTA", "OBJECTS",
                                  "REFUSED")] + tenant_rows)]
    return "\n".join(lines)


_NO_TIER = {"tier": "-", "used_bytes": 0, "quota_bytes": None}


_TIER_HEADER = ("NODE", "TIER", "USED", "CAPACITY", "USE%", "OBJECTS", "HITS", "DEMOTIONS",
                "PROMOTIONS", "EVICTIONS")


def _tier_row(node: str, t: dict) -> tuple[str, ...]:
    use = 100.0 * t["used_bytes"] / t["capacity_bytes"] if t["capacity_bytes"] else 0.0
    return (node, t["tier"], format_size(t["used_bytes"]), format_size(t["capacity_bytes"]),
            f"{use:.1f}%", str(t["num_replicas"]), str(t["hits"]), str(t["demotions"]),
            str(t["promotions"]), str(t["evictions"]))


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


@click.command("status")
@click.option("--master", "address", required=True,
              help="HOST:PORT of the master, or etcd://HOST:PORT/CLUSTER (its leader).")
@click.option("--token", envvar="KVSTORE_TOKEN", default=None,
              help="The master's token [env KVSTORE_TOKEN].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, type=float,
              help="Seconds to wait for the master.")
@tls_options("client")
def command(address: str, token: str | None, as_json: bool, timeout_s: float,
            tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Show a master's nodes, tiers and counters."""
    try:
        status = fetch_status(address, token, timeout_s, tls_from_flags(tls_ca, tls_cert,
                                                                        tls_key))
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(status, indent=2) if as_json else render_table(status))
