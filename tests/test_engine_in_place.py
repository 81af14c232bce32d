"""The connectors' one-pass paths: saves gather straight into the ranges a reservation hands
out (kvstore.client.reserve), loads copy rows into pages or fresh cache tensors with one
kernel pass (kvstore.ops.rows). Bytes exact, nothing written twice, on shm and on tcp."""

from __future__ import annotations

import pytest
import torch

import kvstore
from kvstore.engine import KeyNamespace, PagedKVConnector
from kvstore.engine.hf_connector import DynamicCacheConnector

LAYERS, BLOCK, HEADS, DIM = 3, 8, 2, 16


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="128MiB") as s:
        yield s


def shm_writes(store) -> int:
    return store.stats()["transfers"].get("shm", {}).get("num_writes", 0)


def dynamic_cache(num_tokens: int, *, grown: bool, seed: int = 0):
    """A one-request DynamicCache; ``grown``: each tensor a [1, H, S, D] view of a longer
    buffer, as a cache whose storage was allocated ahead."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(LAYERS):
        k, v = (torch.randn(1, HEADS, num_tokens + (13 if grown else 0), DIM, generator=gen)
                for _ in range(2))
        cache.update(k[:, :, :num_tokens], v[:, :, :num_tokens], layer)
        if grown:  # keep the strided views themselves as the layer's tensors
            cache.layers[layer].keys = k[:, :, :num_tokens]
            cache.layers[layer].values = v[:, :, :num_tokens]
    return cache


@pytest.mark.parametrize("layout", ["kv_first", "block_first", "mla"])
def test_paged_save_writes_each_byte_once_and_loads_exact(store, layout):
    shape = {"kv_first": (2, 10, BLOCK, HEADS, DIM), "block_first": (10, 2, BLOCK, HEADS, DIM),
             "mla": (10, BLOCK, DIM)}[layout]
    src = [torch.randn(shape, dtype=torch.bfloat16) for _ in range(LAYERS)]
    dst = [torch.zeros_like(t) for t in src]
    ns = KeyNamespace(model=f"in-place-{layout}")
    tokens = list(range(4 * BLOCK + 5))
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    writes = shm_writes(store)
    saver.save_blocks(tokens[:2 * BLOCK], [9, 2])        # a stored prefix, then the rest
    result = saver.save_blocks(tokens, [9, 2, 0, 5])
    assert (result.num_blocks_stored, result.failed_keys) == (4, [])
    assert result.num_bytes_written == 2 * saver.format.block_bytes   # only the missing two
    assert shm_writes(store) == writes   # gathered into the segment: no copy by a transport
    store.put(f"in-place-probe-{layout}", b"x")   # while a put's copy counts
    assert shm_writes(store) == writes + 1
    loader = PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns)
    assert loader.load_blocks(tokens, [1, 3, 4, 8]).num_tokens_loaded == 4 * BLOCK
    block_dim = 1 if layout == "kv_first" else 0
    for s, d in zip(src, dst):
        for a, b in zip([9, 2, 0, 5], [1, 3, 4, 8]):
            assert torch.equal(s.select(block_dim, a), d.select(block_dim, b))
        for untouched in (0, 2, 5, 6, 7, 9):
            assert not d.select(block_dim, untouched).any()


@pytest.mark.parametrize("grown", [False, True])
def test_dynamic_cache_save_writes_each_byte_once_and_rebuilds_exact(store, grown):
    ns = KeyNamespace(model=f"in-place-hf-{grown}")
    connector = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS,
                                      head_dim=DIM, dtype=torch.float32, block_size=BLOCK,
                                      namespace=ns)
    tokens = list(range(5 * BLOCK + 3))
    cache = dynamic_cache(len(tokens), grown=grown)
    writes = shm_writes(store)
    result = connector.save_blocks(cache, tokens)
    assert (result.num_blocks_stored, result.failed_keys) == (5, [])
    assert shm_writes(store) == writes
    rebuilt, loaded = connector.load_cache(tokens)
    assert loaded.num_tokens_loaded == 5 * BLOCK
    for original, layer in zip(cache.layers, rebuilt.layers):
        assert torch.equal(layer.keys, original.keys[:, :, :5 * BLOCK])
        assert torch.equal(layer.values, original.values[:, :, :5 * BLOCK])
        assert layer.keys.is_contiguous()


def test_saved_blocks_carry_the_checksum_of_their_bytes(store):
    """The saves record the fused gather's digests (kvstore.ops checksums=True) instead of
    hashing the views again: every stored block reads back verified, and its bytes are the
    stored form (a plain gather of the same pages)."""
    from kvstore import ops


    src = [torch.randn(2, 6, BLOCK, HEADS, DIM, dtype=torch.float16) for _ in range(LAYERS)]
    paged = PagedKVConnector(store, src, block_size=BLOCK,
                             namespace=KeyNamespace(model="in-place-sums"))
    tokens = list(range(3 * BLOCK))
    assert paged.save_blocks(tokens, [4, 0, 5]).failed_keys == []
    rows = torch.empty(3, ops.row_nbytes(src), dtype=torch.uint8)
    ops.gather_pages_to_rows(src, [4, 0, 5], rows)
    stored = store.batch_get(paged.keys_for(tokens), verify=True)
    assert stored == [row.numpy().tobytes() for row in rows]
    hf = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                               dtype=torch.float32, block_size=BLOCK,
                               namespace=KeyNamespace(model="in-place-sums-hf"))
    cache = dynamic_cache(2 * BLOCK, grown=True, seed=5)
    assert hf.save_blocks(cache, tokens[:2 * BLOCK]).failed_keys == []
    for j, value in enumerate(store.batch_get(hf.keys_for(tokens[:2 * BLOCK]), verify=True)):
        span = slice(j * BLOCK, (j + 1) * BLOCK)
        expected = torch.stack([t[0, :, span].permute(1, 0, 2) for layer in cache.layers
                                for t in (layer.keys, layer.values)])
        assert value == expected.contiguous().numpy().tobytes()


def test_paged_blocks_load_into_a_dynamic_cache_and_back(store):
    """The in-place paths keep the one stored form: a paged save rebuilds as a transformers
    cache, and a transformers save loads into pages."""
    ns = KeyNamespace(model="in-place-both-ways")
    tokens = list(range(3 * BLOCK))
    pages = [torch.randn(2, 4, BLOCK, HEADS, DIM) for _ in range(LAYERS)]
    PagedKVConnector(store, pages, block_size=BLOCK, namespace=ns).save(tokens, [3, 1, 2])
    hf = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                               dtype=torch.float32, block_size=BLOCK, namespace=ns)
    rebuilt, _ = hf.load_cache(tokens)
    for layer, page in zip(rebuilt.layers, pages):
        expected = page[0, [3, 1, 2]].reshape(3 * BLOCK, HEADS, DIM).permute(1, 0, 2)
        assert torch.equal(layer.keys[0], expected)
    other = list(range(100, 100 + 3 * BLOCK))
    hf.save_blocks(rebuilt, other)
    back = [torch.zeros_like(t) for t in pages]
    PagedKVConnector(store, back, block_size=BLOCK, namespace=ns).load(other, [0, 2, 3])
    for b, p in zip(back, pages):
        assert torch.equal(b[:, [0, 2, 3]], p[:, [3, 1, 2]])


def test_over_tcp_the_reserved_buffers_are_written_at_commit():
    with kvstore.local(dram="64MiB", transport="tcp") as store:
        assert store.stats()["transports"] == ["tcp"]
        src = [torch.randn(2, 4, BLOCK, HEADS, DIM) for _ in range(LAYERS)]
        dst = [torch.zeros_like(t) for t in src]
        ns = KeyNamespace(model="in-place-tcp")
        tokens = list(range(3 * BLOCK))
        saved = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns).save_blocks(
            tokens, [2, 0, 3])
        assert saved.failed_keys == [] and store.stats()["transfers"]["tcp"]["num_writes"] == 3
        PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns).load(tokens, [1, 2, 0])
        for s, d in zip(src, dst):
            assert torch.equal(d[:, [1, 2, 0]], s[:, [2, 0, 3]])
