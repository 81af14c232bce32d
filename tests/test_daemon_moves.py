"""The daemon's tier moves on real backends (shm and an SSD file): ``copy_range``
copies exactly the range asked, refuses ranges outside a segment without touching a byte,
and ``MoveRunner`` reports each move done or failed and wakes its heartbeat."""

from __future__ import annotations

import threading

import pytest

from kvstore.daemon.moves import MoveRunner, copy_range
from kvstore.daemon.backends import ShmBackend
from kvstore.daemon.ssd import SsdBackend
from kvstore.rpc import TierMove

MiB = 1 << 20


def _read(backend, start: int, end: int) -> bytes:
    """Bytes [start, end) of ``backend`` (negative ``start``: from its end)."""
    if start < 0:
        start, end = backend.size_bytes + start, backend.size_bytes
    out = bytearray(end - start)
    backend.read_into(start, memoryview(out))
    return bytes(out)


@pytest.fixture
def segments(tmp_path):
    dram = ShmBackend("dram0", 4 * MiB, name_prefix="kvstore-test-moves", prefault=False)
    ssd = SsdBackend("ssd0", 16 * MiB, directory=str(tmp_path), node_id="n1")
    yield dram, ssd
    dram.close()
    ssd.close()


def test_copy_range_copies_exactly_the_range(segments):
    dram, ssd = segments
    data = bytes(range(256)) * (3 * MiB // 256 + 1)
    dram.write_from(64, memoryview(data[:3 * MiB]))
    copy_range(dram, 64, ssd, 9 * MiB, 3 * MiB)
    assert _read(ssd, 9 * MiB, 12 * MiB) == data[:3 * MiB]
    assert _read(ssd, 9 * MiB - 64, 9 * MiB) == b"\0" * 64      # neighbours untouched
    assert _read(ssd, 12 * MiB, 12 * MiB + 64) == b"\0" * 64


def test_copy_range_refuses_a_range_outside_a_segment(segments):
    dram, ssd = segments
    dram.write_from(0, memoryview(b"x" * 16))
    with pytest.raises(ValueError, match="outside"):
        copy_range(dram, 4 * MiB - 8, ssd, 0, 16)
    with pytest.raises(ValueError, match="outside"):
        copy_range(dram, 0, ssd, 16 * MiB - 8, 16)
    assert _read(ssd, 0, 16) == b"\0" * 16 and _read(ssd, -8, 0) == b"\0" * 8


def test_move_runner_reports_done_and_failed_and_wakes_the_heartbeat(segments):
    dram, ssd = segments
    dram.write_from(0, memoryview(b"\x07" * MiB))
    woke = threading.Event()
    runner = MoveRunner({"dram0": dram, "ssd0": ssd}, woke.set)
    try:
        runner.submit([TierMove(1, "a", "dram0", 0, "ssd0", 2 * MiB, MiB),
                       TierMove(2, "b", "dram0", 0, "nope", 0, MiB),        # unknown segment
                       TierMove(3, "c", "dram0", 4 * MiB, "ssd0", 0, MiB)])  # out of range
        assert woke.wait(10)
        assert runner.take_results() == ([1], [2, 3])
        assert runner.take_results() == ([], [])
        assert _read(ssd, 2 * MiB, 3 * MiB) == b"\x07" * MiB
        assert _read(ssd, 0, MiB) == b"\0" * MiB
        runner.restore([1], [])                    # a heartbeat that failed: sent again
        assert runner.take_results() == ([1], [])
    finally:
        runner.stop()


def test_move_runner_checks_each_destination_like_a_write(segments):
    """With a write guard holding the node's secret, a move lands only with the master's
    capability for exactly its destination range, and never over a committed object."""
    from kvstore import capability
    from kvstore.daemon.write_guard import WriteGuard

    dram, ssd = segments
    dram.write_from(0, memoryview(b"\x07" * MiB))
    ssd.write_from(5 * MiB, memoryview(b"\x05" * MiB))
    secret = capability.new_secret()
    guard = WriteGuard("n1")
    guard.set_secret(secret)
    guard.note_stored("ssd0", "committed", 5 * MiB, MiB, seq=9)   # learnt after seq 3

    def cap(offset: int, node_seq: int = 3) -> bytes:
        return capability.issue(secret, "n1", "ssd0", offset, MiB, "a",
                                capability.MASTER_WRITER, 2**62, node_seq)

    woke = threading.Event()
    runner = MoveRunner({"dram0": dram, "ssd0": ssd}, woke.set, guard)
    try:
        runner.submit([TierMove(1, "a", "dram0", 0, "ssd0", 2 * MiB, MiB, cap(2 * MiB)),
                       TierMove(2, "a", "dram0", 0, "ssd0", 3 * MiB, MiB),        # none
                       TierMove(3, "a", "dram0", 0, "ssd0", 4 * MiB, MiB, cap(2 * MiB)),
                       TierMove(4, "a", "dram0", 0, "ssd0", 5 * MiB, MiB, cap(5 * MiB))])
        assert woke.wait(10)
        assert runner.take_results() == ([1], [2, 3, 4])
        assert _read(ssd, 2 * MiB, 3 * MiB) == b"\x07" * MiB
        assert _read(ssd, 3 * MiB, 5 * MiB) == b"\0" * (2 * MiB)
        assert _read(ssd, 5 * MiB, 6 * MiB) == b"\x05" * MiB               # intact
    finally:
        runner.stop()
