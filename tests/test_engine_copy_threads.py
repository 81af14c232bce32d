"""The in-place copies on two threads (issue 15's engine path, 15e2): the row kernels'
``num_threads`` (rows split between threads, whatever torch's intra-op count is), the
connectors' ``copy_threads`` (default ``in_place.COPY_THREADS``), exact bytes after a save
and a load of several MiB on two threads, and a save whose keys the store refuses part-way
through the batch naming exactly those keys."""

from __future__ import annotations

import pytest
import torch

import kvstore
from kvstore import InvalidArgumentError
from kvstore.client.checksum import checksum
from kvstore.engine import KeyNamespace, PagedKVConnector
from kvstore.engine.hf_connector import DynamicCacheConnector
from kvstore.engine.in_place import COPY_THREADS
from kvstore.ops import _lib
from kvstore.ops.rows import (gather_pages_to_rows, gather_tokens_to_rows, row_nbytes,
                              scatter_rows_to_pages, scatter_rows_to_tokens)
from ops_reference import make_layers

# 8 layers x K/V x 16 tokens x 4 heads x 64 fp32 = 256 KiB a block; 24 blocks = 6 MiB, enough
# for the kernels to start two threads (about one per MiB)
LAYERS, BLOCK, HEADS, DIM, BLOCKS = 8, 16, 4, 64, 24


@pytest.fixture(scope="module")
def store():
    with kvstore.local(dram="96MiB") as s:
        yield s


@pytest.fixture
def one_torch_thread():
    """torch pinned to one thread, as the benchmarks and many engines run: the copies'
    threads must not follow it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kernel_threads(monkeypatch):
    """The thread counts the row kernels were given, call by call (the real exec_for runs)."""
    seen: list[int] = []
    real = _lib.exec_for

    def recording(device, num_bytes, max_threads=None):
        arg = real(device, num_bytes, max_threads)
        seen.append(int(arg.num_threads))
        return arg

    monkeypatch.setattr(_lib, "exec_for", recording)
    return seen


def test_two_threads_gather_and_scatter_the_same_bytes_as_one(one_torch_thread, kernel_threads):
    layers = make_layers("kv_first", LAYERS, BLOCKS, BLOCK, DIM, torch.float32, num_heads=HEADS)
    row_bytes = row_nbytes(layers)
    ids = torch.tensor(list(range(BLOCKS - 1, -1, -1)))
    one = torch.empty(BLOCKS, row_bytes, dtype=torch.uint8)
    two = [memoryview(bytearray(row_bytes)) for _ in range(BLOCKS)]
    sums_one = gather_pages_to_rows(layers, ids, one, checksums=True, num_threads=1)
    sums_two = gather_pages_to_rows(layers, ids, two, checksums=True, num_threads=2)
    assert kernel_threads == [1, 2]
    assert [bytes(v) for v in two] == [row.numpy().tobytes() for row in one]
    assert sums_two == sums_one == [checksum(row.numpy()) for row in one]
    dst = [torch.zeros_like(t) for t in layers]
    ok = scatter_rows_to_pages(two, dst, ids, checksums=sums_two, num_threads=2)
    assert ok == [True] * BLOCKS and kernel_threads[-1] == 2
    assert all(torch.equal(a, b) for a, b in zip(layers, dst))


def test_two_threads_copy_token_rows_exactly(one_torch_thread, kernel_threads):
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(1, HEADS, BLOCKS * BLOCK, DIM, generator=gen)
               for _ in range(2 * LAYERS)]
    ids = torch.arange(BLOCKS)
    rows = torch.empty(BLOCKS, 2 * LAYERS * BLOCK * HEADS * DIM * 4, dtype=torch.uint8)
    sums = gather_tokens_to_rows(tensors, ids, rows, block_size=BLOCK, checksums=True,
                                 num_threads=2)
    assert sums == [checksum(row.numpy()) for row in rows]
    out = [torch.zeros_like(t) for t in tensors]
    bad = list(sums)
    bad[5] ^= 1   # one row that does not match: its tokens stay as they were
    ok = scatter_rows_to_tokens(rows, out, ids, block_size=BLOCK, checksums=bad, num_threads=2)
    assert kernel_threads == [2, 2]
    assert ok == [j != 5 for j in range(BLOCKS)]
    span = slice(5 * BLOCK, 6 * BLOCK)
    for t, o in zip(tensors, out):
        assert not o[:, :, span].any()
        o[:, :, span] = t[:, :, span]
        assert torch.equal(t, o)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_a_bad_thread_count_raises_before_any_byte_moves(bad):
    layers = make_layers("kv_first", 2, 4, BLOCK, DIM, torch.float32)
    rows = torch.full((2, row_nbytes(layers)), 7, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match="num_threads"):
        gather_pages_to_rows(layers, [0, 1], rows, checksums=True, num_threads=bad)
    assert bool((rows == 7).all())
    with pytest.raises(InvalidArgumentError, match="copy_threads"):
        PagedKVConnector(None, layers, block_size=BLOCK, namespace="ns", copy_threads=bad)


def test_connectors_copy_on_two_threads_by_default_and_none_follows_torch(one_torch_thread):
    layers = make_layers("kv_first", 2, 4, BLOCK, DIM, torch.float32)
    assert COPY_THREADS == 2
    assert PagedKVConnector(None, layers, block_size=BLOCK, namespace="ns").copy_threads == 2
    assert PagedKVConnector(None, layers, block_size=BLOCK, namespace="ns",
                            copy_threads=None).copy_threads is None
    assert PagedKVConnector(None, layers, block_size=BLOCK, namespace="ns",
                            copy_threads=10_000).copy_threads <= 10_000


def test_paged_save_and_load_on_two_threads_are_exact(store, one_torch_thread, kernel_threads):
    src = make_layers("kv_first", LAYERS, 2 * BLOCKS, BLOCK, DIM, torch.float32,
                      num_heads=HEADS)
    dst = [torch.zeros_like(t) for t in src]
    ns = KeyNamespace(model="copy-threads-paged")
    tokens = list(range(BLOCKS * BLOCK + 7))
    pages = list(range(2 * BLOCKS - 1, BLOCKS - 1, -1))
    saver = PagedKVConnector(store, src, block_size=BLOCK, namespace=ns)
    result = saver.save_blocks(tokens, pages)
    assert (result.num_blocks_stored, result.failed_keys) == (BLOCKS, [])
    assert kernel_threads == [2]   # one fused gather + hash, on two threads
    loader = PagedKVConnector(store, dst, block_size=BLOCK, namespace=ns)
    loaded = loader.load_blocks(tokens, list(range(BLOCKS)))
    assert (loaded.num_tokens_loaded, loaded.failed_keys) == (BLOCKS * BLOCK, [])
    assert kernel_threads == [2, 2]
    for s, d in zip(src, dst):
        assert torch.equal(s[:, pages], d[:, :BLOCKS])
        assert not d[:, BLOCKS:].any()


def test_dynamic_save_and_load_on_two_threads_are_exact(store, one_torch_thread,
                                                        kernel_threads):
    from transformers import DynamicCache

    ns = KeyNamespace(model="copy-threads-hf")
    connector = DynamicCacheConnector(store, num_layers=LAYERS, num_kv_heads=HEADS,
                                      head_dim=DIM, dtype=torch.float32, block_size=BLOCK,
                                      namespace=ns)
    tokens = list(range(BLOCKS * BLOCK + 3))
    gen = torch.Generator().manual_seed(1)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(*(torch.randn(1, HEADS, len(tokens), DIM, generator=gen)
                       for _ in range(2)), layer)
    result = connector.save_blocks(cache, tokens)
    assert (result.num_blocks_stored, result.failed_keys) == (BLOCKS, [])
    rebuilt, loaded = connector.load_cache(tokens)
    assert (loaded.num_tokens_loaded, loaded.failed_keys) == (BLOCKS * BLOCK, [])
    assert kernel_threads == [2, 2]
    for original, layer in zip(cache.layers, rebuilt.layers):
        assert torch.equal(layer.keys, original.keys[:, :, :BLOCKS * BLOCK])
        assert torch.equal(layer.values, original.values[:, :, :BLOCKS * BLOCK])


def test_dynamic_load_of_a_partly_stored_chain_loads_its_stored_prefix(store):
    ns = KeyNamespace(model="copy-threads-hf-prefix")
    connector = DynamicCacheConnector(store, num_layers=2, num_kv_heads=2, head_dim=DIM,
                                      dtype=torch.float32, block_size=BLOCK, namespace=ns)
    tokens = list(range(6 * BLOCK))
    keys = connector.keys_for(tokens)
    for key in keys[:4]:   # blocks 0-3 stored, 4-5 not
        store.put(key, torch.full((connector.format.block_bytes,), 3, dtype=torch.uint8))
    rebuilt, loaded = connector.load_cache(tokens)
    assert (loaded.num_tokens_loaded, loaded.failed_keys) == (4 * BLOCK, [])
    assert rebuilt.layers[0].keys.shape[2] == 4 * BLOCK and rebuilt.layers[0].keys.is_contiguous()
    assert bool((rebuilt.layers[1].values.view(torch.uint8) == 3).all())
    empty, none = connector.load_cache([t + 100_000 for t in tokens])
    assert (none.num_tokens_loaded, none.failed_keys) == (0, [])
    assert len(empty.layers) == 0 or empty.layers[0].keys.numel() == 0


def test_a_save_the_store_cannot_hold_whole_names_the_refused_keys_and_keeps_the_rest():
    """A DRAM pool of 4 MiB and a request of 24 blocks of 256 KiB (6 MiB): the PutStart
    refuses the keys past what fits (no view, a CapacityError each); the save names exactly
    those, the blocks before them are stored and load back exactly."""
    with kvstore.local(dram="4MiB") as small:
        src = make_layers("kv_first", LAYERS, BLOCKS, BLOCK, DIM, torch.float32,
                          num_heads=HEADS)
        ns = KeyNamespace(model="copy-threads-full")
        tokens = list(range(BLOCKS * BLOCK))
        saver = PagedKVConnector(small, src, block_size=BLOCK, namespace=ns)
        keys = saver.keys_for(tokens)
        result = saver.save_blocks(tokens, list(range(BLOCKS)))
        assert result.failed_keys, "a 6 MiB save fit a 4 MiB pool"
        stored = [key for key, there in zip(keys, small.batch_exists(keys)) if there]
        assert sorted(result.failed_keys + stored) == sorted(keys)
        assert result.num_blocks_stored == len(stored)
        assert result.num_bytes_written == len(stored) * saver.format.block_bytes
        for key in stored:
            j = keys.index(key)
            expected = torch.empty(saver.format.block_bytes, dtype=torch.uint8)
            gather_pages_to_rows(src, [j], expected.view(1, -1))
            assert small.get(key) == expected.numpy().tobytes()
