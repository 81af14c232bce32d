"""Readers never receive wrong bytes over shm (issue 14) when they ask: with ``verify=True``
(per connection or per call; off by default, see docs/ARCHITECTURE.md, Checksums) bytes flipped in a daemon's segment (here by the test, through its own mapping of the
segment, as any process that maps it could) make a get raise ChecksumError naming the key,
or fall back to another replica when there is one. Without it (the default) a reader of a
corrupted shm range gets the bytes as they are."""

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
    with cluster.connect(verify=True) as store:
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
        # per call off, and the default: the caller trusts the host, gets the bytes as they are
        assert store.get("corrupt-one", verify=False) != value
    with cluster.connect() as trusting:
        assert trusting.get("corrupt-one") != value
        with pytest.raises(ChecksumError):
            trusting.get("corrupt-one", verify=True)


def test_corrupted_shm_replica_falls_back_to_the_other(cluster):
    value = payload(VALUE_BYTES, 12)
    with cluster.connect(verify=True) as store:
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
