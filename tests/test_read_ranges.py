"""``kvstore._copy_hash.read_ranges`` (csrc/cpu/read_ranges.cpp), the C half of the same-host
batch read: per key it reads the first replica whose segment is mapped, verifies against the
recorded checksum, and hands every key it cannot serve back as "slow" (never wrong bytes);
malformed argument lists raise. A numpy array stands in for a mapped segment."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore._copy_hash import read_ranges
from kvstore.client.checksum import EMPTY_CHECKSUM, checksum


def segment(num_bytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, num_bytes, np.uint8)


def call(dsts, sizes, sums, starts, counts, seg_of, offsets, segments, verify=True):
    return read_ranges(dsts, sizes, sums, starts, counts, seg_of, offsets,
                       [s.ctypes.data if s is not None else 0 for s in segments],
                       [s.nbytes if s is not None else 0 for s in segments],
                       verify, EMPTY_CHECKSUM, [None] * len(segments), 1 << 21, None)


def test_each_key_gets_its_range_and_a_bad_digest_is_slow():
    seg = segment(4096, 1)
    ranges = [(0, 64), (100, 17), (4000, 96), (2048, 1)]
    dsts = [bytearray(n) for _, n in ranges]
    sums = [checksum(seg[o:o + n].tobytes()) for o, n in ranges]
    sums[2] ^= 1  # the store recorded another value: this key must not pass
    written, slow = call(dsts, [n for _, n in ranges], sums, [0, 1, 2, 3], [1, 1, 1, 1],
                         [0, 0, 0, 0], [o for o, _ in ranges], [seg])
    assert written == [64, 17, None, 1] and slow == [2]
    for (offset, num), dst in zip(ranges, dsts):
        if num != 96:
            assert bytes(dst) == seg[offset:offset + num].tobytes()
    # verify off: the bytes are copied as they are
    written, slow = call(dsts, [n for _, n in ranges], sums, [0, 1, 2, 3], [1, 1, 1, 1],
                         [0, 0, 0, 0], [o for o, _ in ranges], [seg], verify=False)
    assert written == [64, 17, 96, 1] and slow == []
    assert bytes(dsts[2]) == seg[4000:4096].tobytes()


def test_unmapped_replicas_are_skipped_and_unservable_keys_are_slow():
    seg = segment(1024, 2)
    value = seg[512:576].tobytes()
    dsts = [bytearray(64), bytearray(64), bytearray(64), bytearray(10), memoryview(b"r" * 64),
            None, bytearray(8)]
    # key 0: replica 0 in an unmapped segment, replica 1 mapped; key 1: only unmapped;
    # key 2: range past the segment's end; key 3: out too small; key 4: read-only out;
    # key 5: None (no destination); key 6: the empty marker (nothing read)
    written, slow = call(
        dsts, [64, 64, 64, 64, 64, 64, 1], [checksum(value)] * 6 + [EMPTY_CHECKSUM],
        [0, 2, 3, 4, 5, 6, 7], [2, 1, 1, 1, 1, 1, 1],
        [1, 0, 1, 0, 0, 0, 0, 0], [0, 512, 0, 1000, 512, 512, 512, 0], [seg, None])
    assert written == [64, None, None, None, None, None, 0]
    assert slow == [1, 2, 3, 4, 5]
    assert bytes(dsts[0]) == value
    assert dsts[1] == bytearray(64) and dsts[2] == bytearray(64) and dsts[6] == bytearray(8)


def test_malformed_replica_tables_are_slow_and_bad_lists_raise():
    seg = segment(256, 3)
    # replica slice past the table, segment index past the segments: slow, never read
    written, slow = call([bytearray(4), bytearray(4)], [4, 4], [0, 0], [5, 0], [1, 1],
                         [7], [0], [seg])
    assert written == [None, None] and slow == [0, 1]
    with pytest.raises(ValueError, match="sizes has 1 items"):
        call([bytearray(4), bytearray(4)], [4], [0, 0], [0, 0], [1, 1], [0], [0], [seg])
    with pytest.raises(TypeError, match="must be a list"):
        call([bytearray(4)], (4,), [0], [0], [1], [0], [0], [seg])
    with pytest.raises(TypeError):
        call([bytearray(4)], ["4"], [0], [0], [1], [0], [0], [seg])
    with pytest.raises(TypeError):
        read_ranges([], [], [])


def test_touched_chunks_are_populated_once_and_marked():
    seg = segment(8 * 4096, 4)
    flags = bytearray(8)          # one byte per 4 KiB chunk
    value = seg[4096 + 100:4096 + 100 + 5000].tobytes()   # chunks 1 and 2
    dst = bytearray(len(value))
    written, slow = read_ranges([dst], [len(value)], [checksum(value)], [0], [1], [0],
                                [4096 + 100], [seg.ctypes.data], [seg.nbytes], True,
                                EMPTY_CHECKSUM, [flags], 4096, None)
    assert written == [len(value)] and slow == [] and bytes(dst) == value
    assert list(flags) == [0, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(TypeError, match="bytearrays or None"):
        read_ranges([dst], [len(value)], [0], [0], [1], [0], [0], [seg.ctypes.data],
                    [seg.nbytes], True, EMPTY_CHECKSUM, [b"\0" * 8], 4096, None)


def test_cpu_torch_tensors_are_destinations_when_contiguous():
    torch = pytest.importorskip("torch")
    seg = segment(4096, 5)
    value = seg[64:128].tobytes()
    rows = torch.zeros(3, 64, dtype=torch.uint8)
    strided = torch.zeros(128, dtype=torch.uint8)[::2]
    dsts = [rows[0], rows[2], strided, torch.zeros(16, dtype=torch.float32)]
    args = ([64] * 4, [checksum(value)] * 4, [0] * 4, [1] * 4, [0], [64], [seg.ctypes.data],
            [seg.nbytes], True, EMPTY_CHECKSUM, [None], 4096)
    written, slow = read_ranges(dsts, *args, torch.Tensor)
    assert written == [64, 64, None, 64] and slow == [2]
    assert rows[0].numpy().tobytes() == value == rows[2].numpy().tobytes()
    assert rows[1].numpy().tobytes() == bytes(64) and dsts[3].numpy().tobytes() == value
    # without the tensor type a tensor is no destination (torch has no buffer protocol)
    written, slow = read_ranges(dsts[:1], [64], [checksum(value)], [0], [1], *args[4:], None)
    assert written == [None] and slow == [0]
