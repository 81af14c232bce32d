"""The write guard's committed-range map in C++ (``kvstore._copy_hash.RangeTable``) against
a plain Python model of the rule it replaced (a sorted map per segment: offset -> (end, seq,
key), the overlap walk of ``WriteGuard._check_free``), on random operation sequences; its
bad input; and the batched shm location publish (``loc_publish_many``) against one
``loc_publish`` per object."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvstore import _copy_hash as _c
from kvstore import _loc_table as lt


class Model:
    """The reference: what the SortedDict-based guard decided."""

    def __init__(self):
        self.segments: dict[str, dict[int, tuple[int, int, str]]] = {}
        self.newest_seq: dict[str, int] = {}

    def note(self, segment, key, offset, length, seq):
        self.segments.setdefault(segment, {})[offset] = (offset + length, seq, key)
        self.newest_seq[segment] = max(self.newest_seq.get(segment, 0), seq)

    def newer_overlap(self, segment, offset, length, node_seq):
        ranges = self.segments.get(segment, {})
        end = offset + length
        for start in sorted((s for s in ranges if s < end), reverse=True):
            obj_end, seq, key = ranges[start]
            if offset < obj_end and seq > node_seq:
                return (key, start, obj_end)
            if start < offset:
                break
        return None

    def freed(self, segment, key, offset):
        ranges = self.segments.get(segment, {})
        if offset in ranges and ranges[offset][2] == key:
            del ranges[offset]


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_decide_as_the_sorted_map_did(seed):
    rng = random.Random(seed)
    table, model = _c.RangeTable(), Model()
    segments = ["dram0", "ssd0", "".join(["dram", "0"])]   # the third equals the first
    for step in range(3000):
        segment = rng.choice(segments)
        offset = rng.randrange(0, 64) * 4096
        length = rng.choice((4096, 8192, 65536, 1))
        key = f"k{rng.randrange(40)}"
        seq = rng.randrange(1, 50)
        op = rng.random()
        if op < 0.35:
            table.note(segment, key, offset, length, seq)
            model.note(segment, key, offset, length, seq)
        elif op < 0.45:
            batch = [(rng.choice(segments), f"k{rng.randrange(40)}",
                      rng.randrange(0, 64) * 4096, 4096) for _ in range(rng.randrange(1, 8))]
            table.note_many(batch, seq)
            for entry in batch:
                model.note(*entry, seq)
        elif op < 0.65:
            assert table.newer_overlap(segment, offset, length, seq) == \
                model.newer_overlap(segment, offset, length, seq), step
        elif op < 0.8:
            check = rng.random() < 0.8
            expected = model.newer_overlap(segment, offset, length, seq) if check else None
            assert table.claim(segment, key, offset, length, seq, check) == expected, step
            if expected is None:
                model.note(segment, key, offset, length, seq + 1)
        elif op < 0.97:
            table.freed(segment, key, offset)
            model.freed(segment, key, offset)
        else:
            table.clear()
            model = Model()
        if step % 100 == 0:
            assert len(table) == sum(len(r) for r in model.segments.values())
            assert table.newest() == {s: n for s, n in model.newest_seq.items()
                                      if s in model.segments}
    for segment, ranges in model.segments.items():
        for offset, (end, seq, key) in ranges.items():
            assert table.get(segment, offset) == (key, end, seq)


def test_freed_forgets_only_the_keys_own_range_and_newest_never_falls():
    table = _c.RangeTable()
    table.note("dram0", "a", 0, 4096, 7)
    table.freed("dram0", "b", 0)                       # another key's free: kept
    assert table.get("dram0", 0) == ("a", 4096, 7)
    table.freed("dram0", "a", 0)
    assert table.get("dram0", 0) is None and len(table) == 0
    assert table.newest() == {"dram0": 7}
    assert table.newer_overlap("dram0", 0, 4096, 0) is None
    table.freed("nowhere", "a", 0)                     # an unknown segment: nothing to do


def test_bad_input_raises_and_changes_nothing():
    table = _c.RangeTable()
    table.note("dram0", "a", 0, 4096, 3)
    with pytest.raises(TypeError, match="tuple"):
        table.note_many([("dram0", "b", 8192, 4096), ("dram0", "c", 4096)], 9)
    with pytest.raises(TypeError, match="str"):
        table.note_many([("dram0", "b", 8192, 4096), ("dram0", b"c", 4096, 1)], 9)
    with pytest.raises(OverflowError):
        table.note_many([("dram0", "b", 8192, 4096), ("dram0", "c", -1, 1)], 9)
    assert len(table) == 1 and table.newest() == {"dram0": 3}
    with pytest.raises(TypeError, match="str"):
        table.note(7, "a", 0, 1, 1)
    with pytest.raises(TypeError, match="str"):
        table.claim("dram0", None, 0, 1, 1, True)
    with pytest.raises(TypeError):
        table.newer_overlap("dram0", 0, 1)
    assert table.get("dram0", 0) == ("a", 4096, 3) and len(table) == 1


def test_keys_are_kept_alive_by_the_table():
    table = _c.RangeTable()
    table.note("dram0", "".join(["k", "ey"]) * 3, 0, 64, 1)
    table.note("dram0", "".join(["x", "y"]), 0, 64, 2)       # replaces the first key
    assert table.claim("dram0", "z", 32, 64, 1, True) == ("xy", 0, 64)


def _table(num_slots: int = lt.MIN_SLOTS) -> tuple[np.ndarray, int]:
    words = np.zeros(lt.table_bytes(num_slots) // 8, dtype=np.uint64)
    address = int(words.ctypes.data)
    _c.loc_set(address, lt.WORD_SLOTS, num_slots)
    _c.loc_set(address, lt.WORD_EPOCH, 3)
    _c.loc_set(address, lt.WORD_MAGIC, lt.MAGIC)
    return words, address


def test_publish_many_writes_what_one_publish_per_object_writes():
    rng = random.Random(1)
    keys = [f"key/{i}/{'é' * (i % 3)}" for i in range(300)]
    offsets = [rng.randrange(1 << 30) // 64 * 64 for _ in keys]
    lengths = [rng.randrange(1, 1 << 20) for _ in keys]
    checksums = [rng.randrange(1 << 64) for _ in keys]
    one, one_address = _table()
    many, many_address = _table()
    for key, offset, length, checksum in zip(keys, offsets, lengths, checksums):
        _c.loc_publish(one_address, offset, 3, lt.key_hash(key), length, checksum)
    _c.loc_publish_many(many_address, 3, keys, offsets, lengths, checksums)
    assert np.array_equal(one, many)
    assert _c.loc_read(many_address, offsets[-1])[2:5] == (lt.key_hash(keys[-1]), lengths[-1],
                                                           checksums[-1])


@pytest.mark.parametrize("args, error", [
    ((["a", "b"], [0], [1, 1], [0, 0]), ValueError),
    ((["a", 5], [0, 64], [1, 1], [0, 0]), TypeError),
    ((["a", "b"], [0, -64], [1, 1], [0, 0]), OverflowError),
    ((("a",), [0], [1], [0]), TypeError),
])
def test_publish_many_bad_input_writes_no_slot(args, error):
    words, address = _table()
    before = words.copy()
    with pytest.raises(error):
        _c.loc_publish_many(address, 3, *args)
    assert np.array_equal(words, before)
    with pytest.raises(ValueError, match="no table"):
        _c.loc_publish_many(0, 3, [], [], [], [])


def test_a_dram_backends_batched_note_publishes_raw_objects_only_and_counts_all():
    from kvstore.daemon.backends import ShmBackend

    backend = ShmBackend("dram0", 8 << 20, name_prefix="kvstore-test-notemany", prefault=False)
    try:
        address = backend.locations._address
        keys, offsets = ["raw-a", "lz4-b", "raw-c"], [0, 4096, 8192]
        backend.note_stored_many(keys, offsets, [100, 200, 300], [11, 22, 33], [0, 1, 0])
        assert backend.used_bytes == 600
        assert _c.loc_read(address, 0)[2:5] == (lt.key_hash("raw-a"), 100, 11)
        assert _c.loc_read(address, 8192)[2:5] == (lt.key_hash("raw-c"), 300, 33)
        slot = _c.loc_read(address, 4096)
        assert slot is None or slot[3] == 0       # the compressed object is not published
        backend.note_freed("raw-a", 0, 100)
        assert backend.used_bytes == 500
    finally:
        backend.close()
