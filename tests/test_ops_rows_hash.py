"""The fused gather + XXH3-64 of kvstore.ops (``checksums=True``): the rows equal the plain
gather's, each digest equals kvstore.client.checksum of its row (what a put records), and
bad input raises before any byte moves."""

from __future__ import annotations

import pytest
import torch

from kvstore import InvalidArgumentError
from kvstore.client.checksum import checksum
from kvstore.ops import gather_pages_to_rows, gather_tokens_to_rows, row_nbytes
from ops_reference import DTYPES, LAYOUTS, make_layers

IDS = [5, 0, 3, 6, 3]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
# rows from 128 B (under XXH3's 240-byte short path) to ~2 MiB, pages not a multiple of 64 B
@pytest.mark.parametrize("block_size,head_dim,num_layers", [(1, 64, 1), (17, 128, 3),
                                                             (16, 576, 2), (3, 5, 2),
                                                             (16, 128, 64)])
def test_paged_digests_equal_the_put_checksum(layout, dtype, block_size, head_dim, num_layers):
    layers = make_layers(layout, num_layers, 7, block_size, head_dim, dtype)
    row_bytes = row_nbytes(layers)
    fused = torch.full((len(IDS), row_bytes + 8), 0x5A, dtype=torch.uint8)
    plain = torch.empty(len(IDS), row_bytes, dtype=torch.uint8)
    digests = gather_pages_to_rows(layers, torch.tensor(IDS), fused, checksums=True)
    assert gather_pages_to_rows(layers, torch.tensor(IDS), plain) is None
    assert torch.equal(fused[:, :row_bytes], plain)
    assert bool((fused[:, row_bytes:] == 0x5A).all())  # nothing past a row's bytes
    # the digest covers the row's bytes only, not the wider buffer's tail
    assert digests == [checksum(row.numpy()) for row in plain]
    assert digests[2] == digests[4] and digests[0] != digests[1]  # the repeat of id 3


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_paged_digests_into_separate_buffers_with_threads(four_threads):
    """Rows as memoryviews (a reservation's views), 4.5 MiB: spread over 4 threads."""
    layers = make_layers("kv_first", 16, 9, 16, 128, torch.bfloat16, num_heads=4)
    row_bytes = row_nbytes(layers)
    views = [memoryview(bytearray(row_bytes)) for _ in range(9)]
    ids = list(range(8, -1, -1))
    digests = gather_pages_to_rows(layers, ids, views, checksums=True)
    assert digests == [checksum(view) for view in views]
    plain = torch.empty(9, row_bytes, dtype=torch.uint8)
    gather_pages_to_rows(layers, ids, plain)
    assert [bytes(v) for v in views] == [row.numpy().tobytes() for row in plain]


@pytest.mark.parametrize("block_size,heads,head_dim", [(1, 1, 64), (16, 4, 64), (5, 3, 128)])
def test_token_digests_equal_the_put_checksum(block_size, heads, head_dim):
    gen = torch.Generator().manual_seed(3)
    src = [torch.randn(1, heads, 7 * block_size + 2, head_dim, generator=gen).half()
           for _ in range(4)]
    ids = [5, 0, 6, 2]
    row_bytes = 4 * block_size * heads * head_dim * 2
    fused = torch.empty(len(ids), row_bytes, dtype=torch.uint8)
    plain = torch.empty(len(ids), row_bytes, dtype=torch.uint8)
    digests = gather_tokens_to_rows(src, ids, fused, block_size=block_size, checksums=True)
    gather_tokens_to_rows(src, ids, plain, block_size=block_size)
    assert torch.equal(fused, plain)
    assert digests == [checksum(row.numpy()) for row in plain]


def test_bad_input_raises_before_any_byte_moves():
    layers = make_layers("kv_first", 2, 6, 4, 64, torch.float16)
    row_bytes = row_nbytes(layers)
    rows = [bytearray(row_bytes) for _ in range(2)]
    with pytest.raises(InvalidArgumentError, match="read-only"):
        gather_pages_to_rows(layers, [0, 1], [rows[0], bytes(row_bytes)], checksums=True)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        gather_pages_to_rows(layers, [0, 6], rows, checksums=True)
    with pytest.raises(InvalidArgumentError, match="at least"):
        gather_pages_to_rows(layers, [0, 1], [rows[0], bytearray(row_bytes - 1)],
                             checksums=True)
    src = [torch.randn(1, 2, 32, 8).half() for _ in range(2)]
    with pytest.raises(InvalidArgumentError, match="out of range"):
        gather_tokens_to_rows(src, [0, 4], rows, block_size=8, checksums=True)
    assert all(r == bytearray(row_bytes) for r in rows)
