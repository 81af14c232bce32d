"""Pre-writing a fresh SSD data file with zeros (kvstore/daemon/ssd_prewrite.py, 9s): the
whole file is written once in the background, regions a write claimed are skipped, no
zero ever lands on bytes a write stored, even while both run at once, and a pass cut short
by a stop is resumed at the next start without touching a stored object (9p)."""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from kvstore.client.checksum import checksum
from kvstore.daemon.aligned_io import AlignedFile, open_direct
from kvstore.daemon.ssd import DATA_NAME, SsdBackend
from kvstore.daemon.ssd_files import PREWRITE_NAME
from kvstore.daemon.ssd_prewrite import REGION_BYTES, Prewriter

MIB = 1 << 20


def _bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _written_extents_start(path) -> int | None:
    """Where the file's first data (not a hole, not an unwritten extent on ext4/xfs) is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:
        return None           # no data at all: holes or unwritten extents only
    finally:
        os.close(fd)


def test_a_claimed_region_is_skipped_and_the_rest_written_with_zeros(tmp_path):
    path = tmp_path / "data"
    fd, direct = open_direct(str(path), os.O_CREAT | os.O_RDWR)
    os.ftruncate(fd, 3 * REGION_BYTES)
    file = AlignedFile(fd, direct=direct)
    value = _bytes(3 * MIB, 1)
    try:
        prewriter = Prewriter(file, 3 * REGION_BYTES)
        prewriter.claim(REGION_BYTES + 5, len(value))        # the middle region only
        file.write(REGION_BYTES + 5, memoryview(value))
        prewriter.start()
        assert prewriter.done.wait(60)
        assert prewriter.num_zeroed_bytes == 2 * REGION_BYTES
        out = bytearray(len(value))
        file.read(REGION_BYTES + 5, memoryview(out))
        assert bytes(out) == value
        head = bytearray(REGION_BYTES)
        file.read(0, memoryview(head))
        assert not any(head)
        prewriter.claim(0, 100)       # after the pass: returns at once, nothing to keep off
    finally:
        file.close()
        os.close(fd)


def test_writes_during_the_pass_keep_every_byte_and_survive_a_reopen(tmp_path):
    size = 42 * REGION_BYTES
    backend = SsdBackend("ssd0", size, directory=str(tmp_path), node_id="n1")
    assert backend.prewriter is not None and backend.direct_io
    values: dict[str, tuple[int, bytes]] = {}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(10):
                # NOTE: one object per region edge, straddling it, at unaligned offsets
                offset = (i * 10 + j + 1) * REGION_BYTES - 150_000 - 4096 * i - 64
                value = _bytes(300_000 + 4096 * j, i * 10 + j)
                backend.write_stream(offset, len(value), _filler(value))
                values[f"k{i}/{j}"] = (offset, value)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert backend.prewriter.done.wait(120)
    for key, (offset, value) in values.items():
        out = bytearray(len(value))
        backend.read_into(offset, memoryview(out))
        assert bytes(out) == value, key
        backend.note_stored(key, offset, len(value), checksum(value), 0)
    backend.sync()
    backend.close()
    reopened = SsdBackend("ssd0", size, directory=str(tmp_path), node_id="n1")
    try:
        assert reopened.prewriter is None          # an existing file is not pre-written again
        assert len(reopened.recovered) == len(values) and reopened.num_dropped_at_start == 0
    finally:
        reopened.close()


def test_a_fresh_file_ends_up_written_and_buffered_files_are_left_alone(tmp_path):
    direct = SsdBackend("ssd0", 4 * REGION_BYTES, directory=str(tmp_path / "d"),
                        node_id="n1")
    try:
        assert direct.prewriter.done.wait(60)
        assert direct.prewriter.num_zeroed_bytes == 4 * REGION_BYTES
        # NOTE: posix_fallocate's unwritten extents read as holes to SEEK_DATA on ext4 and
        # xfs; after the pass the file is data from its first byte
        assert _written_extents_start(tmp_path / "d" / DATA_NAME) == 0
    finally:
        direct.close()
    buffered = SsdBackend("ssd0", 4 * REGION_BYTES, directory=str(tmp_path / "b"),
                          node_id="n1", direct_io=False)
    try:
        assert buffered.prewriter is None
    finally:
        buffered.close()


def _filler(value: bytes):
    """A ``fill`` for ``write_stream`` that hands out ``value`` piece by piece."""
    done = [0]

    def fill(view: memoryview) -> None:
        view[:] = value[done[0]:done[0] + len(view)]
        done[0] += len(view)
    return fill


def test_a_pass_cut_short_by_a_stop_is_resumed_without_touching_stored_objects(tmp_path):
    """A stop in the middle of the pass notes how far it got; the next start on the
    directory resumes there, after claiming every recovered object's extent (one lies
    beyond the stop point, in a region only the lost in-memory claim had kept off), and
    zeroes only the rest; a note older than the zeros (a SIGKILL between notes: here the
    note of the very start) makes it zero again everything no object claims, never an
    object. Once complete, the note is gone and a further start pre-writes nothing."""
    num_regions, stop_region = 12, 4
    size = num_regions * REGION_BYTES
    reached, release = threading.Event(), threading.Event()
    write_zeros = Prewriter._write_zeros

    def held_at_the_stop_region(self, data, offset):
        if offset == stop_region * REGION_BYTES and not release.is_set():
            reached.set()
            assert release.wait(60), "never released"
        write_zeros(self, data, offset)
    Prewriter._write_zeros = held_at_the_stop_region
    values = {"before": (REGION_BYTES + 100, _bytes(MIB, 1)),              # region 1
              "beyond": (7 * REGION_BYTES + 5000, _bytes(2 * MIB, 2))}     # region 7
    try:
        backend = SsdBackend("ssd0", size, directory=str(tmp_path), node_id="n1")
        assert backend.prewriter is not None and backend.direct_io
        for key, (offset, value) in values.items():
            if key == "beyond":
                assert reached.wait(60)   # the pass is at the stop region: 7 not reached
            backend.write_stream(offset, len(value), _filler(value))
            backend.note_stored(key, offset, len(value), checksum(value), 0)
        backend.sync()
        closing = threading.Thread(target=backend.close)
        closing.start()
        while not backend.prewriter._stop.is_set():     # close() asked the pass to stop
            closing.join(0.01)
        release.set()
        closing.join(60)
        assert not closing.is_alive()
    finally:
        Prewriter._write_zeros = write_zeros
    note = tmp_path / PREWRITE_NAME
    assert json.loads(note.read_text()) == {"next_bytes": (stop_region + 1) * REGION_BYTES}

    def reopen_and_finish(expected_zeroed_regions: int) -> None:
        reopened = SsdBackend("ssd0", size, directory=str(tmp_path), node_id="n1")
        try:
            assert reopened.prewriter is not None
            assert reopened.prewriter.done.wait(120)
            assert reopened.prewriter.num_zeroed_bytes == expected_zeroed_regions * REGION_BYTES
            assert sorted(e.key for e in reopened.recovered) == sorted(values)
            for key, (offset, value) in values.items():
                out = bytearray(len(value))
                reopened.read_into(offset, memoryview(out))
                assert bytes(out) == value, key
        finally:
            reopened.close()
        assert not note.exists()               # complete: nothing left to resume
    # regions 5, 6 and 8-11: region 7 holds "beyond", claimed from the index
    reopen_and_finish(num_regions - (stop_region + 1) - 1)
    note.write_text(json.dumps({"next_bytes": 0}))   # a note from before most zeros
    reopen_and_finish(num_regions - 2)               # all but the two objects' regions
    done = SsdBackend("ssd0", size, directory=str(tmp_path), node_id="n1")
    try:
        assert done.prewriter is None
    finally:
        done.close()


def test_a_bad_prewrite_note_is_not_resumed(tmp_path):
    backend = SsdBackend("ssd0", 2 * REGION_BYTES, directory=str(tmp_path), node_id="n1")
    assert backend.prewriter.done.wait(60)
    backend.close()
    for bad in ("{not json", json.dumps({"next_bytes": -1}), json.dumps({"other": 3})):
        (tmp_path / PREWRITE_NAME).write_text(bad)
        reopened = SsdBackend("ssd0", 2 * REGION_BYTES, directory=str(tmp_path),
                              node_id="n1")
        try:
            assert reopened.prewriter is None, bad
        finally:
            reopened.close()
