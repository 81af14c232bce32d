"""Readers never receive wrong bytes over shm (issue 14): by default (``verify=True``, per
connection or per call; see docs/ARCHITECTURE.md, Checksums) bytes flipped in a daemon's
segment (here by the test, through its own mapping of the segment, as any process that maps
it could) make a get raise ChecksumError naming the key, or fall back to another replica when
there is one; the batch path too. A caller that opts out (``verify=False``) gets the bytes as
they are."""

from __future__ import annotations

import _posixshmem
import mmap
import os

import pytest
from client_cluster import Cluster, payload

import kvstore
from kvstore import ChecksumError
from kvstore.rpc import grpc_client
from kvstore.transport.hostid import local_host_id

VALUE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=2, dram="32MiB")
    yield cluster
    cluster.close()


def replicas(cluster, key):
    with grpc_client(cluster.address) as master:
        (replica_set,) = master.get_replicas([key], client_host_id=local_host_id())
    return replica_set.targets


def flip_bytes(target, num_bytes: int = 64) -> None:
    """Invert ``num_bytes`` in the middle of the target's range, in the daemon's segment."""
    fd = _posixshmem.shm_open(target.shm_name, os.O_RDWR, 0)
    try:
        with mmap.mmap(fd, 0) as segment:
            start = target.offset + target.length // 2
            segment[start:start + num_bytes] = bytes(b ^ 0xFF
                                                     for b in segment[start:start + num_bytes])
    finally:
        os.close(fd)


def test_corrupted_shm_range_raises_checksum_error(cluster):
    value = payload(VALUE_BYTES, 11)
    with cluster.connect() as store:
        store.put("corrupt-one", value)
        (target,) = replicas(cluster, "corrupt-one")
        assert target.shm_name, "the replica must be reachable over shm"
        assert store.get("corrupt-one") == value
        flip_bytes(target)
        with pytest.raises(ChecksumError) as excinfo:
            store.get("corrupt-one")
        assert excinfo.value.keys == ["corrupt-one"]
        assert "corrupt-one" in str(excinfo.value) and "via shm" in str(excinfo.value)
        out = bytearray(VALUE_BYTES)
        with pytest.raises(ChecksumError):
            store.get_into("corrupt-one", out)
        # per call off, and per connection: the caller trusts the host, gets the bytes as
        # they are
        assert store.get("corrupt-one", verify=False) != value
    with cluster.connect(verify=False) as trusting:
        assert trusting.get("corrupt-one") != value
        with pytest.raises(ChecksumError):
            trusting.get("corrupt-one", verify=True)


def test_corrupted_shm_replica_falls_back_to_the_other(cluster):
    value = payload(VALUE_BYTES, 12)
    with cluster.connect() as store:
        store.put("corrupt-two", value, replicas=2)
        first, second = replicas(cluster, "corrupt-two")
        assert first.node_id != second.node_id and first.shm_name and second.shm_name
        flip_bytes(first)
        errors_before = store.stats()["transfers"]["shm"]["num_errors"]
        assert store.get("corrupt-two") == value
        assert store.stats()["transfers"]["shm"]["num_errors"] == errors_before + 1
        flip_bytes(second)
        with pytest.raises(ChecksumError) as excinfo:
            store.get("corrupt-two")
        assert excinfo.value.keys == ["corrupt-two"]


def test_uncorrupted_reads_verify_cleanly(cluster):
    values = [payload(VALUE_BYTES + i, 20 + i) for i in range(4)]
    keys = [f"clean-{i}" for i in range(4)]
    with kvstore.connect(cluster.address, transport="shm") as store:
        assert store.batch_put(keys, values) == [None] * 4
        assert store.batch_get(keys) == values


def test_batch_get_verifies_each_key_and_falls_back_per_key(cluster):
    """The batch path (one fused copy + hash call for the batch): a corrupted key fails alone
    or falls back, its neighbours' bytes arrive intact, and nothing stored changes."""
    keys = [f"batch-{i}" for i in range(6)]
    values = [payload(VALUE_BYTES // 4 + 1000 * i, 40 + i) for i in range(6)]
    with cluster.connect() as store:
        assert store.batch_put(keys[:3], values[:3]) == [None] * 3
        assert store.batch_put(keys[3:], values[3:], replicas=2) == [None] * 3
        (bad_single,) = replicas(cluster, keys[1])
        bad_first, _ = replicas(cluster, keys[4])
        flip_bytes(bad_single, 8)
        flip_bytes(bad_first, 8)
        results = store.batch_get(keys)
        assert isinstance(results[1], ChecksumError) and results[1].keys == [keys[1]]
        assert [results[i] for i in (0, 2, 3, 4, 5)] == [values[i] for i in (0, 2, 3, 4, 5)]
        outs = [bytearray(len(v)) for v in values]
        into = store.batch_get_into(keys, outs)
        assert isinstance(into[1], ChecksumError)
        assert [bytes(outs[i]) for i in (0, 2, 3, 4, 5)] == [values[i] for i in (0, 2, 3, 4, 5)]
        # the flipped bytes are still there (a read never writes the segment) and
        # an opted-out reader sees them
        assert store.get(keys[1], verify=False) != values[1]
