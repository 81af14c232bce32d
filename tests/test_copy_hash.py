"""The fused copy + XXH3-64 of verified shm reads (``kvstore._copy_hash``, csrc/cpu/copy_hash.h):
the copy is exact and the digest equals the store's checksum (``kvstore.client.checksum``) at
every size around its chunking; bad arguments raise and copy nothing."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from kvstore._copy_hash import (
    ISA, copy, copy_hash, copy_hash_base, copy_hash_many, put_copy_hash_many,
)
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


# Lengths around XXH3's boundaries (240: the long path; 1 KiB blocks; the last stripe that
# overlaps the ones before) and offsets that misalign source and destination differently.
_BUILD_LENGTHS = [241, 255, 256, 1023, 1024, 1025, 1087, 1088, 1089, 2047, 4096 + 63,
                  16 * 1024 + 1, 100_003, (1 << 20) + 17]
_OFFSETS = [(0, 0), (1, 0), (0, 1), (3, 7), (31, 17), (63, 33)]


@pytest.mark.parametrize("num_bytes", _BUILD_LENGTHS)
def test_both_builds_give_the_xxhash_digest_at_every_alignment(num_bytes):
    # NOTE: copy_hash is the build this CPU dispatched to (ISA), copy_hash_base the SSE2 one:
    # on an AVX2 machine this compares the two stripes with each other and with the package
    base = _random(num_bytes + 64, num_bytes)
    for src_off, dst_off in _OFFSETS:
        src = memoryview(base)[src_off:src_off + num_bytes]
        expected = xxhash.xxh3_64_intdigest(src)
        for fn in (copy_hash, copy_hash_base):
            out = bytearray(b"\x55" * (num_bytes + 64))
            dst = memoryview(out)[dst_off:dst_off + num_bytes]
            assert fn(dst, src) == expected, (fn.__name__, src_off, dst_off)
            assert dst == src
            # nothing outside the destination written
            assert out[:dst_off] == b"\x55" * dst_off
            assert out[dst_off + num_bytes:] == b"\x55" * (64 - dst_off)


def test_the_dispatched_build_is_named():
    assert ISA in ("avx2", "base")
    with open("/proc/cpuinfo") as cpuinfo:
        has_avx2 = " avx2" in cpuinfo.read()
    assert (ISA == "avx2") == has_avx2


def test_base_build_checks_its_arguments_as_copy_hash():
    dst = bytearray(10)
    with pytest.raises(ValueError, match="dst has 10 bytes, src 11"):
        copy_hash_base(dst, b"x" * 11)
    assert dst == bytearray(10)


@pytest.mark.parametrize("num_bytes", [0, 1, 63, 64 << 10, (1 << 20) - 1, 1 << 20,
                                       (1 << 20) + 65, (4 << 20) + 3])
def test_plain_copy_is_exact_at_every_alignment_and_writes_nothing_else(num_bytes):
    # NOTE: from 1 MiB copy stores non-temporally with an unaligned head and tail
    base = _random(num_bytes + 64, num_bytes + 1)
    for src_off, dst_off in _OFFSETS:
        src = memoryview(base)[src_off:src_off + num_bytes]
        out = bytearray(b"\x55" * (num_bytes + 64))
        dst = memoryview(out)[dst_off:dst_off + num_bytes]
        assert copy(dst, src) is None
        assert dst == src
        assert out[:dst_off] == b"\x55" * dst_off
        assert out[dst_off + num_bytes:] == b"\x55" * (64 - dst_off)


def test_plain_copy_rejects_bad_arguments_and_copies_nothing():
    dst = bytearray(10)
    with pytest.raises(ValueError, match="dst has 10 bytes, src 11"):
        copy(dst, b"x" * 11)
    with pytest.raises((BufferError, TypeError)):
        copy(b"\x00" * 4, b"abcd")
    with pytest.raises(TypeError):
        copy(dst)
    assert dst == bytearray(10)


# NOTE: around the two-thread split (from 2 MiB, csrc/cpu/copy_split.h: 64 KiB chunks, the
# last one running to the end) and the XXH3 long-hash edges
PUT_SIZES = [0, 1, 241, (1 << 20) - 1, 1 << 20, (1 << 20) + 65, (2 << 20) - 1, 2 << 20,
             (2 << 20) + 1, (2 << 20) + 63, (4 << 20) + 12345, (9 << 20) + 7]


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("num_bytes", PUT_SIZES)
def test_put_copy_hash_gives_the_store_checksum_and_exact_bytes(num_bytes, num_threads):
    base = _random(num_bytes + 64, num_bytes + 2)
    for src_off, dst_off in _OFFSETS:
        src = memoryview(base)[src_off:src_off + num_bytes]
        out = bytearray(b"\x55" * (num_bytes + 64))
        dst = memoryview(out)[dst_off:dst_off + num_bytes]
        assert put_copy_hash_many([dst], [src], num_threads) == [checksum(src)]
        assert dst == src
        assert out[:dst_off] == b"\x55" * dst_off
        assert out[dst_off + num_bytes:] == b"\x55" * (64 - dst_off)


@pytest.mark.parametrize("num_bytes", [(2 << 20) + 5, (4 << 20) + 3])
def test_two_thread_plain_copy_is_exact_and_writes_nothing_else(num_bytes):
    base = _random(num_bytes + 64, num_bytes + 3)
    for src_off, dst_off in _OFFSETS:
        src = memoryview(base)[src_off:src_off + num_bytes]
        out = bytearray(b"\x55" * (num_bytes + 64))
        dst = memoryview(out)[dst_off:dst_off + num_bytes]
        assert copy(dst, src, 2) is None
        assert dst == src
        assert out[:dst_off] == b"\x55" * dst_off
        assert out[dst_off + num_bytes:] == b"\x55" * (64 - dst_off)


def test_two_threads_many_times_in_a_row_never_mix_bytes_up():
    # NOTE: each call's helper must be done with its chunks before the call returns: a late
    # helper writing an earlier call's source would show here as wrong bytes in dst
    srcs = [_random(3 << 20, seed) for seed in range(4)]
    dst = bytearray(3 << 20)
    for i in range(40):
        src = srcs[i % 4]
        assert put_copy_hash_many([dst], [src], 2) == [checksum(src)]
        assert dst == src
        copy(dst, srcs[(i + 1) % 4], 2)
        assert dst == srcs[(i + 1) % 4]


def test_put_copy_hash_rejects_bad_arguments_and_copies_nothing():
    dst = bytearray(3 << 20)
    src = _random(3 << 20, 1)
    for bad in (0, 3, -1):
        with pytest.raises(ValueError, match="num_threads must be 1 or 2"):
            put_copy_hash_many([dst], [src], bad)
        with pytest.raises(ValueError, match="num_threads must be 1 or 2"):
            copy(dst, src, bad)
    with pytest.raises(TypeError):
        put_copy_hash_many([dst], [src], "2")
    with pytest.raises(ValueError, match="dst has"):
        put_copy_hash_many([dst, bytearray(4)], [src, b"abc"], 2)
    with pytest.raises(TypeError):
        copy(dst, src, 2, 2)
    assert not any(dst)
