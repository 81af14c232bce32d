"""Tenants (``kvstore master --tenants FILE``) on real master and daemon processes: each
tenant sees only its own keys, over the client and over both metadata paths; a tenant over
its quota fails alone; usage shows in ``kvstore status`` and the metrics; a bad tenants
file stops the master at start with a clear error."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import grpc
import pytest

import kvstore
from client_cluster import Cluster, payload
from raw_master import RawMaster
from servers import KVSTORE_BIN
from kvstore.v1 import master_pb2 as pb

CLUSTER_TOKEN = "cluster-secret"
QUOTA_BYTES = 1 << 20

TENANTS_TOML = f"""
[[tenant]]
name = "alpha"
token = "alpha-secret"
[tenant.quota]
dram = {QUOTA_BYTES}

[[tenant]]
name = "beta"
token = "beta-secret"
namespace = "team-b"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(TENANTS_TOML)
    cluster = Cluster(num_daemons=1, token=CLUSTER_TOKEN,
                      master_args=("--tenants", str(path), "--metrics-port", "0"))
    yield cluster
    cluster.close()


def _connect(cluster, token: str, **options) -> kvstore.KVStore:
    return kvstore.connect(cluster.address, token=token, **options)


def _fast_port(cluster) -> int:
    with RawMaster.over_grpc(cluster.address, token=CLUSTER_TOKEN) as raw:
        return raw.call("Stats", pb.StatsRequest()).fast_port


def _raw(cluster, path: str, token: str) -> RawMaster:
    if path == "grpc":
        return RawMaster.over_grpc(cluster.address, token=token)
    return RawMaster.over_fast("127.0.0.1", _fast_port(cluster), token=token)


def test_same_key_of_two_tenants_is_two_objects(cluster):
    value_a, value_b = payload(70_000, 1), payload(50_000, 2)
    with _connect(cluster, "alpha-secret", transport="tcp") as a, \
            _connect(cluster, "beta-secret") as b:
        a.put("chat/k1", value_a)
        b.put("chat/k1", value_b)
        b.put("chat/only-b", b"b")
        assert a.get("chat/k1") == value_a      # over tcp: the data token is accepted
        assert b.get("chat/k1") == value_b
        assert a.batch_exists(["chat/k1", "chat/only-b"]) == [True, False]
        assert b.match_prefix(["chat/k1", "chat/only-b"]) == 2
        assert a.match_prefix(["chat/k1", "chat/only-b"]) == 1
        with pytest.raises(kvstore.KeyNotFoundError):
            a.get("chat/only-b")
        # a tenant cannot escape its namespace by writing the other's prefix
        assert not a.exists("team-b/chat/only-b")
    # the cluster token sees the stored (namespaced) keys, as the daemons do
    with RawMaster.over_grpc(cluster.address, token=CLUSTER_TOKEN) as raw:
        reply = raw.call("Exists", pb.ExistsRequest(
            keys=["alpha/chat/k1", "team-b/chat/k1", "team-b/chat/only-b", "chat/k1"]))
        assert list(reply.exists) == [True, True, True, False]


@pytest.mark.parametrize("path", ["grpc", "fast"])
def test_a_tenant_cannot_read_or_remove_the_others_keys(cluster, path):
    key = f"secret-{path}"
    value = payload(30_000, 3)
    with _connect(cluster, "beta-secret") as b:
        b.put(key, value)
    with _raw(cluster, path, "alpha-secret") as raw:
        got = raw.call("GetReplicas", pb.GetReplicasRequest(keys=[key, f"team-b/{key}"]))
        assert list(got.statuses) == [pb.ITEM_NOT_FOUND, pb.ITEM_NOT_FOUND]
        assert not any(raw.call("Exists", pb.ExistsRequest(keys=[key])).exists)
        removed = raw.call("Remove", pb.RemoveRequest(keys=[key], force=True))
        assert list(removed.statuses) == [pb.ITEM_NOT_FOUND]
        by_prefix = raw.call("RemovePrefix", pb.RemovePrefixRequest(prefix="secret",
                                                                    force=True))
        assert by_prefix.num_removed == 0
        with pytest.raises(kvstore.InvalidArgumentError):       # would be "alpha/": all
            raw.call("RemovePrefix", pb.RemovePrefixRequest(prefix="", force=True))
        with pytest.raises(kvstore.AuthenticationError, match="daemons use the cluster"):
            raw.call("UnregisterNode", pb.UnregisterNodeRequest(node_id="any"))
    with _connect(cluster, "beta-secret") as b:
        assert b.get(key) == value                               # intact


@pytest.mark.parametrize("path", ["grpc", "fast"])
def test_an_unknown_token_is_refused(cluster, path):
    with pytest.raises(kvstore.AuthenticationError):
        with _raw(cluster, path, "no-such-tenant") as raw:
            raw.call("Stats", pb.StatsRequest())


def test_over_quota_fails_only_that_tenant_and_removal_releases(cluster):
    chunk = payload(300_000, 4)
    with _connect(cluster, "alpha-secret") as a, _connect(cluster, "beta-secret") as b:
        keys = [f"quota/{i}" for i in range(3)]
        assert a.batch_put(keys, [chunk] * 3) == [None] * 3
        with pytest.raises(kvstore.CapacityError, match="tenant 'alpha' over its quota"):
            a.put("quota/3", chunk)
        assert not a.exists("quota/3")
        # the other tenant, with no quota, is unaffected
        big = [f"big/{i}" for i in range(8)]
        assert b.batch_put(big, [chunk] * 8) == [None] * 8
        assert a.get("quota/0") == chunk                          # nothing of alpha lost
        assert a.remove("quota/0", force=True)
        a.put("quota/3", chunk)                                  # room again
        assert b.remove_prefix("big/", force=True) == 8
        status = _status(cluster, CLUSTER_TOKEN)
        alpha = {t["name"]: t for t in status["tenants"]}["alpha"]
        dram = {x["tier"]: x for x in alpha["tiers"]}["DRAM"]
        assert dram["quota_bytes"] == QUOTA_BYTES
        assert dram["used_bytes"] >= 3 * len(chunk)
        assert alpha["num_refused"] >= 1
        for key in keys[1:] + ["quota/3"]:
            assert a.remove(key, force=True)


def _status(cluster, token: str) -> dict:
    done = subprocess.run([str(KVSTORE_BIN), "status", "--master", cluster.address,
                           "--token", token, "--json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_shows_usage_per_tenant(cluster):
    with _connect(cluster, "beta-secret") as b:
        b.put("status/x", payload(10_000, 5))
        mine = b.stats()["master"]
        assert "data_token" not in mine
        assert [t["name"] for t in mine["tenants"]] == ["beta"]
        assert mine["tenants"][0]["tier_to_used_bytes"]["dram"] >= 10_000
        try:
            everyone = _status(cluster, CLUSTER_TOKEN)
            own = _status(cluster, "beta-secret")
        finally:
            b.remove("status/x", force=True)
    assert {t["name"] for t in everyone["tenants"]} == {"alpha", "beta"}
    assert [t["name"] for t in own["tenants"]] == ["beta"]
    beta = own["tenants"][0]
    assert beta["namespace"] == "team-b" and beta["num_objects"] >= 1
    assert {x["tier"]: x for x in beta["tiers"]}["DRAM"]["used_bytes"] >= 10_000
    table = subprocess.run([str(KVSTORE_BIN), "status", "--master", cluster.address,
                            "--token", CLUSTER_TOKEN], capture_output=True, text=True,
                           timeout=60).stdout
    assert "TENANT" in table and "team-b/" in table


def test_metrics_are_labelled_by_tenant(cluster):
    with _connect(cluster, "alpha-secret") as a:
        a.put("metrics/x", b"m" * 1000)
        with RawMaster.over_grpc(cluster.address, token=CLUSTER_TOKEN) as raw:
            port = raw.call("Stats", pb.StatsRequest()).metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        a.remove("metrics/x", force=True)
    text = text.decode()
    assert 'kvstore_master_tenant_quota_bytes{tenant="alpha",tier="dram"} 1.048576e+06' in text
    assert 'kvstore_master_tenant_rpc_total{method="PutStart",tenant="alpha"}' in text
    assert 'kvstore_master_tenant_used_bytes{tenant="beta",tier="dram"}' in text


def test_a_tenant_token_never_registers_a_node(cluster):
    with RawMaster.over_grpc(cluster.address, token="alpha-secret") as raw:
        with pytest.raises(kvstore.AuthenticationError, match="may not call RegisterNode"):
            raw.call("RegisterNode", pb.RegisterNodeRequest(node=pb.NodeInfo(
                node_id="rogue", host_id="h", data_addr="127.0.0.1:1")))
        stats = raw.call("Stats", pb.StatsRequest())
        assert stats.data_token and stats.data_token != CLUSTER_TOKEN
    with RawMaster.over_grpc(cluster.address, token=CLUSTER_TOKEN) as raw:
        assert raw.call("Stats", pb.StatsRequest()).data_token == ""
        assert "rogue" not in [n.node_id for n in
                               raw.call("ListNodes", pb.ListNodesRequest()).nodes]


BAD_FILES = [
    ("tenants.toml", '[[tenant]]\nname = "a"\ntoken = "t"\n[[tenant\n', "does not parse"),
    ("tenants.toml", '[[tenant]]\nname = "a"\n', "tenant #1 (a): 'token' must be"),
    ("tenants.toml", '[[tenant]]\nname = "a"\ntoken = "t"\n[[tenant]]\nname = "b"\n'
     'token = "t"\n', "tenant #2 (b) uses the token of tenant #1"),
    ("tenants.toml", '[[tenant]]\nname = "a"\ntoken = "t"\nnamespace = "x/y"\n',
     "'namespace' must be"),
    ("tenants.toml", '[[tenant]]\nname = "a"\ntoken = "t"\n[tenant.quota]\nnvme = "1GiB"\n',
     "quota of unknown tier 'nvme'"),
    ("tenants.toml", '[[tenant]]\nname = "a"\ntoken = "t"\n[tenant.quota]\ndram = "lots"\n',
     "tenant #1 (a): quota.dram: invalid size"),
    ("tenants.json", '{"tenant": [{"name": "a", "token": "t", "tokn": "x"}]}',
     "unknown field(s) ['tokn']"),
    ("tenants.json", '{"tenant": []}', "'tenant' must be a non-empty list"),
    ("tenants.toml", '[[tenant]]\nname = "a"\ntoken = "cluster-secret"\n',
     "must differ from the cluster token"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES)
def test_a_bad_tenants_file_is_refused_at_start(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    done = subprocess.run([str(KVSTORE_BIN), "master", "--port", "0", "--token",
                           CLUSTER_TOKEN, "--tenants", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "listening on" not in done.stdout
    assert message in done.stderr, done.stderr
    if "cluster token" not in message:
        assert f"tenants file {path}" in done.stderr


def test_tenants_without_a_cluster_token_are_refused(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text('[[tenant]]\nname = "a"\ntoken = "t"\n')
    done = subprocess.run([str(KVSTORE_BIN), "master", "--port", "0", "--tenants", str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "tenants need a cluster token" in done.stderr


def test_a_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text('[[tenant]]\nname = "a"\ntoken = t\n')
    done = subprocess.run([str(KVSTORE_BIN), "master", "--port", "0", "--token",
                           CLUSTER_TOKEN, "--tenants", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"tenants file {path}: does not parse" in done.stderr
    assert "line 3" in done.stderr


def test_an_open_master_and_a_single_token_behave_as_before():
    # NOTE: no tenants: Stats carries no tenant rows and no data token
    cluster = Cluster(num_daemons=1, token="only-token")
    try:
        with cluster.connect() as store:
            store.put("plain", b"v")
            assert store.get("plain") == b"v"
            assert store.stats()["master"]["tenants"] == []
        with RawMaster.over_grpc(cluster.address, token="only-token") as raw:
            stats = raw.call("Stats", pb.StatsRequest())
            assert not stats.tenants and not stats.data_token
            assert list(raw.call("Exists", pb.ExistsRequest(keys=["plain"])).exists) == [True]
        with pytest.raises(kvstore.AuthenticationError):
            kvstore.connect(cluster.address, token="wrong")
    finally:
        cluster.close()


def test_grpc_status_codes_of_a_tenant_refusal(cluster):
    """PERMISSION_DENIED for daemon RPCs, UNAUTHENTICATED for unknown tokens (raw gRPC)."""
    channel = grpc.insecure_channel(cluster.address)
    try:
        stub = channel.unary_unary("/kvstore.v1.Master/Heartbeat",
                                   request_serializer=pb.HeartbeatRequest.SerializeToString,
                                   response_deserializer=pb.HeartbeatResponse.FromString)
        with pytest.raises(grpc.RpcError) as denied:
            stub(pb.HeartbeatRequest(node_id="n"), timeout=30,
                 metadata=(("authorization", "Bearer alpha-secret"),))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as unknown:
            stub(pb.HeartbeatRequest(node_id="n"), timeout=30,
                 metadata=(("authorization", "Bearer nobody"),))
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()


@pytest.mark.parametrize("path", ["grpc", "fast"])
def test_a_tenant_cannot_release_the_others_leases(cluster, path):
    with _connect(cluster, "beta-secret") as b:
        b.put(f"leased-{path}", b"x" * 100)
    with _raw(cluster, path, "beta-secret") as beta, _raw(cluster, path, "alpha-secret") as alpha:
        got = beta.call("GetReplicas", pb.GetReplicasRequest(keys=[f"leased-{path}"],
                                                             lease_ttl_ms=600_000))
        assert got.lease_id
        # lease ids are sequential: another tenant can guess them, but not end them
        assert alpha.call("ReleaseLeases", pb.ReleaseLeasesRequest(
            lease_ids=[got.lease_id])).num_released == 0
        assert list(beta.call("Remove", pb.RemoveRequest(keys=[f"leased-{path}"])).statuses) \
            == [pb.ITEM_LEASED]
        assert beta.call("ReleaseLeases", pb.ReleaseLeasesRequest(
            lease_ids=[got.lease_id])).num_released == 1
        assert list(beta.call("Remove", pb.RemoveRequest(keys=[f"leased-{path}"])).statuses) \
            == [pb.ITEM_OK]
