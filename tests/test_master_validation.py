"""Every request field is validated: precise statuses, per-item errors stay per item, and
nothing stored is touched by a bad request."""

from __future__ import annotations

import grpc
import pytest

import kvstore
from kvstore.master.config import MasterConfig
from kvstore.v1 import master_pb2 as pb
from master_helpers import MiB, embedded, exists, get, node_info, put, register  # noqa: F401


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.__cause__.code()


def test_bad_keys_and_sizes_are_per_item(embedded):
    m = embedded()
    register(m.client, "n1")
    keys = ["", "x" * 1025, "\U0001F600" * 256, "\U0001F600" * 257, "zero", "good"]
    reply = put(m.client, keys, [10, 10, 10, 10, 0, 10])
    assert list(reply.statuses) == [pb.ITEM_INVALID, pb.ITEM_INVALID, pb.ITEM_OK,
                                    pb.ITEM_INVALID, pb.ITEM_INVALID, pb.ITEM_OK]
    assert list(reply.error_messages) == [
        "key must not be empty", "key is longer than 1024 bytes of UTF-8", "",
        "key is longer than 1024 bytes of UTF-8", "size must be > 0", ""]
    assert exists(m.client, ["good", "\U0001F600" * 256]) == [True, True]
    got = get(m.client, ["good", "", "y" * 2000])
    assert list(got.statuses) == [pb.ITEM_OK, pb.ITEM_INVALID, pb.ITEM_INVALID]
    assert got.error_messages[1] == "key must not be empty"


@pytest.mark.parametrize("method,request_,message", [
    ("PutStart", pb.PutStartRequest(keys=["a", "b"], sizes=[1]), "parallel arrays differ"),
    ("PutStart", pb.PutStartRequest(keys=["a"], sizes=[1], replicas=17), "replicas must be"),
    ("PutStart", pb.PutStartRequest(keys=["a"], sizes=[1], preferred_tier=9),
     "unknown preferred_tier"),
    ("PutStart", pb.PutStartRequest(keys=["a"], sizes=[1], codec=7), "unknown codec"),
    ("PutStart", pb.PutStartRequest(keys=["a"], sizes=[1], client_id="c" * 300),
     "client_id is longer"),
    ("PutEnd", pb.PutEndRequest(keys=["a"], checksums=[1, 2]), "parallel arrays differ"),
    ("Exists", pb.ExistsRequest(keys=["ok", ""]), "keys[1]: key must not be empty"),
    ("MatchPrefix", pb.MatchPrefixRequest(keys=["z" * 1100]), "keys[0]: key is longer"),
    ("Pin", pb.PinRequest(keys=["a"], ttl_ms=0), "soft pin needs ttl_ms > 0"),
    ("Heartbeat", pb.HeartbeatRequest(node_id=""), "node_id must not be empty"),
    ("GetReplicas", pb.GetReplicasRequest(keys=["a"], lease_ttl_ms=3_600_001),
     "lease_ttl_ms must be <= 3600000"),
    ("RenewLease", pb.RenewLeaseRequest(keys=["a"], lease_ttl_ms=1 << 63), "lease_ttl_ms must"),
    ("PutStart", pb.PutStartRequest(keys=["a"], sizes=[1], soft_pin_ttl_ms=1 << 40),
     "soft_pin_ttl_ms must be <="),
    ("Pin", pb.PinRequest(keys=["a"], ttl_ms=1 << 40), "ttl_ms must be <="),
    ("GetReplicas", pb.GetReplicasRequest(keys=["a"], client_host_id="h" * 300),
     "client_host_id is longer"),
])
def test_structural_errors_fail_the_call_with_invalid_argument(embedded, method, request_,
                                                                message):
    m = embedded()
    register(m.client, "n1")
    put(m.client, ["kept"])
    with pytest.raises(kvstore.InvalidArgumentError, match=message.replace("[", r"\[")) as info:
        m.client.call(method, request_)
    assert _code(info) == grpc.StatusCode.INVALID_ARGUMENT
    assert exists(m.client, ["kept"]) == [True]
    assert m.client.call("Stats", pb.StatsRequest()).num_pending == 0


@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_batch_over_the_limit_names_the_limit(embedded, mode):
    m = embedded(max_batch=100, grpc_mode=mode)
    register(m.client, "n1")
    for method, request_ in [("PutStart", pb.PutStartRequest(keys=["k"] * 101, sizes=[1] * 101)),
                             ("GetReplicas", pb.GetReplicasRequest(keys=["k"] * 101)),
                             ("Exists", pb.ExistsRequest(keys=["k"] * 101)),
                             ("Remove", pb.RemoveRequest(keys=["k"] * 101))]:
        with pytest.raises(kvstore.InvalidArgumentError,
                           match="batch of 101 keys exceeds the maximum of 100"):
            m.client.call(method, request_)
    assert exists(m.client, ["k"] * 100) == [False] * 100


@pytest.mark.parametrize("mutate,message", [
    (lambda n: setattr(n, "node_id", ""), "node_id must not be empty"),
    (lambda n: setattr(n, "host_id", ""), "host_id must not be empty"),
    (lambda n: setattr(n, "data_addr", "nohostport"), "data_addr must be 'host:port'"),
    (lambda n: setattr(n, "data_addr", "h:99999"), "data_addr must be 'host:port'"),
    (lambda n: n.ClearField("segments"), "at least one segment"),
    (lambda n: n.segments.add(segment_id="dram0", tier=pb.TIER_DRAM, capacity_bytes=1),
     "duplicate segment_id"),
    (lambda n: setattr(n.segments[0], "tier", pb.TIER_UNSPECIFIED), "tier must be"),
    (lambda n: setattr(n.segments[0], "capacity_bytes", 0), "capacity_bytes must be > 0"),
    (lambda n: setattr(n.segments[0], "segment_id", ""), "segment_id must not be empty"),
])
def test_bad_registrations_are_refused(embedded, mutate, message):
    m = embedded()
    info = node_info("n1")
    mutate(info)
    with pytest.raises(kvstore.InvalidArgumentError, match=message):
        m.client.call("RegisterNode", pb.RegisterNodeRequest(node=info))
    assert m.client.call("ListNodes", pb.ListNodesRequest()).nodes == []


def test_unknown_node_heartbeat_says_unknown(embedded):
    m = embedded()
    reply = m.heartbeat("ghost")
    assert reply.known is False and reply.master_id == m.state.master_id


@pytest.mark.parametrize("fields,message", [
    ({"port": 70000}, "port must be in"),
    ({"lease_ttl_s": 0}, "lease_ttl_s must be > 0"),
    ({"heartbeat_interval_s": 10, "node_ttl_s": 5}, "heartbeat interval"),
    ({"low_watermark": 0.9, "high_watermark": 0.8}, "watermarks"),
    ({"max_batch": 0}, "max batch"),
    ({"grpc_mode": "fast"}, "grpc mode"),
    ({"token": "has space"}, "token"),
    ({"host": ""}, "host must not be empty"),
])
def test_config_validation(fields, message):
    with pytest.raises(kvstore.ConfigError, match=message):
        MasterConfig(**fields)


def test_every_config_field_has_its_cli_flag():
    import dataclasses
    from kvstore.master.cli import command
    flags = {opt for param in command.params for opt in param.opts}
    for field in dataclasses.fields(MasterConfig):
        name = field.name[:-2] if field.name.endswith("_s") else field.name
        assert f"--{name.replace('_', '-')}" in flags, field.name
