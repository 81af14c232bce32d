"""Decoding master replies into Targets, and key validation, on the client side."""

from __future__ import annotations

import pytest

from kvstore import InvalidArgumentError, KVStoreError
from kvstore.client.key_checks import check_key, check_keys
from kvstore.rpc.messages import decode_targets
from kvstore.transport.base import Target
from kvstore.v1 import master_pb2


def _reply(**overrides):
    reply = master_pb2.GetReplicasResponse(
        statuses=[master_pb2.ITEM_OK, master_pb2.ITEM_NOT_FOUND, master_pb2.ITEM_OK],
        sizes=[10, 0, 20],
        replica_start=[0, 0, 1], replica_count=[1, 0, 2],
        replica_segment=[1, 0, 1], replica_offset=[64, 0, 128],
        nodes=[master_pb2.NodeRef(node_id="n0", host_id="h0", data_addr="127.0.0.1:1"),
               master_pb2.NodeRef(node_id="n1", host_id="h1", data_addr="127.0.0.1:2")],
        segments=[master_pb2.SegmentRef(node_index=0, segment_id="s0", shm_name="/a"),
                  master_pb2.SegmentRef(node_index=1, segment_id="s1", shm_name="")])
    for name, value in overrides.items():
        field = getattr(reply, name)
        del field[:]
        field.extend(value)
    return reply


def test_replica_slices_and_tables_resolve_to_targets():
    reply = _reply()
    targets = decode_targets(reply, reply.sizes, [True, False, True])
    assert targets[0] == [Target("n1", "h1", "127.0.0.1:2", "s1", "", 64, 10)]
    assert targets[1] == []
    assert targets[2] == [Target("n0", "h0", "127.0.0.1:1", "s0", "/a", 0, 20),
                          Target("n1", "h1", "127.0.0.1:2", "s1", "", 128, 20)]


@pytest.mark.parametrize("overrides, match", [
    ({"replica_segment": [1, 0, 5]}, "segment 5"),
    ({"replica_count": [1, 0, 9]}, "replica slice"),
    ({"replica_start": [0]}, "no replica slice"),
    ({"replica_offset": [0]}, "differ in length"),
])
def test_malformed_replies_raise_instead_of_guessing(overrides, match):
    reply = _reply(**overrides)
    with pytest.raises(KVStoreError, match=match):
        decode_targets(reply, [10, 0, 20], [True, False, True])


def test_segment_naming_a_missing_node_raises():
    reply = _reply()
    reply.segments[0].node_index = 7
    with pytest.raises(KVStoreError, match="node index 7"):
        decode_targets(reply, [10, 0, 20], [True, False, True])


@pytest.mark.parametrize("key", ["a", "x" * 1024, "é" * 512, "prefix/模型/0"])
def test_good_keys_pass(key):
    assert check_key(key) == key


@pytest.mark.parametrize("key, match", [
    ("", "empty"), (b"bytes", "str"), (12, "str"), (None, "str"),
    ("x" * 1025, "more than 1024"), ("é" * 513, "more than 1024"), ("\ud800", "UTF-8"),
])
def test_bad_keys_raise_invalid_argument(key, match):
    with pytest.raises(InvalidArgumentError, match=match):
        check_key(key)


@pytest.mark.parametrize("keys", ["abc", b"abc", None, {"a"}, 5])
def test_key_batches_must_be_lists(keys):
    with pytest.raises(InvalidArgumentError, match="list or tuple"):
        check_keys(keys)
