"""kvstore.compat.mooncake: Mooncake Store's Python API against a real kvstore cluster (master
and daemon processes), driven the way SGLang's and vLLM's Mooncake connectors call it."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from client_cluster import Cluster
from servers import ServerProcess

from kvstore.compat.mooncake import (ErrorCode, MooncakeDistributedStore, ReplicateConfig,
                                     SoftPinAction)

BLOCK_BYTES = 4096


@pytest.fixture(scope="module")
def cluster():
    """A master and one daemon (64 MiB DRAM) that the master lists as registered."""
    cluster = Cluster(num_daemons=1, dram="64MiB")
    yield cluster.address
    cluster.close()


@pytest.fixture
def store(cluster):
    s = MooncakeDistributedStore()
    # no segment of its own (0): the cluster's daemon holds the objects
    assert s.setup("localhost", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", cluster) == 0
    yield s
    s.close()


def test_connector_call_sequence_round_trips_bytes(store) -> None:
    # warm-up, as SGLang's MooncakeStore does after setup
    warmup_key, warmup_value = f"warmup-{uuid.uuid4().hex}", bytes(range(256)) * 16
    assert store.put(warmup_key, warmup_value) == 0
    assert store.is_exist(warmup_key) == 1
    assert store.get(warmup_key) == warmup_value
    # a host KV pool registered once, pages saved and loaded by pointer
    pool = torch.arange(8 * BLOCK_BYTES, dtype=torch.int32).view(torch.uint8)[:8 * BLOCK_BYTES]
    assert store.register_buffer(pool.data_ptr(), pool.numel()) == 0
    keys = [f"page-{uuid.uuid4().hex}-{i}" for i in range(4)]
    ptrs = [pool.data_ptr() + i * BLOCK_BYTES for i in (1, 3, 5, 7)]
    assert store.batch_put_from(keys, ptrs, [BLOCK_BYTES] * 4) == [0, 0, 0, 0]
    assert store.batch_is_exist(keys + ["never-stored"]) == [1, 1, 1, 1, 0]
    dst = torch.zeros(4 * BLOCK_BYTES, dtype=torch.uint8)
    assert store.register_buffer(dst.data_ptr(), dst.numel()) == 0
    dst_ptrs = [dst.data_ptr() + i * BLOCK_BYTES for i in range(4)]
    assert store.batch_get_into(keys, dst_ptrs, [BLOCK_BYTES] * 4) == [BLOCK_BYTES] * 4
    for i, src in enumerate((1, 3, 5, 7)):
        assert torch.equal(dst[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES],
                           pool[src * BLOCK_BYTES:(src + 1) * BLOCK_BYTES])
    assert store.get_size(keys[0]) == BLOCK_BYTES
    assert store.get_into(keys[1], dst.data_ptr(), BLOCK_BYTES) == BLOCK_BYTES


def test_return_conventions_for_missing_keys_and_bad_buffers(store) -> None:
    missing = f"missing-{uuid.uuid4().hex}"
    assert store.get(missing) == b""
    assert store.is_exist(missing) == 0
    assert store.get_size(missing) == ErrorCode.OBJECT_NOT_FOUND
    assert store.remove(missing) == ErrorCode.OBJECT_NOT_FOUND
    buf = np.zeros(BLOCK_BYTES, dtype=np.uint8)
    ptr = buf.ctypes.data
    # not registered: refused, nothing written
    assert store.put_from("k-unreg", ptr, BLOCK_BYTES) == ErrorCode.INVALID_PARAMS
    assert store.is_exist("k-unreg") == 0
    assert store.register_buffer(ptr, BLOCK_BYTES) == 0
    assert store.get_into(missing, ptr, BLOCK_BYTES) == ErrorCode.OBJECT_NOT_FOUND
    key = f"big-{uuid.uuid4().hex}"
    assert store.put(key, bytes(2 * BLOCK_BYTES)) == 0
    assert store.get_into(key, ptr, BLOCK_BYTES) == ErrorCode.INVALID_PARAMS  # too small
    assert store.get_into(key, ptr, 2 * BLOCK_BYTES) == ErrorCode.INVALID_PARAMS  # past end
    assert store.unregister_buffer(ptr) == 0
    assert store.unregister_buffer(ptr) == ErrorCode.INVALID_PARAMS
    assert store.get(key) == bytes(2 * BLOCK_BYTES)  # the stored object is intact
    assert store.put("", b"x") == ErrorCode.INVALID_PARAMS


def test_put_keeps_the_first_value_and_upsert_replaces_it(store) -> None:
    key = f"dup-{uuid.uuid4().hex}"
    assert store.put(key, b"first") == 0
    assert store.put(key, b"second") == 0  # Mooncake: an existing key is a success
    assert store.get(key) == b"first"
    assert store.upsert(key, b"third") == 0
    assert store.get(key) == b"third"
    keys = [f"batch-{uuid.uuid4().hex}-{i}" for i in range(3)]
    assert store.put_batch(keys, [b"a", b"bb", b"ccc"]) == 0
    assert store.get_batch(keys + ["nope"]) == [b"a", b"bb", b"ccc", b""]
    handles = store.batch_get_buffer([keys[2], "nope"])
    assert handles[1] is None and handles[0].size() == 3 and bytes(handles[0]) == b"ccc"
    assert np.frombuffer(handles[0], dtype=np.uint8).tolist() == list(b"ccc")
    assert store.put_parts("parts-" + keys[0], b"ab", memoryview(b"cd")) == 0
    assert store.get("parts-" + keys[0]) == b"abcd"


def test_multi_buffer_forms_concatenate_and_split(store) -> None:
    src = torch.arange(3 * 1024, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    for t in (src, dst):
        assert store.register_buffer(t.data_ptr(), t.numel()) == 0
    keys = [f"multi-{uuid.uuid4().hex}-{i}" for i in range(2)]
    base, dbase = src.data_ptr(), dst.data_ptr()
    assert store.batch_put_from_multi_buffers(
        keys, [[base, base + 2048], [base + 1024]], [[512, 512], [1024]]) == [0, 0]
    assert store.get(keys[0]) == bytes(src[:512].numpy()) + bytes(src[2048:2560].numpy())
    assert store.batch_get_into_multi_buffers(
        keys, [[dbase, dbase + 512], [dbase + 2048]], [[256, 768], [1024]]) == [1024, 1024]
    first = torch.cat([src[:512], src[2048:2560]])
    assert torch.equal(dst[:256], first[:256]) and torch.equal(dst[512:1280], first[256:])
    assert not dst[256:512].any() and not dst[1280:2048].any()  # gaps untouched
    assert torch.equal(dst[2048:], src[1024:2048])


def test_remove_by_regex_and_remove_all(store) -> None:
    tag = uuid.uuid4().hex
    for i in range(3):
        assert store.put(f"{tag}/a{i}", b"x") == 0
    assert store.put(f"{tag}/b", b"y") == 0
    assert store.remove_by_regex(f"^{tag}/a.*") == 3
    assert store.batch_is_exist([f"{tag}/a0", f"{tag}/b"]) == [0, 1]
    assert store.remove_by_regex("a[0-9]+") == ErrorCode.INVALID_PARAMS  # not a prefix
    assert store.remove_all() >= 1
    assert store.is_exist(f"{tag}/b") == 0


def test_replicate_config_and_setup_dict(cluster) -> None:
    s = MooncakeDistributedStore()
    config = {"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
              "global_segment_size": "16MB", "local_buffer_size": "1MB",
              "master_server_addr": cluster, "tenant_id": "t1"}
    assert s.setup(config) == 0
    try:
        assert s.get_hostname() == "127.0.0.1" and s.health_check() == 0
        rc = ReplicateConfig()
        rc.replica_num = 2  # this segment and the cluster's daemon
        rc.soft_pin_action = SoftPinAction.ENABLE
        rc.soft_pin_ttl_ms = 5000
        assert s.put("pinned", b"v", rc) == 0 and s.get("pinned") == b"v"
        rc.nof_replica_num = 1
        assert s.put("nof", b"v", rc) == ErrorCode.INVALID_PARAMS
        other = MooncakeDistributedStore()  # another tenant does not see t1's keys
        assert other.setup({**config, "tenant_id": "t2", "global_segment_size": 0}) == 0
        assert other.is_exist("pinned") == 0
        other.close()
    finally:
        assert s.close() == 0
    assert s.health_check() == 1 and s.put("after-close", b"x") == ErrorCode.INVALID_PARAMS


def test_a_segment_contributed_by_setup_leaves_the_pool_at_close() -> None:
    """A master with no daemon: the owner's setup segment is the whole pool."""
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    owner, reader = MooncakeDistributedStore(), MooncakeDistributedStore()
    try:
        assert owner.setup("127.0.0.1", "P2PHANDSHAKE", "16MB", 0, "tcp", "",
                           master.address) == 0
        assert reader.setup("127.0.0.1", "P2PHANDSHAKE", 0, 0, "tcp", "", master.address) == 0
        keys = [f"seg-{i}" for i in range(8)]
        assert owner.put_batch(keys, [bytes([i]) * 1000 for i in range(8)]) == 0
        assert reader.get_batch(keys) == [bytes([i]) * 1000 for i in range(8)]
        assert owner.close() == 0
        assert reader.batch_is_exist(keys) == [0] * 8  # they left with the segment
        assert reader.put("more", b"x") == ErrorCode.NO_AVAILABLE_HANDLE  # no pool left
    finally:
        owner.close()
        reader.close()
        master.close()


def test_setup_errors(cluster) -> None:
    s = MooncakeDistributedStore()
    with pytest.raises(TypeError):
        s.setup("localhost", "P2PHANDSHAKE", 0)  # the positional form needs 7 arguments
    assert s.setup({"local_hostname": "h", "metadata_server": "m",
                    "global_segment_size": "12 parsecs", "master_server_addr": cluster}) == (
        ErrorCode.INVALID_PARAMS)
    assert s.setup("h", "m", 0, 0, "tcp", "", "127.0.0.1:1") == ErrorCode.RPC_FAIL
    assert s.health_check() == 1
