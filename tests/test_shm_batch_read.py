"""The same-host batch read (kvstore/client/shm_batch.py, issue 15): a ``batch_get_into`` of
many small objects over shm is read by one C call, and gives exactly what the general path
gives: the right bytes in the right outs, per-key errors naming their key (a missing key, a
corrupted value, a bad out), fallback to another replica, and verification on by default.
Real master and daemon processes; the corruption is made through the test's own mapping of
the daemon's segment, as any process that maps it could."""

from __future__ import annotations

import pytest
import numpy as np
from client_cluster import Cluster, payload
from test_shm_verify import flip_bytes, replicas

from kvstore import ChecksumError, InvalidArgumentError, KeyNotFoundError, KVStoreError
from kvstore.client import shm_batch

NUM_KEYS = 1024
VALUE_BYTES = 64


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=2, dram="64MiB")
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def small(cluster):
    """1,024 distinct 64-byte values stored under small/<i> (one replica each)."""
    keys = [f"small/{i}" for i in range(NUM_KEYS)]
    values = [payload(VALUE_BYTES, 1000 + i) for i in range(NUM_KEYS)]
    with cluster.connect() as store:
        assert store.batch_put(keys, values) == [None] * NUM_KEYS
    return keys, values


def slices(num: int, size: int = VALUE_BYTES) -> tuple[bytearray, list[memoryview]]:
    buffer = bytearray(b"\xAA" * (num * size))
    view = memoryview(buffer)
    return buffer, [view[i * size:(i + 1) * size] for i in range(num)]


def test_1024_small_objects_arrive_exactly_in_one_direct_read(cluster, small, monkeypatch):
    keys, values = small
    calls = []
    real = shm_batch.read_ranges
    monkeypatch.setattr(shm_batch, "read_ranges",
                        lambda *args: calls.append(len(args[0])) or real(*args))
    with cluster.connect() as store:
        before = store.stats()["transfers"]["shm"]["num_reads"]
        buffer, outs = slices(NUM_KEYS)
        assert store.batch_get_into(keys, outs) == [VALUE_BYTES] * NUM_KEYS
        assert bytes(buffer) == b"".join(values)
        assert store.stats()["transfers"]["shm"]["num_reads"] == before + NUM_KEYS
    assert calls == [NUM_KEYS], "the batch must be read by one read_ranges call"


def test_every_kind_of_out_gets_its_bytes(cluster, small, monkeypatch):
    torch = pytest.importorskip("torch")
    keys, values = small
    slow_lists = []
    real = shm_batch.read_ranges
    monkeypatch.setattr(shm_batch, "read_ranges",
                        lambda *args: (lambda r: slow_lists.append(r[1]) or r)(real(*args)))
    outs = [bytearray(VALUE_BYTES), memoryview(bytearray(VALUE_BYTES)),
            np.zeros(VALUE_BYTES, dtype=np.uint8), np.zeros(VALUE_BYTES // 4, dtype=np.float32),
            np.zeros((4, VALUE_BYTES // 4), dtype=np.uint8),
            torch.zeros(VALUE_BYTES, dtype=torch.uint8), bytearray(VALUE_BYTES + 10)]
    with cluster.connect() as store:
        assert store.batch_get_into(keys[:len(outs)], outs) == [VALUE_BYTES] * len(outs)
    for out, value in zip(outs, values):
        data = out.numpy().tobytes() if isinstance(out, torch.Tensor) else bytes(out)
        assert data[:VALUE_BYTES] == value
    assert bytes(outs[-1][VALUE_BYTES:]) == bytes(10)  # nothing past the object is written

    # rows of a torch tensor (what the engine connectors pass): read directly, none slow
    rows = torch.zeros(8, VALUE_BYTES, dtype=torch.uint8)
    with cluster.connect() as store:
        assert store.batch_get_into(keys[8:16], list(rows)) == [VALUE_BYTES] * 8
    assert [row.numpy().tobytes() for row in rows] == values[8:16]
    assert slow_lists == [[], []], "every out kind above is read by read_ranges itself"


def test_a_missing_key_among_1024_fails_alone(cluster, small):
    keys, values = small
    wanted = list(keys)
    wanted[517] = "small/never-stored"
    with cluster.connect() as store:
        buffer, outs = slices(NUM_KEYS)
        results = store.batch_get_into(wanted, outs)
    assert isinstance(results[517], KeyNotFoundError)
    assert results[517].keys == ["small/never-stored"]
    assert "small/never-stored" in str(results[517])
    assert results[:517] + results[518:] == [VALUE_BYTES] * (NUM_KEYS - 1)
    for i in (0, 516, 518, NUM_KEYS - 1):
        assert bytes(outs[i]) == values[i]


def test_bad_outs_fail_alone_and_name_their_key(cluster, small):
    keys, values = small
    torch = pytest.importorskip("torch")
    outs = [bytearray(VALUE_BYTES), bytearray(VALUE_BYTES - 1),
            memoryview(bytes(VALUE_BYTES)), memoryview(bytearray(2 * VALUE_BYTES))[::2],
            np.zeros(VALUE_BYTES, dtype=np.uint8), None, b"x" * VALUE_BYTES,
            torch.zeros(2 * VALUE_BYTES, dtype=torch.uint8)[::2]]
    with cluster.connect() as store:
        results = store.batch_get_into(keys[:len(outs)], outs)
    assert results[0] == results[4] == VALUE_BYTES
    assert bytes(outs[0]) == values[0] and bytes(outs[4]) == values[4]
    for i, words in ((1, "out has 63 bytes"), (2, "read-only"), (3, "contiguous"),
                     (5, "got NoneType"), (6, "read-only"), (7, "contiguous")):
        assert isinstance(results[i], InvalidArgumentError), results[i]
        assert results[i].keys == [keys[i]] and words in str(results[i])
    assert bytes(outs[1]) == bytes(VALUE_BYTES - 1)


def test_corrupted_value_is_detected_and_a_second_replica_serves(cluster):
    keys = [f"corrupt/{i}" for i in range(64)]
    values = [payload(VALUE_BYTES, 3000 + i) for i in range(64)]
    with cluster.connect() as store:
        assert store.batch_put(keys[:32], values[:32]) == [None] * 32
        assert store.batch_put(keys[32:], values[32:], replicas=2) == [None] * 32
        (only,) = replicas(cluster, keys[5])
        first, second = replicas(cluster, keys[40])
        assert only.shm_name and first.shm_name and second.shm_name
        flip_bytes(only, 8)
        flip_bytes(first, 8)
        buffer, outs = slices(64)
        results = store.batch_get_into(keys, outs)
        assert isinstance(results[5], ChecksumError) and results[5].keys == [keys[5]]
        assert keys[5] in str(results[5]) and "via shm" in str(results[5])
        assert results[40] == VALUE_BYTES and bytes(outs[40]) == values[40]  # the fallback
        assert [results[i] for i in range(64) if i != 5] == [VALUE_BYTES] * 63
        assert all(bytes(outs[i]) == values[i] for i in range(64) if i != 5)
        # opting out gives the bytes as they are; the stored bytes were not changed by reads
        results = store.batch_get_into(keys[:8], outs[:8], verify=False)
        assert results == [VALUE_BYTES] * 8 and bytes(outs[5]) != values[5]
        flip_bytes(only, 8)   # flipped back: the value is whole again
        assert store.batch_get_into(keys[:8], outs[:8]) == [VALUE_BYTES] * 8
        assert bytes(outs[5]) == values[5]


def test_empty_large_and_unusual_keys_in_one_batch(cluster):
    big = payload((3 << 20) + 4096, 77)   # spans chunks of the segment's page-table flags
    keys = ["mix/empty", "mix/big", "mix/small", "mix/ключ"]
    values = [b"", big, b"x" * 100, b"unicode key"]
    with cluster.connect() as store:
        assert store.batch_put(keys, values) == [None] * 4
        # empty, large and small together
        outs = [bytearray(8), bytearray(len(big)), bytearray(100)]
        assert store.batch_get_into(keys[:3], outs) == [0, len(big), 100]
        assert [bytes(o) for o in outs] == [bytes(8), big, values[2]]
        # a key that is not plain ASCII: the whole batch takes the general path
        outs = [bytearray(11), bytearray(100)]
        assert store.batch_get_into([keys[3], keys[2]], outs) == [11, 100]
        assert [bytes(o) for o in outs] == [values[3], values[2]]
        # a bad key among good ones: the general path reports it and reads the rest
        outs = [bytearray(100), bytearray(8)]
        results = store.batch_get_into(["mix/small", ""], outs)
        assert results[0] == 100 and bytes(outs[0]) == values[2]
        assert isinstance(results[1], InvalidArgumentError)


@pytest.mark.parametrize("field", shm_batch._PER_KEY_FIELDS)
def test_a_reply_short_of_one_per_key_field_is_refused_and_writes_nothing(cluster, small,
                                                                         field):
    # NOTE: the master's real reply, one entry cut from one field on its way in (as a
    # damaged or foreign master would send it): the batch fails whole, no out is written
    keys = small[0][:2]
    with cluster.connect() as store:
        real = store._master.call

        def cut(method, request, deadline=None):
            reply = real(method, request, deadline)
            if method.name == "GetReplicas":
                del getattr(reply, field)[-1]
            return reply

        store._master.call = cut
        buffer, outs = slices(len(keys))
        with pytest.raises(KVStoreError, match=f"malformed master reply to GetReplicas: "
                                               f"1 {field} for 2 keys"):
            store.batch_get_into(keys, outs)
        assert bytes(buffer) == b"\xAA" * len(buffer)
