"""One-pass loads: blocks on this host's shm are scattered into the cache straight from leased
views of the segments (kvstore.client.leased_views), each verified against its recorded
checksum first (kvstore.engine.in_place). Exact bytes, no copy by a transport, a corrupt
block never reaches the cache, and everything else takes the general get path."""

from __future__ import annotations

import pytest
import torch

import kvstore
from kvstore import ClosedError, InvalidArgumentError, KeyNotFoundError
from kvstore.client.checksum import checksum
from kvstore.client.leased_views import lease_views
from kvstore.engine import KeyNamespace, PagedKVConnector
from kvstore.engine.hf_connector import DynamicCacheConnector
from kvstore.engine.in_place import load_in_place
from kvstore.rpc import grpc_client
from kvstore.transport.shm import ShmTransport

LAYERS, BLOCK, HEADS, DIM = 3, 8, 2, 16


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="128MiB") as s:
        yield s


def shm_reads(store) -> int:
    return store.stats()["transfers"].get("shm", {}).get("num_reads", 0)


def corrupt(store, key: str, at: int = 100) -> None:
    """Flip one byte of ``key``'s stored replica (its checksum stays the put's)."""
    with grpc_client(store.address) as master:
        target = master.get_replicas([key])[0].targets[0]
    with ShmTransport() as shm:
        data = bytearray(target.length)
        shm.read_into(target, memoryview(data), timeout_s=10)
        data[at] ^= 0xFF
        shm.write(target, memoryview(data), timeout_s=10)


def test_leased_views_are_the_stored_bytes_until_the_lease_ends(store):
    values = {"lv/a": b"a" * 5000, "lv/b": bytes(range(256)) * 3}
    store.batch_put(list(values), list(values.values()))
    with lease_views(store, ["lv/a", "lv/missing", "lv/b"]) as leased:
        assert [bytes(v) if v is not None else None for v in leased.views] == \
            [values["lv/a"], None, values["lv/b"]]
        assert leased.checksums[0] == checksum(values["lv/a"])
        assert leased.checksums[2] == checksum(values["lv/b"])
        assert isinstance(leased.errors[1], KeyNotFoundError) and leased.errors[0] is None
        held = leased.views[0]
        assert held.readonly
        with pytest.raises(TypeError):
            held[0] = 0                                   # read-only: the stored bytes stay
    with pytest.raises(ValueError):
        held[0]                                           # released with the lease
    assert store.get("lv/a") == values["lv/a"]


def test_leased_views_refuse_bad_keys_and_a_closed_store():
    with kvstore.local(dram="16MiB") as s:
        with pytest.raises(InvalidArgumentError):
            lease_views(s, ["ok", ""])
        with pytest.raises(InvalidArgumentError, match="max_batch"):
            lease_views(s, [f"k{i}" for i in range(s._max_batch + 1)])
    with pytest.raises(ClosedError):
        lease_views(s, ["ok"])


def test_over_tcp_there_are_no_views_and_loads_take_the_get_path():
    with kvstore.local(dram="64MiB", transport="tcp") as tcp_store:
        tcp_store.put("lv/tcp", b"x" * 100)
        with lease_views(tcp_store, ["lv/tcp"]) as leased:
            assert leased.views == [None]
        src = [torch.randn(2, 4, BLOCK, HEADS, DIM) for _ in range(LAYERS)]
        dst = [torch.zeros_like(t) for t in src]
        ns = KeyNamespace(model="in-place-load-tcp")
        tokens = list(range(3 * BLOCK))
        PagedKVConnector(tcp_store, src, block_size=BLOCK, namespace=ns).save(tokens, [2, 0, 3])
        loaded = PagedKVConnector(tcp_store, dst, block_size=BLOCK, namespace=ns).load_blocks(
            tokens, [1, 2, 0])
        assert (loaded.num_tokens_loaded, loaded.failed_keys) == (3 * BLOCK, [])
        for s, d in zip(src, dst):
            assert torch.equal(d[:, [1, 2, 0]], s[:, [2, 0, 3]])


def _saved(store, model: str, num_blocks: int = 4):
    src = [torch.randn(2, num_blocks, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
           for _ in range(LAYERS)]
    ns = KeyNamespace(model=model)
    tokens = list(range(num_blocks * BLOCK))
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    assert saver.save(tokens, list(range(num_blocks))) == num_blocks
    return ns, src, tokens, saver.keys_for(tokens)


def test_paged_load_reads_in_place_with_no_staging_and_no_transport_copy(store):
    ns, src, tokens, keys = _saved(store, "in-place-load-paged")
    dst = [torch.zeros_like(t) for t in src]
    loader = PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns)
    reads = shm_reads(store)
    result = loader.load_blocks(tokens, [3, 0, 2, 1])
    assert (result.num_tokens_loaded, result.failed_keys) == (4 * BLOCK, [])
    assert shm_reads(store) == reads                      # no get copied out of the segment
    for s, d in zip(src, dst):
        assert torch.equal(d[:, [3, 0, 2, 1]], s)

    def no_staging(num_blocks):
        raise AssertionError("the general path ran")

    def scatter(first, rows, checksums):
        from kvstore import ops
        return ops.scatter_rows_to_pages(rows, dst, list(range(first, first + len(rows))),
                                         checksums=checksums)

    assert load_in_place(store, keys, loader.format.block_bytes, scatter, no_staging) == (4, [])


def test_a_corrupt_block_never_reaches_the_pages_and_is_a_failed_key():
    """What the cache holds after the load: blocks before the corrupt one loaded, the
    corrupt block's page as it was, a later page as it was or its own verified block."""
    with kvstore.local(dram="64MiB", verify=True) as verified:
        ns, src, tokens, keys = _saved(verified, "in-place-load-corrupt")
        corrupt(verified, keys[2])
        dst = [torch.full_like(t, 7.0) for t in src]
        loader = PagedKVConnector(verified, dst, block_size=BLOCK, namespace=ns)
        result = loader.load_blocks(tokens, [0, 1, 2, 3])
        assert result.num_tokens_loaded == 2 * BLOCK
        assert result.failed_keys == [keys[2]]      # named by the general path's re-read
        for s, d in zip(src, dst):
            assert torch.equal(d[:, :2], s[:, :2])
            assert bool((d[:, 2] == 7.0).all())
            assert bool((d[:, 3] == 7.0).all()) or torch.equal(d[:, 3], s[:, 3])


def test_a_block_missing_from_the_store_ends_the_in_place_run(store):
    ns, src, tokens, keys = _saved(store, "in-place-load-missing")
    dst = [torch.full_like(t, 7.0) for t in src]
    loader = PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns)

    def scatter(first, rows, checksums):
        from kvstore import ops
        return ops.scatter_rows_to_pages(rows, dst, list(range(first, first + len(rows))),
                                         checksums=checksums)

    assert store.remove(keys[1], force=True)
    num_loaded, failed = load_in_place(store, keys, loader.format.block_bytes, scatter,
                                       loader._staging_rows)
    assert (num_loaded, failed) == (1, [keys[1]])
    for s, d in zip(src, dst):
        assert torch.equal(d[:, 0], s[:, 0])
        assert bool((d[:, 1:] == 7.0).all())            # nothing after the missing block


def test_dynamic_cache_load_in_place_and_after_a_corrupt_block():
    from transformers import DynamicCache

    with kvstore.local(dram="64MiB", verify=True) as verified:
        ns = KeyNamespace(model="in-place-load-hf")
        hf = DynamicCacheConnector(verified, num_layers=LAYERS, num_kv_heads=HEADS,
                                   head_dim=DIM, dtype=torch.float32, block_size=BLOCK,
                                   namespace=ns)
        tokens = list(range(4 * BLOCK + 3))
        gen = torch.Generator().manual_seed(9)
        cache = DynamicCache()
        for layer in range(LAYERS):
            cache.update(torch.randn(1, HEADS, len(tokens), DIM, generator=gen),
                         torch.randn(1, HEADS, len(tokens), DIM, generator=gen), layer)
        assert hf.save_blocks(cache, tokens).failed_keys == []
        reads = shm_reads(verified)
        rebuilt, loaded = hf.load_cache(tokens)
        assert (loaded.num_tokens_loaded, loaded.failed_keys) == (4 * BLOCK, [])
        assert shm_reads(verified) == reads
        for original, layer in zip(cache.layers, rebuilt.layers):
            assert torch.equal(layer.keys, original.keys[:, :, :4 * BLOCK])
            assert torch.equal(layer.values, original.values[:, :, :4 * BLOCK])
        keys = hf.keys_for(tokens)
        corrupt(verified, keys[3], at=4000)
        rebuilt, loaded = hf.load_cache(tokens)
        assert (loaded.num_tokens_loaded, loaded.failed_keys) == (3 * BLOCK, [keys[3]])
        for original, layer in zip(cache.layers, rebuilt.layers):
            assert torch.equal(layer.keys, original.keys[:, :, :3 * BLOCK])
            assert torch.equal(layer.values, original.values[:, :, :3 * BLOCK])


def test_a_store_that_trusts_shm_scatters_views_unhashed():
    """``verify=False`` (the client trusts every process that maps the segments): the
    in-place load skips the hash as its gets do, so a replica changed behind the store's
    back is what lands (the configured trade, shown here)."""
    with kvstore.local(dram="64MiB", verify=False) as trusting:
        ns, src, tokens, keys = _saved(trusting, "in-place-load-trusting", num_blocks=3)
        corrupt(trusting, keys[1], at=0)
        dst = [torch.zeros_like(t) for t in src]
        loaded = PagedKVConnector(trusting, dst, block_size=BLOCK, namespace=ns).load_blocks(
            tokens, [0, 1, 2])
        assert (loaded.num_tokens_loaded, loaded.failed_keys) == (3 * BLOCK, [])
        assert torch.equal(dst[0][:, 0], src[0][:, 0]) and torch.equal(dst[0][:, 2], src[0][:, 2])
        assert not torch.equal(dst[0][:, 1], src[0][:, 1])      # byte 0 of block 1 flipped
        assert all(torch.equal(d[:, 1], s[:, 1]) for s, d in zip(src[1:], dst[1:]))
