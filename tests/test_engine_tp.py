"""Heterogeneous tensor parallelism: KV saved by one TP size loads into another, bytes exact."""

from __future__ import annotations

import pytest
import torch

import kvstore
from kvstore import InvalidArgumentError
from kvstore.engine import KeyNamespace, PagedKVConnector
from kvstore.engine.tp import ShardSlice, plan

NUM_LAYERS, BLOCK_SIZE, TOTAL_HEADS, HEAD_DIM, NUM_PAGES = 2, 16, 4, 16, 6
TOKENS = [(13 * i) % 3000 for i in range(3 * BLOCK_SIZE + 4)]


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="128MiB") as s:
        yield s


def _full_cache(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, NUM_PAGES, BLOCK_SIZE, TOTAL_HEADS, HEAD_DIM, generator=gen)
            for _ in range(NUM_LAYERS)]


def _shard(full: list[torch.Tensor], rank: int, size: int) -> list[torch.Tensor]:
    width = TOTAL_HEADS // size
    return [layer[..., rank * width:(rank + 1) * width, :].contiguous() for layer in full]


def _empty(size: int) -> list[torch.Tensor]:
    return [torch.zeros(2, NUM_PAGES, BLOCK_SIZE, TOTAL_HEADS // size, HEAD_DIM)
            for _ in range(NUM_LAYERS)]


def _save(store, full, size: int, model: str, quantize=None) -> None:
    for rank in range(size):
        ns = KeyNamespace(model=model, tp_rank=rank, tp_size=size)
        connector = PagedKVConnector(store, _shard(full, rank, size), block_size=BLOCK_SIZE,
                                     namespace=ns, quantize=quantize)
        assert connector.save(TOKENS, [0, 1, 2]) == 3


def test_plan_splits_and_joins_heads() -> None:
    assert plan(2, 1, 2, 1) == [ShardSlice(0, 2, 4, 0)]
    assert plan(4, 0, 1, 2) == [ShardSlice(0, 0, 2, 0), ShardSlice(1, 0, 2, 2)]
    assert plan(2, 1, 2, 4) == [ShardSlice(2, 0, 1, 0), ShardSlice(3, 0, 1, 1)]
    with pytest.raises(InvalidArgumentError):
        plan(2, 0, 2, 3)  # 4 heads over 3 source ranks


@pytest.mark.parametrize("source_size,target_size", [(1, 2), (2, 1), (4, 2), (1, 4)])
def test_load_reshards_bytes_exact(store, source_size: int, target_size: int) -> None:
    model = f"tp{source_size}to{target_size}"
    full = _full_cache(seed=source_size * 10 + target_size)
    _save(store, full, source_size, model)
    dst_ids = [5, 3, 4]
    for rank in range(target_size):
        pages = _empty(target_size)
        ns = KeyNamespace(model=model, tp_rank=rank, tp_size=target_size)
        loader = PagedKVConnector(store, pages, block_size=BLOCK_SIZE, namespace=ns,
                                  source_tp_size=source_size)
        assert loader.num_stored_tokens(TOKENS) == 3 * BLOCK_SIZE
        assert loader.load(TOKENS, dst_ids) == 3 * BLOCK_SIZE
        expected = _shard(full, rank, target_size)
        for got, want in zip(pages, expected):
            for src_id, dst_id in zip([0, 1, 2], dst_ids):
                assert torch.equal(got[:, dst_id], want[:, src_id])


def test_load_stops_where_any_source_shard_is_missing(store) -> None:
    full = _full_cache(seed=99)
    _save(store, full, 2, "tp-missing")
    shard1 = PagedKVConnector(store, _shard(full, 1, 2), block_size=BLOCK_SIZE,
                              namespace=KeyNamespace(model="tp-missing", tp_rank=1, tp_size=2))
    assert store.remove(shard1.keys_for(TOKENS)[1])
    loader = PagedKVConnector(store, _empty(1), block_size=BLOCK_SIZE,
                              namespace=KeyNamespace(model="tp-missing"), source_tp_size=2)
    assert loader.load(TOKENS, [0, 1, 2]) == BLOCK_SIZE


def test_int8_reshards_within_the_bound(store) -> None:
    full = _full_cache(seed=7)
    _save(store, full, 1, "tp-int8", quantize="int8")
    pages = _empty(2)
    loader = PagedKVConnector(store, pages, block_size=BLOCK_SIZE, quantize="int8",
                              namespace=KeyNamespace(model="tp-int8", tp_rank=1, tp_size=2),
                              source_tp_size=1)
    assert loader.load(TOKENS, [0, 1, 2]) == 3 * BLOCK_SIZE
    want = _shard(full, 1, 2)[0][:, :3]
    got = pages[0][:, :3]
    amax = want.abs().amax(-1, keepdim=True)
    assert ((want - got).abs() <= amax / 254 + 1e-6).all()
    assert not torch.equal(want, got)  # it really went through INT8


def test_resharding_needs_a_key_namespace(store) -> None:
    loader = PagedKVConnector(store, _empty(2), block_size=BLOCK_SIZE, namespace="plain/ns",
                              source_tp_size=1)
    with pytest.raises(InvalidArgumentError):
        loader.load(TOKENS, [0, 1, 2])
