"""Pipelined in-place saves and loads (kvstore.engine.in_place): a request's blocks go in
chunks, each chunk's copy on the connector's worker thread while the next chunk's PutStart
(or GetReplicas) and the previous chunk's commit run. Exact bytes across chunk bounds, both
connectors; a copy that fails leaves nothing of the chunks not yet committed visible and
gives their space back; a load stops at the first block that fails, in any chunk."""

from __future__ import annotations

import threading

import pytest
import torch

import kvstore
from kvstore import ops
from kvstore.engine import KeyNamespace, PagedKVConnector
from kvstore.engine.hf_connector import DynamicCacheConnector
from kvstore.engine import in_place
from kvstore.engine.in_place import Worker, pipeline_chunks, put_in_place
from test_engine_in_place_load import corrupt

LAYERS, BLOCK, HEADS, DIM = 3, 8, 2, 16
NUM_BLOCKS = 100   # chunks [0, 16), [16, 64), [64, 84), [84, 100)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """The pipeline's chunks at 16/48 keys, so 100 blocks take four (the defaults keep a
    2,048-token request in one)."""
    monkeypatch.setattr(in_place, "EDGE_KEYS", 16)
    monkeypatch.setattr(in_place, "MIDDLE_KEYS", 48)


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="128MiB") as s:
        yield s


@pytest.mark.parametrize("num_keys", [0, 1, 16, 32, 33, 100, 1000])
def test_chunks_cover_the_keys_in_order_with_small_edges(num_keys):
    bounds = pipeline_chunks(num_keys, edge=16, middle=48, limit=512)
    assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(num_keys))
    assert all(hi > lo for lo, hi in bounds)
    if num_keys > 32:
        assert bounds[0][1] - bounds[0][0] == 16 and bounds[-1][1] - bounds[-1][0] == 16
        assert max(hi - lo for lo, hi in bounds) <= 48
    else:
        assert len(bounds) <= 1


def test_a_2048_token_request_is_one_chunk_by_default(monkeypatch):
    monkeypatch.undo()
    assert pipeline_chunks(128) == [(0, 128)]
    assert len(pipeline_chunks(2048)) > 1


def test_chunks_respect_the_limit():
    bounds = pipeline_chunks(5000, edge=4096, middle=4096, limit=512)
    assert max(hi - lo for lo, hi in bounds) <= 512
    assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(5000))


def _pages(num_blocks: int, fill: float | None = None):
    if fill is None:
        return [torch.randn(2, num_blocks, BLOCK, HEADS, DIM) for _ in range(LAYERS)]
    return [torch.full((2, num_blocks, BLOCK, HEADS, DIM), fill) for _ in range(LAYERS)]


def test_paged_save_and_load_across_chunks_are_exact(store):
    src = _pages(NUM_BLOCKS)
    ns = KeyNamespace(model="pipeline-paged")
    tokens = list(range(NUM_BLOCKS * BLOCK))
    order = torch.randperm(NUM_BLOCKS)
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    saved = saver.save_blocks(tokens, order)
    assert (saved.num_blocks_stored, saved.failed_keys) == (NUM_BLOCKS, [])
    assert saved.num_bytes_written == NUM_BLOCKS * saver.format.block_bytes
    again = saver.save_blocks(tokens, order)           # stored: nothing written
    assert (again.num_blocks_stored, again.num_bytes_written) == (NUM_BLOCKS, 0)
    dst = _pages(NUM_BLOCKS, 0.0)
    loaded = PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns).load_blocks(
        tokens, list(range(NUM_BLOCKS)))
    assert (loaded.num_tokens_loaded, loaded.failed_keys) == (len(tokens), [])
    for s, d in zip(src, dst):
        assert torch.equal(d, s[:, order])


def test_a_partly_stored_request_writes_only_the_rest(store):
    src = _pages(NUM_BLOCKS)
    ns = KeyNamespace(model="pipeline-partial")
    tokens = list(range(NUM_BLOCKS * BLOCK))
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    assert saver.save(tokens[:40 * BLOCK], list(range(40))) == 40
    saved = saver.save_blocks(tokens, list(range(NUM_BLOCKS)))
    assert (saved.num_blocks_stored, saved.failed_keys) == (NUM_BLOCKS, [])
    assert saved.num_bytes_written == 60 * saver.format.block_bytes


def test_dynamic_cache_round_trip_across_chunks_is_exact(store):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(1, HEADS, NUM_BLOCKS * BLOCK, DIM),
                     torch.randn(1, HEADS, NUM_BLOCKS * BLOCK, DIM), layer)
    connector = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS,
                                      head_dim=DIM, dtype=torch.float32, block_size=BLOCK,
                                      namespace=KeyNamespace(model="pipeline-dynamic"))
    tokens = [t * 3 for t in range(NUM_BLOCKS * BLOCK)]
    saved = connector.save_blocks(cache, tokens)
    assert (saved.num_blocks_stored, saved.failed_keys) == (NUM_BLOCKS, [])
    rebuilt, loaded = connector.load_cache(tokens)
    assert (loaded.num_tokens_loaded, loaded.failed_keys) == (len(tokens), [])
    for before, after in zip(cache.layers, rebuilt.layers):
        assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)


def test_a_failing_copy_leaves_no_uncommitted_chunk_visible_and_frees_its_space(store):
    keys = [f"pipeline-fail/{i}" for i in range(NUM_BLOCKS)]
    calls = []

    def fill(positions, views):
        calls.append((positions[0], threading.current_thread().name))
        if positions[0] == 16:
            raise RuntimeError("copy failed")
        for view in views:
            view[:] = b"\x01" * len(view)
        return None

    with pytest.raises(RuntimeError, match="copy failed"):
        put_in_place(store, keys, 4096, fill, Worker())
    assert all(name.startswith("kvstore-engine-copy") for _, name in calls)
    present = store.batch_exists(keys)
    assert present[:16] == [True] * 16                # the first chunk committed before
    assert not any(present[16:])                      # nothing after it is visible
    # the failed chunks were revoked: the same keys can be put again right away
    results, written = put_in_place(store, keys, 4096, lambda p, v: [
        view.__setitem__(slice(None), b"\x02" * len(view)) for view in v] and None)
    assert results == [None] * NUM_BLOCKS
    assert written == [False] * 16 + [True] * (NUM_BLOCKS - 16)
    assert store.get(keys[50]) == b"\x02" * 4096 and store.get(keys[3]) == b"\x01" * 4096


def test_a_corrupt_block_in_a_middle_chunk_ends_the_loaded_run():
    with kvstore.local(dram="64MiB", verify=True) as verified:
        src = _pages(NUM_BLOCKS)
        ns = KeyNamespace(model="pipeline-corrupt")
        tokens = list(range(NUM_BLOCKS * BLOCK))
        saver = PagedKVConnector(verified, src, block_size=BLOCK, namespace=ns)
        assert saver.save(tokens, list(range(NUM_BLOCKS))) == NUM_BLOCKS
        keys = saver.keys_for(tokens)
        corrupt(verified, keys[30])
        dst = _pages(NUM_BLOCKS, 7.0)
        result = PagedKVConnector(verified, dst, block_size=BLOCK, namespace=ns).load_blocks(
            tokens, list(range(NUM_BLOCKS)))
        assert result.num_tokens_loaded == 30 * BLOCK
        assert result.failed_keys == [keys[30]]
        for s, d in zip(src, dst):
            assert torch.equal(d[:, :30], s[:, :30])
            assert bool((d[:, 30] == 7.0).all())      # the corrupt block never landed
            for page in range(31, NUM_BLOCKS):        # later: as they were, or verified
                assert bool((d[:, page] == 7.0).all()) or torch.equal(d[:, page], s[:, page])


def test_a_block_missing_in_a_middle_chunk_stops_the_load_there(store):
    src = _pages(NUM_BLOCKS)
    ns = KeyNamespace(model="pipeline-missing")
    tokens = list(range(NUM_BLOCKS * BLOCK))
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    assert saver.save(tokens, list(range(NUM_BLOCKS))) == NUM_BLOCKS
    keys = saver.keys_for(tokens)
    assert store.remove(keys[70], force=True)
    dst = _pages(NUM_BLOCKS, 7.0)
    result = PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns).load_blocks(
        tokens, list(range(NUM_BLOCKS)))
    assert (result.num_tokens_loaded, result.failed_keys) == (70 * BLOCK, [])  # a hole, no failure
    for s, d in zip(src, dst):
        assert torch.equal(d[:, :70], s[:, :70])
        assert bool((d[:, 70:] == 7.0).all())          # nothing at or after the hole


def test_the_worker_thread_stops_on_close_and_an_inline_worker_has_none():
    worker = Worker()
    thread = worker.submit(threading.current_thread).result()
    assert thread is not threading.current_thread() and thread.is_alive()
    worker.close()
    worker.close()                                     # idempotent
    assert not thread.is_alive()
    inline = Worker(inline=True)
    assert inline.submit(threading.current_thread).result() is threading.current_thread()
    with pytest.raises(ZeroDivisionError):
        inline.submit(lambda: 1 / 0).result()


def test_a_load_longer_than_the_stored_chain_loads_the_stored_prefix_without_failures(store):
    src = _pages(NUM_BLOCKS)
    ns = KeyNamespace(model="pipeline-prefix")
    tokens = list(range(NUM_BLOCKS * BLOCK))
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    assert saver.save(tokens[:50 * BLOCK], list(range(50))) == 50
    for given in (NUM_BLOCKS, 50, 20):                 # pages for more, as many, fewer
        dst = _pages(NUM_BLOCKS, 7.0)
        loader = PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns)
        result = loader.load_blocks(tokens, list(range(given)))
        assert (result.num_tokens_loaded, result.failed_keys) == (min(50, given) * BLOCK, [])
        assert result.num_bytes_read == min(50, given) * loader.format.block_bytes
        for s, d in zip(src, dst):
            assert torch.equal(d[:, :min(50, given)], s[:, :min(50, given)])
            assert bool((d[:, min(50, given):] == 7.0).all())
    other = PagedKVConnector(store, _pages(4, 7.0), block_size=BLOCK,
                             namespace=KeyNamespace(model="pipeline-nothing"))
    assert other.load_blocks(tokens[:4 * BLOCK], [0, 1, 2, 3]).num_tokens_loaded == 0
    # a local prefix hit still goes through match_prefix: the answer counts from token 0
    skipped = PagedKVConnector(store, _pages(NUM_BLOCKS, 7.0), block_size=BLOCK, namespace=ns)
    result = skipped.load_blocks(tokens, list(range(NUM_BLOCKS)), num_computed_tokens=10 * BLOCK)
    assert (result.num_tokens_loaded, result.num_bytes_read) == (
        50 * BLOCK, 40 * skipped.format.block_bytes)


def test_a_save_of_a_stored_request_writes_nothing(store):
    src = _pages(8)
    ns = KeyNamespace(model="pipeline-stored")
    tokens = list(range(8 * BLOCK))
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    assert saver.save_blocks(tokens, list(range(8))).num_bytes_written == 8 * saver.format.block_bytes
    again = saver.save_blocks(tokens, list(range(8)))
    assert (again.num_blocks_stored, again.num_bytes_written, again.failed_keys) == (8, 0, [])
