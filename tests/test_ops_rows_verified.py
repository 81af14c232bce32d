"""The verified scatters of kvstore.ops (``checksums=``): a row whose XXH3-64 matches its
expected digest lands exactly as the plain scatter puts it, a row that does not match writes
nothing (its page, or its tokens, keep what they held), and bad checksums raise before any
byte moves."""

from __future__ import annotations

import pytest
import torch

from kvstore import InvalidArgumentError
from kvstore.client.checksum import checksum
from kvstore.ops import (gather_pages_to_rows, gather_tokens_to_rows, row_nbytes,
                         scatter_rows_to_pages, scatter_rows_to_tokens)
from ops_reference import DTYPES, LAYOUTS, kv_view, make_layers


def _page(layer: torch.Tensor, layout: str, page: int) -> torch.Tensor:
    return kv_view(layer, layout)[:, page]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
# rows from 128 B (XXH3's short inputs) to ~2 MiB (streaming stores past 8 MiB in total)
@pytest.mark.parametrize("block_size,head_dim,num_layers", [(1, 64, 1), (17, 128, 3),
                                                             (3, 5, 2), (16, 128, 64)])
def test_matching_rows_land_and_a_corrupt_row_writes_nothing(layout, dtype, block_size,
                                                             head_dim, num_layers):
    src = make_layers(layout, num_layers, 6, block_size, head_dim, dtype)
    rows = torch.empty(4, row_nbytes(src), dtype=torch.uint8)
    gather_pages_to_rows(src, [3, 0, 5, 2], rows)
    sums = [checksum(row.numpy()) for row in rows]
    rows[1, 7] ^= 0xFF                                   # row 1 no longer matches
    dst = [torch.full_like(t, 3.0) for t in src]
    ok = scatter_rows_to_pages(rows, dst, [1, 4, 0, 2], checksums=sums)
    assert ok == [True, False, True, True]
    for s, d in zip(src, dst):
        assert torch.equal(_page(d, layout, 1), _page(s, layout, 3))
        assert torch.equal(_page(d, layout, 0), _page(s, layout, 5))
        assert torch.equal(_page(d, layout, 2), _page(s, layout, 2))
        assert bool((_page(d, layout, 4) == 3.0).all())      # the corrupt row's page
        assert bool((_page(d, layout, 3) == 3.0).all()) and bool((_page(d, layout, 5) == 3.0).all())


def test_rows_as_read_only_views_with_threads():
    """Rows as read-only memoryviews (leased segment views), 4.5 MiB over 4 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        src = make_layers("kv_first", 16, 9, 16, 128, torch.bfloat16, num_heads=4)
        staged = torch.empty(9, row_nbytes(src), dtype=torch.uint8)
        gather_pages_to_rows(src, list(range(9)), staged)
        views = [memoryview(row.numpy().tobytes()) for row in staged]   # bytes: read-only
        sums = [checksum(view) for view in views]
        sums[8] ^= 1
        dst = [torch.zeros_like(t) for t in src]
        assert scatter_rows_to_pages(views, dst, list(range(9)), checksums=sums) == \
            [True] * 8 + [False]
        for s, d in zip(src, dst):
            assert torch.equal(d[:, :8], s[:, :8]) and not d[:, 8].any()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("block_size,heads,head_dim", [(1, 1, 64), (16, 4, 64), (5, 3, 128)])
def test_token_rows_verified(block_size, heads, head_dim):
    gen = torch.Generator().manual_seed(5)
    src = [torch.randn(1, heads, 6 * block_size, head_dim, generator=gen).half()
           for _ in range(4)]
    rows = torch.empty(6, 4 * block_size * heads * head_dim * 2, dtype=torch.uint8)
    gather_tokens_to_rows(src, list(range(6)), rows, block_size=block_size)
    sums = [checksum(row.numpy()) for row in rows]
    sums[4] = (sums[4] + 1) % (1 << 64)
    dst = [torch.full_like(t, -1.0) for t in src]
    ok = scatter_rows_to_tokens(rows, dst, list(range(6)), block_size=block_size,
                                checksums=sums)
    assert ok == [True, True, True, True, False, True]
    cut, end = 4 * block_size, 5 * block_size
    for s, d in zip(src, dst):
        assert torch.equal(d[:, :, :cut], s[:, :, :cut]) and torch.equal(d[:, :, end:],
                                                                          s[:, :, end:])
        assert bool((d[:, :, cut:end] == -1.0).all())


@pytest.mark.parametrize("bad,match", [([1, 2], "checksums"), ([1, -1, 2], "2\\*\\*64"),
                                       ([1, 1 << 64, 2], "2\\*\\*64"), ([1, None, 2], "ints"),
                                       ([1, True, 2], "ints"), ("abc", "checksums")])
def test_bad_checksums_raise_before_any_byte_moves(bad, match):
    src = make_layers("kv_first", 2, 4, 4, 64, torch.float16)
    rows = torch.empty(3, row_nbytes(src), dtype=torch.uint8)
    gather_pages_to_rows(src, [0, 1, 2], rows)
    dst = [torch.zeros_like(t) for t in src]
    with pytest.raises(InvalidArgumentError, match=match):
        scatter_rows_to_pages(rows, dst, [0, 1, 2], checksums=bad)
    tokens = [torch.zeros(1, 2, 12, 64, dtype=torch.float16) for _ in range(2)]
    token_rows = torch.ones(3, 2 * 4 * 2 * 64 * 2, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match=match):
        scatter_rows_to_tokens(token_rows, tokens, [0, 1, 2], block_size=4, checksums=bad)
    assert not any(d.any() for d in dst) and not any(t.any() for t in tokens)


def test_rows_by_address_scatter_and_refuse_bad_input():
    from kvstore.ops.rows import RowAddresses

    src = make_layers("block_first", 2, 4, 4, 64, torch.float32)
    staged = torch.empty(2, row_nbytes(src), dtype=torch.uint8)
    gather_pages_to_rows(src, [2, 1], staged)
    base, stride = staged.data_ptr(), staged.shape[1]
    dst = [torch.zeros_like(t) for t in src]
    rows = RowAddresses([base, base + stride], stride)
    assert scatter_rows_to_pages(rows, dst, [0, 3],
                                 checksums=[checksum(r.numpy()) for r in staged]) == [True, True]
    assert all(torch.equal(d[[0, 3]], s[[2, 1]]) for s, d in zip(src, dst))
    fresh = [torch.zeros_like(t) for t in src]
    for bad, match in ((RowAddresses([base, base + stride], stride - 1), "bytes needed"),
                       (RowAddresses([base], stride), "rows of"),
                       (RowAddresses([base, 0], stride), "address is 0")):
        with pytest.raises(InvalidArgumentError, match=match):
            scatter_rows_to_pages(bad, fresh, [0, 3])
    with pytest.raises(InvalidArgumentError, match="at least"):   # a writable view too small
        gather_pages_to_rows(src, [0], [memoryview(bytearray(row_nbytes(src) - 1))])
    assert not any(t.any() for t in fresh)
