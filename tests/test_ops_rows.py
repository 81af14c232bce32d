"""kvstore.ops.gather_pages_to_rows / scatter_rows_to_pages on CPU against gather_pages: row
j is page block_ids[j] of every layer, in the stored block form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore import InvalidArgumentError
from kvstore.ops import (gather_pages, gather_pages_to_rows, gather_tokens_to_rows,
                         row_nbytes, scatter_pages, scatter_rows_to_pages,
                         scatter_rows_to_tokens)
from ops_reference import DTYPES, LAYOUTS, POISON, make_layers

IDS = [5, 0, 3, 6, 3]  # out of order, first and last block, one repeat (a gather allows it)


def reference_rows(layers, ids, layout):
    """Rows as the engine built them before: gather_pages, then the page dim first."""
    gathered = gather_pages(layers, ids, layout=layout)
    page_dim = 1 if layout == "mla" else 2
    per_block = gathered.movedim(page_dim, 0).contiguous()
    return per_block.view(len(ids), -1).view(torch.uint8)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", [(1, 64), (17, 128), (16, 576)])
def test_gather_to_rows_is_the_stored_form(layout, dtype, block_size, head_dim):
    layers = make_layers(layout, 3, 7, block_size, head_dim, dtype)
    row_bytes = row_nbytes(layers)
    rows = torch.full((len(IDS), row_bytes + 8), 0x5A, dtype=torch.uint8)  # wider rows
    gather_pages_to_rows(layers, torch.tensor(IDS), rows)
    assert torch.equal(rows[:, :row_bytes], reference_rows(layers, IDS, layout))
    assert bool((rows[:, row_bytes:] == 0x5A).all())  # nothing past a row's bytes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_as_separate_buffers_round_trip(layout):
    src = make_layers(layout, 4, 9, 16, 64, torch.bfloat16, seed=1)
    row_bytes = row_nbytes(src)
    # rows of different kinds at unrelated addresses, as a put's reserved shm ranges are
    rows = [bytearray(row_bytes), np.zeros(row_bytes, np.uint8),
            memoryview(bytearray(row_bytes + 3)), torch.zeros(row_bytes, dtype=torch.uint8)]
    src_ids, dst_ids = [8, 1, 4, 0], [2, 7, 0, 5]
    gather_pages_to_rows(src, src_ids, rows)
    for row, want in zip(rows, reference_rows(src, src_ids, layout)):
        got = bytes(memoryview(row if not isinstance(row, torch.Tensor) else row.numpy()))
        assert got[:row_bytes] == want.numpy().tobytes()
    dst = make_layers(layout, 4, 9, 16, 64, torch.bfloat16, seed=2)
    expected = [t.clone() for t in dst]
    scatter_pages(gather_pages(src, src_ids, layout=layout), expected, dst_ids, layout=layout)
    read_only = [memoryview(bytes(r)) if isinstance(r, bytearray) else r for r in rows]
    scatter_rows_to_pages(read_only, dst, dst_ids)
    for got, want in zip(dst, expected):  # written pages as scatter_pages, others untouched
        assert torch.equal(got, want)


def test_staging_tensor_rows_round_trip_into_other_pages():
    src = make_layers("kv_first", 2, 6, 16, 128, torch.float32, seed=3)
    rows = torch.empty(3, row_nbytes(src), dtype=torch.uint8)
    gather_pages_to_rows(src, [5, 0, 2], rows)
    dst = [torch.full_like(t, POISON) for t in src]
    scatter_rows_to_pages(rows, dst, [1, 4, 3])
    for s, d in zip(src, dst):
        assert torch.equal(d[:, [1, 4, 3]], s[:, [5, 0, 2]])
        assert bool((d[:, [0, 2, 5]] == POISON).all())


def test_bad_rows_raise_before_any_byte_moves():
    layers = make_layers("kv_first", 2, 6, 4, 64, torch.float16)
    row_bytes = row_nbytes(layers)
    good = [bytearray(row_bytes) for _ in range(2)]
    cases = [
        ([bytearray(row_bytes), bytes(row_bytes)], "read-only"),          # gather into bytes
        ([bytearray(row_bytes), bytearray(row_bytes - 1)], "at least"),   # one row too small
        ([bytearray(row_bytes)], "2 block ids but 1 rows"),
        ([bytearray(row_bytes), object()], "not a buffer"),
        (torch.zeros(2, row_bytes - 2, dtype=torch.uint8), "contiguous CPU tensor"),
        (torch.zeros(3, row_bytes, dtype=torch.uint8), "contiguous CPU tensor"),
    ]
    for rows, message in cases:
        before = [bytes(r) for r in rows] if isinstance(rows, list) and \
            all(isinstance(r, (bytes, bytearray)) for r in rows) else None
        with pytest.raises(InvalidArgumentError, match=message):
            gather_pages_to_rows(layers, [0, 1], rows)
        if before is not None:
            assert [bytes(r) for r in rows] == before
    with pytest.raises(InvalidArgumentError, match="out of range"):
        gather_pages_to_rows(layers, [0, 6], good)
    assert all(r == bytearray(row_bytes) for r in good)
    pages = [t.clone() for t in layers]
    with pytest.raises(InvalidArgumentError, match="repeated"):
        scatter_rows_to_pages(good, layers, [1, 1])
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        scatter_rows_to_pages([memoryview(bytearray(2 * row_bytes))[::2], good[0]], layers,
                              [0, 1])
    for before, after in zip(pages, layers):
        assert torch.equal(before, after)


def token_tensors(num_tensors, heads, seq, head_dim, dtype, seed=0):
    """A transformers cache's tensors, [1, H, S, D] each (k0, v0, k1, v1, ...)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, seq, head_dim, generator=gen).to(dtype)
            for _ in range(num_tensors)]


def reference_token_rows(tensors, ids, block_size):
    """Row j: [tensors, block_size, heads, head_dim] of block ids[j], by plain torch."""
    rows = [torch.stack([t[0, :, b * block_size:(b + 1) * block_size].permute(1, 0, 2)
                         for t in tensors]) for b in ids]
    return torch.stack(rows).view(len(ids), -1).view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,heads,head_dim", [(1, 1, 64), (16, 4, 64), (5, 3, 128)])
def test_token_rows_round_trip_against_torch(dtype, block_size, heads, head_dim):
    seq = 7 * block_size + 3  # a partial trailing block, never read
    src = token_tensors(4, heads, seq, head_dim, dtype)
    ids = [5, 0, 6, 2]
    row_bytes = 4 * block_size * heads * head_dim * src[0].element_size()
    rows = torch.full((len(ids), row_bytes), 0x5A, dtype=torch.uint8)
    gather_tokens_to_rows(src, ids, rows, block_size=block_size)
    assert torch.equal(rows, reference_token_rows(src, ids, block_size))
    dst = [torch.full_like(t, POISON) for t in src]
    scatter_rows_to_tokens(list(rows), dst, [1, 3, 0, 6], block_size=block_size)
    for s, d in zip(src, dst):
        for a, b in zip(ids, [1, 3, 0, 6]):
            span = slice(b * block_size, (b + 1) * block_size)
            assert torch.equal(d[0, :, span], s[0, :, a * block_size:(a + 1) * block_size])
        untouched = [b for b in range(7) if b not in (1, 3, 0, 6)]
        for b in untouched:
            assert bool((d[0, :, b * block_size:(b + 1) * block_size] == POISON).all())
        assert bool((d[0, :, 7 * block_size:] == POISON).all())


def test_token_rows_from_strided_views():
    """[1, H, S, D] views of a larger [1, H, S_max, D] buffer, as a cache grown in place."""
    big = token_tensors(2, 2, 40, 8, torch.float32, seed=4)
    views = [t[:, :, :32] for t in big]
    rows = torch.empty(2, 2 * 8 * 2 * 8 * 4, dtype=torch.uint8)
    gather_tokens_to_rows(views, [3, 1], rows, block_size=8)
    assert torch.equal(rows, reference_token_rows(views, [3, 1], 8))


def test_bad_token_tensors_raise_before_any_byte_moves():
    src = token_tensors(2, 2, 32, 8, torch.float16)
    rows = [bytearray(2 * 8 * 2 * 8 * 2) for _ in range(2)]
    with pytest.raises(InvalidArgumentError, match="differs"):
        gather_tokens_to_rows([src[0], src[1].float()], [0, 1], rows, block_size=8)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        gather_tokens_to_rows(src, [0, 4], rows, block_size=8)       # past 32 tokens
    with pytest.raises(InvalidArgumentError, match="dense in head_dim"):
        gather_tokens_to_rows([t.transpose(2, 3) for t in token_tensors(2, 2, 8, 8, torch.half)],
                              [0], rows[:1], block_size=8)
    with pytest.raises(InvalidArgumentError, match="at least"):
        gather_tokens_to_rows(src, [0, 1], [rows[0], bytearray(10)], block_size=8)
    assert all(r == bytearray(len(r)) for r in rows)
    before = [t.clone() for t in src]
    with pytest.raises(InvalidArgumentError, match="repeated"):
        scatter_rows_to_tokens(rows, src, [2, 2], block_size=8)
    assert all(torch.equal(a, b) for a, b in zip(before, src))
