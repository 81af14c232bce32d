"""Bad input and misuse of KVStore: clear errors, and nothing stored is lost or corrupted.

Runs against ``kvstore.local()``: a real master and daemon inside the test process, reached
through the same gRPC and transports as a separate cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvstore
from kvstore import (AuthenticationError, ClosedError, InvalidArgumentError, KeyNotFoundError,
                     KVStoreError, MasterUnavailableError)

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def store():
    store = kvstore.local(dram="64MiB", token=TOKEN)
    yield store
    store.close()


@pytest.fixture
def kept(store, request):
    """An object that every test checks is still intact afterwards."""
    key, data = f"kept/{request.node.name}", bytes(range(256)) * 40
    store.put(key, data)
    yield key
    assert store.get(key) == data


@pytest.mark.parametrize("key", ["", "x" * 1025, 7, None, b"bytes"])
def test_bad_keys_are_rejected_by_every_method(store, kept, key):
    for call in (lambda: store.put(key, b"v"), lambda: store.get(key),
                 lambda: store.get_into(key, bytearray(4)), lambda: store.exists(key),
                 lambda: store.remove(key), lambda: store.match_prefix([key])):
        with pytest.raises(InvalidArgumentError):
            call()


def test_a_bad_item_fails_alone_in_a_batch(store, kept):
    results = store.batch_put(["batch/ok1", "", "batch/ok2", "batch/bad"],
                              [b"one", b"x", np.arange(3, dtype=np.int16), "not bytes"])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], InvalidArgumentError)
    assert isinstance(results[3], InvalidArgumentError) and results[3].keys == ["batch/bad"]
    assert store.get("batch/ok1") == b"one"
    assert store.get("batch/ok2") == np.arange(3, dtype=np.int16).tobytes()
    assert not store.exists("batch/bad")


@pytest.mark.parametrize("keys, values", [
    (["a", "b"], [b"1"]), ("ab", [b"1", b"2"]), (["a"], b"1"), (None, []),
])
def test_malformed_batches_raise(store, keys, values):
    with pytest.raises(InvalidArgumentError):
        store.batch_put(keys, values)


@pytest.mark.parametrize("replicas", [0, -1, 1.5, True, "2"])
def test_bad_replica_counts_raise(store, replicas):
    with pytest.raises(InvalidArgumentError, match="replicas"):
        store.put("replicas/bad", b"v", replicas=replicas)
    assert not store.exists("replicas/bad")


def test_more_replicas_than_nodes_is_a_clear_error(store):
    with pytest.raises(KVStoreError) as info:
        store.put("replicas/three", b"v", replicas=3)
    assert "replicas/three" in str(info.value)
    assert not store.exists("replicas/three")


def test_too_small_or_read_only_out_raises_and_writes_nothing(store, kept):
    small = bytearray(b"\xaa" * 100)
    with pytest.raises(InvalidArgumentError, match="out has 100 bytes"):
        store.get_into(kept, small)
    assert small == b"\xaa" * 100
    with pytest.raises(InvalidArgumentError, match="read-only"):
        store.get_into(kept, bytes(20000))
    frozen = np.zeros(20000, dtype=np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(InvalidArgumentError, match="read-only"):
        store.get_into(kept, frozen)
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        store.get_into(kept, torch.zeros(200, 200, dtype=torch.uint8).t())


def test_batch_get_into_reports_each_item(store, kept):
    outs = [bytearray(20000), bytearray(1), bytearray(8)]
    results = store.batch_get_into([kept, kept, "missing/key"], outs)
    assert results[0] == 10240 and bytes(outs[0][:10240]) == bytes(range(256)) * 40
    assert isinstance(results[1], InvalidArgumentError)
    assert isinstance(results[2], KeyNotFoundError) and results[2].keys == ["missing/key"]
    with pytest.raises(InvalidArgumentError, match="outs"):
        store.batch_get_into([kept], [])


def test_missing_key(store):
    with pytest.raises(KeyNotFoundError, match="never/put"):
        store.get("never/put")
    assert store.exists("never/put") is False
    assert store.remove("never/put") is False


def test_second_put_of_a_key_is_a_success_that_writes_nothing(store):
    store.put("same/key", b"first value")
    store.put("same/key", b"second, different value")
    assert store.get("same/key") == b"first value"
    assert store.batch_put(["same/key", "same/key"], [b"x", b"y"]) == [None, None]
    assert store.get("same/key") == b"first value"


def test_remove_of_a_leased_object_needs_force(store):
    store.put("leased/key", b"v")
    # a reader that took the replicas and has not finished (a get releases when done)
    reader = kvstore.rpc.grpc_client(store.address, token=TOKEN)
    assert reader.get_replicas(["leased/key"], lease_ttl_s=60)[0].size_bytes == 1
    reader.close()
    with pytest.raises(KVStoreError, match="leased"):
        store.remove("leased/key")
    assert store.get("leased/key") == b"v"
    assert store.remove("leased/key", force=True) is True
    assert not store.exists("leased/key")


@pytest.mark.parametrize("options, match", [
    ({"transport": "carrier-pigeon"}, "transport"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"lease_ttl_s": -1}, "lease_ttl_s"),
    ({"reply_spin_s": -0.001}, "reply_spin_s"),
    ({"reply_spin_s": 1.0}, "reply_spin_s"),
    ({"colour": "blue"}, "unknown option"),
])
def test_bad_connect_options_raise(store, options, match):
    with pytest.raises(InvalidArgumentError, match=match):
        kvstore.connect(store.address, token=TOKEN, **options)


def test_wrong_or_missing_token_is_refused(store, monkeypatch):
    with pytest.raises(AuthenticationError):
        kvstore.connect(store.address, token="wrong")
    with pytest.raises(AuthenticationError):
        kvstore.connect(store.address)
    monkeypatch.setenv("KVSTORE_TOKEN", TOKEN)  # the token falls back to the environment
    with kvstore.connect(store.address) as other:
        assert other.exists("never/put") is False


def test_unreachable_master_is_reported(store):
    with pytest.raises(MasterUnavailableError):
        kvstore.connect("127.0.0.1:1", rpc_timeout_s=2)


def test_closed_store_raises_closed_error_everywhere(store, kept):
    other = kvstore.connect(store.address, token=TOKEN)
    other.close()
    other.close()  # idempotent
    assert other.closed
    for call in (lambda: other.put("k", b"v"), lambda: other.get(kept),
                 lambda: other.get_into(kept, bytearray(20000)), lambda: other.exists(kept),
                 lambda: other.batch_put(["k"], [b"v"]), lambda: other.batch_exists([kept]),
                 lambda: other.remove(kept), lambda: other.match_prefix([kept]),
                 lambda: other.stats()):
        with pytest.raises(ClosedError):
            call()


@pytest.mark.parametrize("options", [{"soft_pin_ttl_s": -1}, {"timeout_s": -2},
                                     {"timeout_s": "soon"}])
def test_bad_per_call_options_raise_before_anything_is_stored(store, options):
    with pytest.raises(InvalidArgumentError):
        store.put("options/bad", b"v", **options)
    assert not store.exists("options/bad")
    with pytest.raises(InvalidArgumentError):
        store.get("options/bad", lease_ttl_s=0)
