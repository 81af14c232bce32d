"""Checksums and the empty-value encoding (kvstore.client.checksum)."""

from __future__ import annotations

import xxhash

from kvstore.client.checksum import (EMPTY_CHECKSUM, EMPTY_PLACEHOLDER, checksum,
                                     is_empty_marker)


def test_checksum_is_xxh3_64_of_the_bytes():
    data = bytes(range(256)) * 100
    assert checksum(data) == xxhash.xxh3_64_intdigest(data)
    assert checksum(memoryview(data)) == checksum(data)
    assert checksum(data[:-1] + b"\x01") != checksum(data)


def test_no_one_byte_value_looks_like_an_empty_value():
    assert EMPTY_PLACEHOLDER.nbytes == 1
    assert EMPTY_CHECKSUM == checksum(b"")
    assert all(not is_empty_marker(1, checksum(bytes([b]))) for b in range(256))
    assert is_empty_marker(1, EMPTY_CHECKSUM)
    assert not is_empty_marker(2, EMPTY_CHECKSUM)
