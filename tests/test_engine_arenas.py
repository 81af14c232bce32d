"""The transformers-cache connector's rebuilt tensors live in reused arenas
(kvstore.engine.arenas): a later load reuses the memory of a cache nobody holds any more,
and never that of a cache, a layer or a view someone still holds."""

from __future__ import annotations

import gc

import pytest
import torch

import kvstore
from kvstore.engine import KeyNamespace
from kvstore.engine.arenas import TensorArenas
from kvstore.engine.hf_connector import DynamicCacheConnector

LAYERS, BLOCK, HEADS, DIM = 2, 4, 2, 8


def test_an_arena_is_reused_only_when_nothing_shares_it():
    arenas = TensorArenas(max_arenas=2)
    first = arenas.take(1000, torch.float32)
    address = first.data_ptr()
    view = first[10:20].view(2, 5)
    del first
    held = arenas.take(1000, torch.float32)            # the view still holds arena 1
    assert held.data_ptr() != address
    del held
    gc.collect()
    again = arenas.take(800, torch.float32)            # arena 2 is free again: reused
    assert again.data_ptr() != address and again.numel() == 800
    busy = arenas.take(1000, torch.float32)            # both held: a new one
    assert busy.data_ptr() not in (address, again.data_ptr())

    other = arenas.take(800, torch.float16)            # another dtype: never shared
    assert other.data_ptr() != address


def test_the_pool_keeps_at_most_max_arenas():
    arenas = TensorArenas(max_arenas=2)
    held = [arenas.take(100, torch.float32) for _ in range(3)]
    assert len({t.data_ptr() for t in held}) == 3
    # the newest two stay in the pool; the oldest lives on with its tensor alone
    assert [a.data_ptr() for a in arenas._arenas] == [held[2].data_ptr(), held[1].data_ptr()]


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="64MiB") as s:
        yield s


def _cache(num_tokens: int, seed: int):
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(1, HEADS, num_tokens, DIM, generator=gen),
                     torch.randn(1, HEADS, num_tokens, DIM, generator=gen), layer)
    return cache


def test_a_held_cache_keeps_its_bytes_through_later_loads_and_a_dropped_one_is_reused(store):
    connector = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS,
                                      head_dim=DIM, dtype=torch.float32, block_size=BLOCK,
                                      namespace=KeyNamespace(model="arenas"))
    sources = {seed: _cache(8 * BLOCK, seed) for seed in (1, 2, 3)}
    tokens = {seed: [seed * 1000 + t for t in range(8 * BLOCK)] for seed in sources}
    for seed, cache in sources.items():
        assert connector.save_blocks(cache, tokens[seed]).failed_keys == []

    def same(a, b) -> bool:
        return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
                   for x, y in zip(a.layers, b.layers))

    one, _ = connector.load_cache(tokens[1])
    kept_layer = one.layers[1].keys                    # a tensor of cache one, held alone
    two, _ = connector.load_cache(tokens[2])
    three, _ = connector.load_cache(tokens[3])         # both arenas busy: a new one
    assert same(one, sources[1]) and same(two, sources[2]) and same(three, sources[3])
    address_one = one.layers[0].keys.data_ptr()
    del one
    gc.collect()
    four, _ = connector.load_cache(tokens[2])          # arena of `one` still held by a layer
    assert four.layers[0].keys.data_ptr() != address_one
    assert torch.equal(kept_layer, sources[1].layers[1].keys)
    address_four = four.layers[0].keys.data_ptr()
    del two, four
    gc.collect()
    five, _ = connector.load_cache(tokens[1])          # cache four dropped whole: reused
    assert five.layers[0].keys.data_ptr() == address_four
    assert same(five, sources[1]) and same(three, sources[3])
