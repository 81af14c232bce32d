"""The fused copy + XXH3-64 of verified shm reads (``kvstore._copy_hash``, csrc/cpu/copy_hash.h):
the copy is exact and the digest equals the store's checksum (``kvstore.client.checksum``) at
every size around its chunking; bad arguments raise and copy nothing."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore._copy_hash import copy_hash, copy_hash_many
from kvstore.client.checksum import EMPTY_CHECKSUM, checksum

CHUNK_BYTES = 8 << 10  # KVOPS_COPY_HASH_CHUNK_BYTES
SIZES = [0, 1, 16, 17, 128, 129, 240, 241, 1024, CHUNK_BYTES - 1, CHUNK_BYTES,
         CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 77, (64 << 10), (4 << 20) + 3]


def _random(num_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, num_bytes, np.uint8).tobytes()


@pytest.mark.parametrize("num_bytes", SIZES)
def test_copy_is_exact_and_digest_is_the_store_checksum(num_bytes):
    src = _random(num_bytes, num_bytes)
    dst = bytearray(b"\xaa" * num_bytes)
    assert copy_hash(dst, src) == checksum(src)
    assert bytes(dst) == src


def test_empty_copy_has_the_empty_checksum():
    assert copy_hash(bytearray(), b"") == EMPTY_CHECKSUM


def test_unaligned_views_of_a_larger_buffer():
    base = _random(CHUNK_BYTES * 3, 5)
    src = memoryview(base)[3:3 + 2 * CHUNK_BYTES + 5]
    out = bytearray(len(base))
    dst = memoryview(out)[1:1 + len(src)]
    assert copy_hash(dst, src) == checksum(src)
    assert out[1:1 + len(src)] == src and out[0] == 0 and not any(out[1 + len(src):])


def test_many_matches_one_by_one_and_fills_every_buffer():
    srcs = [_random(n, i) for i, n in enumerate([5, CHUNK_BYTES + 9, 64 << 10, 0, 300])]
    dsts = [bytearray(len(s)) for s in srcs]
    assert copy_hash_many(dsts, srcs) == [checksum(s) for s in srcs]
    assert [bytes(d) for d in dsts] == srcs
    assert copy_hash_many([], []) == []


def test_a_changed_byte_changes_the_digest():
    src = bytearray(_random(64 << 10, 9))
    expected = checksum(src)
    src[40000] ^= 1
    assert copy_hash(bytearray(len(src)), src) != expected


def test_unequal_lengths_raise_and_copy_nothing():
    dst = bytearray(10)
    with pytest.raises(ValueError, match="dst has 10 bytes, src 11"):
        copy_hash(dst, b"x" * 11)
    assert dst == bytearray(10)


def test_read_only_destination_raises():
    with pytest.raises((BufferError, TypeError)):
        copy_hash(b"\x00" * 4, b"abcd")


def test_many_with_one_bad_pair_copies_nothing():
    dsts = [bytearray(4), bytearray(4), bytearray(3)]
    with pytest.raises(ValueError):
        copy_hash_many(dsts, [b"abcd", b"efgh", b"ijkl"])
    assert dsts == [bytearray(4), bytearray(4), bytearray(3)]
    with pytest.raises(ValueError, match="2 dsts but 1 srcs"):
        copy_hash_many(dsts[:2], [b"abcd"])
    with pytest.raises(TypeError):
        copy_hash_many(dsts[:1], [12345])
    with pytest.raises(TypeError):
        copy_hash(bytearray(1))
    assert dsts == [bytearray(4), bytearray(4), bytearray(3)]
