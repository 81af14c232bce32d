"""The fast path's wire-form reads (``kvstore.master.wire``): ``parse_request`` reads a body
as protobuf does or declines it (None), ``KeyIndex.contains_batch`` answers the bytes
protobuf would, ``get_many`` of a KeyBatch is ``get_many`` of its keys, and a real master
answers Exists and GetReplicas over the fast path as over gRPC, for the requests the wire
form declines too (non-ASCII keys, bad keys, oversized batches)."""

from __future__ import annotations

import random

import pytest

import kvstore
from kvstore.master._keyindex import KeyBatch, KeyIndex, encode_get_replicas, parse_request
from kvstore.master.wire import WireReply, varint
from kvstore.v1 import master_pb2 as pb
from master_helpers import node_info
from raw_master import RawMaster
from servers import ServerProcess


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire_type) + payload


# -- parse_request ------------------------------------------------------------------------

def test_a_get_replicas_request_reads_like_the_message():
    message = pb.GetReplicasRequest(keys=["a", "bb", "", "k" * 300], lease_ttl_ms=2 ** 40,
                                    client_host_id="host-a", epoch=2 ** 64 - 1, shm_reads=True)
    batch = parse_request(message.SerializeToString())
    assert isinstance(batch, KeyBatch) and batch.keys is batch
    assert len(batch) == 4 and list(batch) == list(message.keys)
    assert (batch[0], batch[-1], batch[3]) == ("a", "k" * 300, "k" * 300)
    assert (batch.lease_ttl_ms, batch.client_host_id, batch.epoch, batch.shm_reads) == (
        2 ** 40, "host-a", 2 ** 64 - 1, True)
    with pytest.raises(IndexError):
        batch[4]
    empty = parse_request(memoryview(b""))      # any buffer; absent fields are their defaults
    assert (len(empty), empty.epoch, empty.lease_ttl_ms, empty.client_host_id,
            empty.shm_reads) == (0, 0, 0, "", False)


def test_unknown_fields_and_wrong_wire_types_are_skipped_as_protobuf_skips_them():
    body = (_field(1, 2, b"\x01x") + _field(7, 0, varint(5)) + _field(8, 1, b"\0" * 8)
            + _field(9, 5, b"\0" * 4) + _field(10, 2, b"\x03abc") + _field(120, 2, b"\x01z")
            + _field(1, 2, b"\x01y") + _field(120, 0, varint(9)) + _field(120, 0, varint(3)))
    expected = pb.ExistsRequest.FromString(body)
    batch = parse_request(body)
    assert list(batch) == list(expected.keys) == ["x", "y"]
    assert batch.epoch == expected.epoch == 3                     # the last one wins


@pytest.mark.parametrize("body", [
    pb.ExistsRequest(keys=["ok", "clé"]).SerializeToString(),          # non-ASCII key
    pb.GetReplicasRequest(keys=["ok"], client_host_id="hôte").SerializeToString(),
    _field(1, 2, b"\x05ab"),                                             # length past the end
    _field(1, 2, b"\x01\xff"),                                           # not UTF-8
    b"\x80",                                                             # truncated tag
    _field(120, 0, b"\xff" * 11),                                        # varint too long
    _field(3, 3, b"") + _field(3, 4, b""),                               # a group
    _field(0, 0, b"\x01"),                                               # field 0
    _field(9, 1, b"\0" * 7),                                             # truncated fixed64
])
def test_bodies_outside_the_plain_case_are_left_to_protobuf(body):
    assert parse_request(body) is None


def test_parse_request_refuses_what_is_not_a_buffer():
    with pytest.raises(TypeError):
        parse_request("not bytes")


# -- lookups --------------------------------------------------------------------------------

def _table(num_keys: int) -> tuple[KeyIndex, list[str]]:
    index = KeyIndex()
    keys = [f"bench/model-x/L32/xxh64v1/{i:016x}" for i in range(num_keys)]
    for i, key in enumerate(keys):
        index.set(key, i)
    index.set("ключ", -1)          # a non-ASCII stored key: never equal to ASCII text
    return index, keys


def test_contains_batch_answers_the_bytes_protobuf_would_and_names_the_missing_keys():
    index, keys = _table(5000)
    rng = random.Random(7)
    for size in (0, 1, 15, 16, 127, 128, 1024, 3000):
        batch_keys = [rng.choice(keys) if rng.random() < 0.7 else f"absent/{rng.random()}"
                      for _ in range(size)]
        batch_keys[size // 2:size // 2 + 1] = batch_keys[:1]      # a repeated key
        payload, missing = index.contains_batch(parse_request(
            pb.ExistsRequest(keys=batch_keys).SerializeToString()))
        expected = [key in set(keys) for key in batch_keys]
        assert payload == pb.ExistsResponse(exists=expected).SerializeToString()
        assert missing == [key for key, found in zip(batch_keys, expected) if not found]
    index.discard(keys[0])
    payload, missing = index.contains_batch(parse_request(
        pb.ExistsRequest(keys=[keys[0], keys[1]]).SerializeToString()))
    assert pb.ExistsResponse.FromString(payload).exists == [False, True]
    assert missing == [keys[0]]


def test_get_many_of_a_batch_is_get_many_of_its_keys():
    index, keys = _table(3000)
    batch_keys = random.Random(3).sample(keys, 500) + ["absent", ""]
    batch = parse_request(pb.GetReplicasRequest(keys=batch_keys).SerializeToString())
    assert index.get_many(batch) == index.get_many(batch_keys) == index.get_batch(batch)
    assert index.get_many(batch)[-2:] == [None, None]


def test_batch_lookups_refuse_what_is_not_a_batch():
    index, _ = _table(10)
    with pytest.raises(TypeError, match="KeyBatch"):
        index.contains_batch(["a"])
    with pytest.raises(TypeError, match="KeyBatch"):
        index.get_batch(["a"])


@pytest.mark.parametrize("epoch", [0, 1, 127, 128, 300, 2 ** 63, 2 ** 64 - 1])
def test_a_wire_reply_serializes_as_the_message_with_its_epoch(epoch):
    reply = WireReply(pb.ExistsResponse(exists=[True, False]).SerializeToString())
    reply.epoch = epoch
    assert reply.SerializeToString() == pb.ExistsResponse(
        exists=[True, False], epoch=epoch).SerializeToString()


@pytest.mark.parametrize("num_keys", [1, 2, 15, 16, 200, 1024])
def test_encode_get_replicas_writes_the_bytes_protobuf_writes(num_keys):
    rng = random.Random(num_keys)
    columns = ([rng.choice([65536, 1, 2 ** 40]) for _ in range(num_keys)],
               [rng.getrandbits(64) for _ in range(num_keys)],
               [rng.choice([0, 1, 2]) for _ in range(num_keys)],
               [rng.randrange(3) for _ in range(num_keys)],
               [rng.getrandbits(40) for _ in range(num_keys)])
    tables = pb.GetReplicasResponse(
        nodes=[pb.NodeRef(node_id="n", host_id="h", data_addr="127.0.0.1:1")],
        segments=[pb.SegmentRef(node_index=0, segment_id=f"d{i}", shm_name="/x")
                  for i in range(3)]).SerializeToString()
    sizes, checksums, codecs, segments, offsets = columns
    for lease_expires_in_s, lease_id in ((5.0, 7), (0.0, 0), (1e-3, 2 ** 63)):
        expected = pb.GetReplicasResponse(
            statuses=[pb.ITEM_OK] * num_keys, sizes=sizes, checksums=checksums, codecs=codecs,
            replica_start=range(num_keys), replica_count=[1] * num_keys,
            replica_segment=segments, replica_offset=offsets,
            lease_expires_in_s=lease_expires_in_s, lease_id=lease_id)
        expected.MergeFromString(tables)
        assert encode_get_replicas(*columns, tables, lease_expires_in_s,
                                   lease_id) == expected.SerializeToString()


@pytest.mark.parametrize("args, error", [
    ((["x"], [1], [1], [1], [1], b"", 1.0, 1), TypeError),           # not an int
    (([1], [1, 2], [1], [1], [1], b"", 1.0, 1), ValueError),         # columns differ
    (([1], [1], [2 ** 33], [1], [1], b"", 1.0, 1), ValueError),      # codec past uint32
    (([-1], [1], [1], [1], [1], b"", 1.0, 1), OverflowError),        # negative size
    (([], [], [], [], [], b"", 1.0, 1), ValueError),                 # no key
    (([1], [1], [1], [1], [1], "not bytes", 1.0, 1), TypeError),
])
def test_encode_get_replicas_refuses_bad_columns(args, error):
    with pytest.raises(error):
        encode_get_replicas(*args)


# -- a real master, both paths --------------------------------------------------------------

@pytest.fixture(scope="module")
def paths():
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                        "--max-batch", "2048"]) as server:
        with RawMaster.over_grpc(server.address) as over_grpc:
            fast_port = over_grpc.call("Stats", pb.StatsRequest()).fast_port
            with RawMaster.over_fast("127.0.0.1", fast_port) as over_fast:
                over_grpc.call("RegisterNode", pb.RegisterNodeRequest(node=node_info("n1")))
                over_grpc.call("RegisterNode", pb.RegisterNodeRequest(
                    node=node_info("n2", host_id="host-b")))
                keys = [f"w/{i}" for i in range(300)] + ["clé/1", "ключ/2"]
                over_grpc.call("PutStart", pb.PutStartRequest(keys=keys, sizes=[100] * len(keys),
                                                              client_id="w"))
                over_grpc.call("PutEnd", pb.PutEndRequest(keys=keys, client_id="w"))
                twice = [f"two/{i}" for i in range(20)]      # two replicas: the message path
                over_grpc.call("PutStart", pb.PutStartRequest(
                    keys=twice, sizes=[100] * len(twice), client_id="w", replicas=2))
                over_grpc.call("PutEnd", pb.PutEndRequest(keys=twice, client_id="w"))
                yield over_grpc, over_fast, keys


def _answer(client, method, request):
    try:
        reply = client.call(method, request)
    except kvstore.KVStoreError as exc:
        return type(exc).__name__, str(exc)
    if method == "GetReplicas":
        reply.ClearField("lease_id")
    return reply


@pytest.mark.parametrize("keys", [
    ["w/1"], ["w/1", "w/2", "nope", "w/299"] * 10, ["clé/1", "ключ/2", "w/3", "absent/é"],
    [f"w/{i}" for i in range(0, 300, 3)] + ["x" * 2000], ["w/5", ""], [],
    [f"w/{i % 300}" for i in range(2049)],                  # over --max-batch
    [f"two/{i}" for i in range(20)], ["w/7", "two/3", "w/8"], ["two/4"], ["w/9"],
])
def test_exists_and_get_replicas_answer_over_the_fast_path_as_over_grpc(paths, keys):
    over_grpc, over_fast, _ = paths
    for method, request in (("Exists", pb.ExistsRequest(keys=keys)),
                            ("GetReplicas", pb.GetReplicasRequest(
                                keys=keys, client_host_id="host-a", lease_ttl_ms=3000))):
        expected = _answer(over_grpc, method, request)
        assert _answer(over_fast, method, request) == expected, (method, keys[:4])


def test_exists_over_the_fast_path_finds_what_was_just_stored_and_removed(paths):
    over_grpc, over_fast, _ = paths
    keys = [f"fresh/{i}" for i in range(1024)]
    assert list(over_fast.call("Exists", pb.ExistsRequest(keys=keys)).exists) == [False] * 1024
    over_fast.call("PutStart", pb.PutStartRequest(keys=keys, sizes=[100] * 1024, client_id="f"))
    over_fast.call("PutEnd", pb.PutEndRequest(keys=keys[:512], client_id="f"))
    assert list(over_fast.call("Exists", pb.ExistsRequest(keys=keys)).exists) == (
        [True] * 512 + [False] * 512)       # the rest are PENDING: not there yet
    over_fast.call("Remove", pb.RemoveRequest(keys=keys[:256], force=True))
    assert list(over_fast.call("Exists", pb.ExistsRequest(keys=keys)).exists) == (
        [False] * 256 + [True] * 256 + [False] * 512)


def test_get_replicas_over_the_fast_path_counts_its_reads_and_grants_its_lease(paths):
    over_grpc, over_fast, keys = paths
    def hits() -> tuple[int, int]:      # the master's, and the segments' summed
        stats = over_grpc.call("Stats", pb.StatsRequest())
        return stats.hits, sum(tier.hits for tier in stats.tiers)

    hits_before = hits()
    reply = over_fast.call("GetReplicas", pb.GetReplicasRequest(keys=keys[:100],
                                                                lease_ttl_ms=60_000))
    assert list(reply.statuses) == [pb.ITEM_OK] * 100 and reply.lease_id != 0
    assert reply.lease_expires_in_s == 60.0
    assert hits() == (hits_before[0] + 100, hits_before[1] + 100)
    # the lease holds: a remove without force is refused until it is released
    removed = over_grpc.call("Remove", pb.RemoveRequest(keys=keys[:1]))
    assert list(removed.statuses) != [pb.ITEM_OK]
    over_grpc.call("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=[reply.lease_id]))


# -- the single-key reply (replies.ReplyEncoder._one_wire) -----------------------------------

def _twin_services():
    """Two masters' services in one state each, with the same node and objects: one is
    answered through the fast path's handler, the other through the message's."""
    from kvstore.master.config import MasterConfig
    from kvstore.master.service import MasterService
    from kvstore.master.state import MasterState

    services = []
    for _ in range(2):
        service = MasterService(MasterState(MasterConfig(), 0.0))
        service.RegisterNode(pb.RegisterNodeRequest(node=node_info("n1")), 0.0)
        service.RegisterNode(pb.RegisterNodeRequest(node=node_info("n2", host_id="h2")), 0.0)
        for keys, replicas in ((["a", "b", "c"], 1), (["two"], 2)):
            service.PutStart(pb.PutStartRequest(keys=keys, sizes=[100 + len(k) for k in keys],
                                                client_id="w", replicas=replicas), 0.0)
            service.PutEnd(pb.PutEndRequest(keys=keys, client_id="w"), 0.0)
        services.append(service)
    return services


def _holds(service, key):
    obj = service.state.objects.get(key)
    return (obj.last_used, obj.readers, obj.lease_until_s,
            sorted(segment.hits for segment, _ in obj.replicas))


@pytest.mark.parametrize("key", ["a", "c", "two"])
def test_a_one_key_get_replicas_answers_the_message_bytes_and_holds_as_before(key):
    wire_service, message_service = _twin_services()
    for now_s, ttl_ms in ((1.0, 0), (2.0, 7000), (2.5, 1000), (30.0, 0)):
        request = pb.GetReplicasRequest(keys=[key], lease_ttl_ms=ttl_ms)
        wire = wire_service.get_replicas_wire(parse_request(request.SerializeToString()),
                                              now_s)
        message = message_service.GetReplicas(request, now_s)
        if key == "two":                      # two replicas: the message, as before
            assert not isinstance(wire, WireReply)
        else:
            assert isinstance(wire, WireReply)
        # the same bytes but for the lease id, which is random per master
        got = pb.GetReplicasResponse.FromString(wire.SerializeToString())
        assert got.lease_id != 0 and message.lease_id != 0
        message.lease_id = got.lease_id
        assert wire.SerializeToString() == message.SerializeToString()
        # lease, LRU order and hit counts updated exactly as the message path does
        assert _holds(wire_service, key) == _holds(message_service, key)
        assert wire_service.state.use_count == message_service.state.use_count
        assert wire_service.state.hits == message_service.state.hits


def test_a_one_key_reply_row_made_stale_is_recomputed():
    wire_service, message_service = _twin_services()
    request = pb.GetReplicasRequest(keys=["b"])
    wire_service.get_replicas_wire(parse_request(request.SerializeToString()), 1.0)
    wire_service.replies.rows.forget()          # as after a RegisterNode that adopted
    obj = wire_service.state.objects.get("b")
    stale_row = obj.reply_row
    wire = wire_service.get_replicas_wire(parse_request(request.SerializeToString()), 2.0)
    assert obj.reply_row is not stale_row
    message_service.GetReplicas(request, 1.0)
    message = message_service.GetReplicas(request, 2.0)
    message.lease_id = pb.GetReplicasResponse.FromString(wire.SerializeToString()).lease_id
    assert wire.SerializeToString() == message.SerializeToString()


def test_a_one_key_get_replicas_of_a_missing_or_bad_key_answers_as_the_message():
    wire_service, message_service = _twin_services()
    for key in ("absent", "", "x" * 5000):
        request = pb.GetReplicasRequest(keys=[key])
        batch = parse_request(request.SerializeToString())
        try:
            wire = wire_service.get_replicas_wire(batch, 1.0).SerializeToString()
        except Exception as exc:                     # noqa: BLE001 (compared below)
            wire = (type(exc), str(exc))
        try:
            message = message_service.GetReplicas(request, 1.0).SerializeToString()
        except Exception as exc:                     # noqa: BLE001
            message = (type(exc), str(exc))
        assert wire == message, key
