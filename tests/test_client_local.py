"""kvstore.local() round trips (numpy, torch of any dtype, empty values, batches, prefixes,
pins, stats), checksum verification against corrupted bytes, concurrency, and kvstore.aio."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
import torch

import kvstore
from kvstore import ChecksumError, ClosedError, KeyNotFoundError, MasterUnavailableError
from kvstore.rpc import grpc_client
from kvstore.transport import nixl_installed
from kvstore.transport.shm import ShmTransport


@pytest.fixture(scope="module")
def store():
    store = kvstore.local(dram="64MiB")
    yield store
    store.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_torch_tensor_round_trip_into_a_tensor(store, dtype):
    source = (torch.randn(4, 8, 16) * 10).to(dtype)
    store.put(f"torch/{dtype}", source)
    out = torch.empty_like(source)
    assert store.get_into(f"torch/{dtype}", out) == source.numel() * source.element_size()
    assert torch.equal(out.view(torch.uint8), source.view(torch.uint8))
    assert store.get(f"torch/{dtype}") == source.view(torch.uint8).numpy().tobytes()


def test_numpy_round_trip_into_a_bigger_array(store):
    source = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    store.put("numpy/a", source)
    out = np.zeros((65, 128), dtype=np.float32)
    assert store.get_into("numpy/a", out) == source.nbytes
    assert np.array_equal(out[:64], source) and not out[64].any()


def test_empty_values_round_trip(store):
    store.put("empty/bytes", b"")
    store.put("empty/array", np.zeros(0, dtype=np.float32))
    assert store.get("empty/bytes") == b"" and store.get("empty/array") == b""
    assert store.get_into("empty/bytes", bytearray(0)) == 0
    assert store.exists("empty/bytes")
    assert store.batch_get(["empty/bytes", "empty/array"]) == [b"", b""]


def test_one_byte_value_is_not_mistaken_for_empty(store):
    for value in (b"\x00", b"\x01", b"\xff"):
        store.put(f"one/{value.hex()}", value)
        assert store.get(f"one/{value.hex()}") == value


def test_batches_match_prefix_and_remove_prefix(store):
    keys = [f"chain/{i}" for i in range(5)]
    assert store.batch_put(keys[:3], [bytes([i]) * (i + 10) for i in range(3)]) == [None] * 3
    assert store.batch_exists(keys) == [True, True, True, False, False]
    assert store.match_prefix(keys) == 3
    assert store.match_prefix(["chain/9", *keys]) == 0
    outs = [bytearray(16) for _ in keys]
    results = store.batch_get_into(keys, outs)
    assert results[:3] == [10, 11, 12] and outs[2][:12] == b"\x02" * 12
    assert all(isinstance(r, KeyNotFoundError) for r in results[3:])
    assert store.remove_prefix("chain/", force=True) == 3
    assert store.batch_exists(keys) == [False] * 5


def test_pins_block_eviction_and_hard_pins_block_remove():
    """Pinned objects (pin(), put(hard_pin=...), put(soft_pin_ttl_s=...)) are the least
    recently used ones, yet survive a stream of puts that evicts the unpinned one stored
    with them; a hard pin refuses remove without force until unpinned; a soft pin does not
    refuse remove."""
    block = 256 * 1024
    with kvstore.local(dram="4MiB") as small:
        small.put("pin/by-call", b"h" * block)
        small.pin("pin/by-call", hard=True)
        small.put("pin/hard-at-put", b"p" * block, hard_pin=True)
        small.put("pin/soft-at-put", b"s" * block, soft_pin_ttl_s=600)
        small.put("pin/soft-by-call", b"c" * block)
        small.pin("pin/soft-by-call", ttl_s=600)
        small.put("pin/plain", b"u" * block)
        pinned = ["pin/by-call", "pin/hard-at-put", "pin/soft-at-put", "pin/soft-by-call"]
        fill = [f"fill/{i}" for i in range(40)]                 # 10 MiB through 4 MiB
        for key in fill:
            small.put(key, bytes(block))
        assert small.stats()["master"]["evictions"] > 0
        assert small.batch_exists(pinned) == [True] * 4
        assert small.exists("pin/plain") is False               # evicted: LRU and unpinned
        assert small.get("pin/hard-at-put") == b"p" * block

        for key in ("pin/by-call", "pin/hard-at-put"):
            with pytest.raises(kvstore.KVStoreError):
                small.remove(key)
            assert small.exists(key)
        assert small.remove("pin/soft-at-put") is True          # a soft pin allows remove
        small.unpin("pin/by-call")
        assert small.remove("pin/by-call") is True
        with pytest.raises(KeyNotFoundError):
            small.pin("pin/missing", hard=True)
        with pytest.raises(KeyNotFoundError):
            small.unpin("pin/missing")


def test_stats_name_the_transport_that_served(store):
    before = store.stats()
    store.put("stats/key", bytes(5000))
    assert store.get("stats/key") == bytes(5000)
    after = store.stats()
    # "auto": shm, then nixl where NIXL is installed, then tcp
    assert after["transports"] == ["shm", "nixl", "tcp"] if nixl_installed() else ["shm", "tcp"]
    shm_before, shm_after = before["transfers"]["shm"], after["transfers"]["shm"]
    assert shm_after["num_writes"] == shm_before["num_writes"] + 1
    assert shm_after["read_bytes"] == shm_before["read_bytes"] + 5000
    assert after["master"]["num_nodes"] == 1 and after["master"]["num_objects"] >= 1


def _corrupt(store, key: str) -> None:
    """Overwrite the stored replica's first byte through a real shm mapping."""
    with grpc_client(store.address) as master:
        target = master.get_replicas([key])[0].targets[0]
    with ShmTransport() as shm:
        head = bytearray(target.length)
        shm.read_into(target, memoryview(head), timeout_s=5)
        head[0] ^= 0xFF
        shm.write(target, memoryview(head), timeout_s=5)


def test_corrupted_bytes_are_never_returned_when_verified(store):
    data = bytes(range(256)) * 64
    store.put("corrupt/key", data)
    _corrupt(store, "corrupt/key")
    with pytest.raises(ChecksumError) as info:
        store.get("corrupt/key", verify=True)
    assert info.value.keys == ["corrupt/key"]
    out = bytearray(len(data))
    with pytest.raises(ChecksumError):
        store.get_into("corrupt/key", out, verify=True)
    with kvstore.connect(store.address, transport="tcp") as tcp_store:
        with pytest.raises(ChecksumError):
            tcp_store.get("corrupt/key")  # the tcp path always verifies


def test_threads_share_one_store(store):
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(20):
                key, value = f"thread/{worker}/{i}", bytes([worker, i]) * 1000
                store.put(key, value)
                assert store.get(key) == value
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_closing_a_local_store_stops_its_servers():
    store = kvstore.local(dram="16MiB")
    with store:
        store.put("k", b"v")
        address = store.address
    assert store.closed
    with pytest.raises(MasterUnavailableError):
        kvstore.connect(address, rpc_timeout_s=1)


def test_asyncio_variant_round_trip():
    async def main() -> None:
        async with await kvstore.aio.local(dram="16MiB") as store:
            await store.put("aio/a", b"alpha")
            assert await store.get("aio/a") == b"alpha"
            values = [bytes([i]) * 100 for i in range(8)]
            keys = [f"aio/{i}" for i in range(8)]
            assert await store.batch_put(keys, values) == [None] * 8
            outs = [bytearray(100) for _ in keys]
            results = await asyncio.gather(*(store.get_into(k, o) for k, o in zip(keys, outs)))
            assert results == [100] * 8 and [bytes(o) for o in outs] == values
            assert await store.exists("aio/a") and await store.match_prefix(keys) == 8
            with pytest.raises(KeyNotFoundError):
                await store.get("aio/missing")
            other = await kvstore.aio.connect(store.sync.address)
            assert await other.get("aio/3") == values[3]
            await other.close()
        assert store.closed
        with pytest.raises(ClosedError):
            await store.get("aio/a")
        await store.close()  # idempotent

    asyncio.run(main())


def test_debug_log_names_the_transport_that_served(store, caplog):
    store.put("log/key", b"logged")
    with caplog.at_level(logging.DEBUG, logger="kvstore.client"):
        assert store.get("log/key") == b"logged"
    assert any("via shm" in record.getMessage() and record.name == "kvstore.client"
               for record in caplog.records)


def test_local_with_an_ssd_tier(tmp_path):
    with kvstore.local(dram="8MiB", ssd=f"{tmp_path}:16MiB") as store:
        store.put("ssd/key", bytes(range(256)) * 10)
        assert store.get("ssd/key") == bytes(range(256)) * 10
        tiers = {t["tier"] for t in store.stats()["master"]["tiers"]}
        assert tiers == {"dram", "ssd"}   # Tier labels, as put(tier=...) takes them


def test_put_on_the_ssd_tier_reads_back_through_the_data_plane(tmp_path):
    with kvstore.local(dram="8MiB", ssd=f"{tmp_path}:16MiB") as store:
        data = np.random.default_rng(5).integers(0, 256, 300_000, dtype=np.uint8)
        store.put("ssd/placed", data, tier="ssd")
        assert store.get("ssd/placed") == data.tobytes()
        ssd = [t for t in store.stats()["master"]["tiers"] if t["tier"] == "ssd"][0]
        assert ssd["num_objects"] == 1
        transfers = store.stats()["transfers"]
        assert transfers["tcp"]["num_reads"] == 1 and transfers["shm"]["num_reads"] == 0
        with pytest.raises(kvstore.InvalidArgumentError, match="tier"):
            store.put("ssd/bad", b"v", tier="tape")


@pytest.mark.parametrize("metadata", ["fast", "grpc"])
def test_local_round_trips_over_either_metadata_path(metadata):
    with kvstore.local(dram="16MiB", metadata=metadata) as store:
        assert store.stats()["metadata"] == metadata
        store.batch_put(["m/a", "m/b"], [b"alpha", b"beta"])
        assert store.batch_get(["m/a", "m/b", "m/none"])[:2] == [b"alpha", b"beta"]
        assert store.batch_exists(["m/a", "m/none"]) == [True, False]
        assert store.match_prefix(["m/a", "m/b", "m/none"]) == 2
        assert store.remove("m/a", force=True) and not store.remove("m/a", force=True)
        with pytest.raises(KeyNotFoundError):
            store.get("m/a")


def test_a_remove_right_after_this_clients_own_get_is_not_blocked_by_its_lease(store):
    """A get's read lease is released in the background (batched); the same client's remove
    right after must not find the key "leased by a reader" (its own releases go first)."""
    for i in range(20):
        key = f"own-lease/{i}"
        store.put(key, bytes([i]) * 5000)
        assert store.get(key) == bytes([i]) * 5000
        assert store.remove(key) is True
        assert not store.exists(key)
    store.put("own-lease/prefix/a", b"a" * 100)
    assert store.get("own-lease/prefix/a") == b"a" * 100
    assert store.remove_prefix("own-lease/prefix/") == 1
