"""The pipelined SSD paths (``AlignedFile.write_stream``/``read_stream`` through the SSD
backend): ranges at unaligned offsets over several pieces, neighbours sharing blocks written
by concurrent streams, a producer or consumer that fails mid-range, tier moves through the
streams, and a real daemon serving large SSD objects before and after a restart."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from client_cluster import payload
from servers import ServerProcess

import kvstore
from kvstore.daemon import aligned_io
from kvstore.daemon.aligned_io import (BLOCK_BYTES, MIN_STREAM_PIECE_BYTES,
                                      STREAM_CHUNK_BYTES, STREAM_DEPTH)
from kvstore.daemon.backends import ShmBackend
from kvstore.daemon.moves import copy_range
from kvstore.daemon.ssd import SsdBackend


@pytest.fixture(params=[True, False], ids=["direct", "buffered"])
def ssd(request, tmp_path):
    backend = SsdBackend("ssd0", 40 << 20, directory=str(tmp_path), node_id="n1",
                         direct_io=request.param)
    assert backend.direct_io == request.param  # ext4/xfs under tmp_path take O_DIRECT
    yield backend
    backend.close()


class _Source:
    """A ``fill`` that hands out ``data`` in order and records each piece's size."""

    def __init__(self, data: bytes, fail_after: int | None = None):
        self.data, self.done, self.sizes = data, 0, []
        self.fail_after = fail_after

    def __call__(self, piece: memoryview) -> None:
        if self.fail_after is not None and len(self.sizes) == self.fail_after:
            raise ConnectionResetError("peer went away")
        piece[:] = self.data[self.done:self.done + len(piece)]
        self.done += len(piece)
        self.sizes.append(len(piece))


def _read_all(ssd: SsdBackend, offset: int, length: int) -> bytes:
    out = bytearray()
    ssd.read_stream(offset, length, lambda piece: out.extend(piece))
    return bytes(out)


CASES = [(64, 100), (4000, 200), (BLOCK_BYTES, BLOCK_BYTES),
         (STREAM_CHUNK_BYTES - 64, 128),                                  # crosses a piece
         (3 * BLOCK_BYTES + 64, (STREAM_DEPTH + 2) * STREAM_CHUNK_BYTES + 7),  # > the ring
         (20 << 20, 4 << 20)]                                             # aligned 4 MiB


def test_streams_round_trip_at_unaligned_offsets_over_several_pieces(ssd):
    for i, (offset, length) in enumerate(CASES):
        data = payload(length, i)
        source = _Source(data)
        ssd.write_stream(offset, length, source)
        assert sum(source.sizes) == length
        # every piece but the last ends on a multiple of the smallest piece (so the next
        # starts on a block); the first pieces ramp up, the rest are at most a chunk
        ends = np.cumsum([offset, *source.sizes])[1:-1]
        assert all(end % MIN_STREAM_PIECE_BYTES == 0 for end in ends), (offset, length)
        assert source.sizes[0] <= MIN_STREAM_PIECE_BYTES
        assert max(source.sizes) <= STREAM_CHUNK_BYTES
        assert _read_all(ssd, offset, length) == data, (offset, length)
        out = bytearray(length)                       # the unpipelined path agrees
        ssd.read_into(offset, memoryview(out))
        assert bytes(out) == data


def test_a_write_stream_starts_small_so_its_disk_writes_overlap_its_receive(ssd):
    """A write's pieces ramp up (256 KiB, 512 KiB, then 1 MiB): a 1 MiB stream (a tcp
    stripe) is not one piece received whole before any byte reaches the disk; its first
    piece is written while the next is still to come."""
    data = payload(1 << 20, 7)
    first_written = threading.Event()
    waited: list[bool] = []

    class WaitingSource(_Source):
        def __call__(self, piece: memoryview) -> None:
            if len(self.sizes) == 1:      # the second piece: the first must be on its way
                waited.append(first_written.wait(30))
            super().__call__(piece)
    source = WaitingSource(data)
    write_piece = ssd._file._write_piece

    def noting_write(*args):
        first_written.set()
        write_piece(*args)
    ssd._file._write_piece = noting_write
    try:
        ssd.write_stream(4 << 20, len(data), source)
    finally:
        del ssd._file._write_piece
    assert source.sizes == [256 << 10, 512 << 10, 256 << 10]
    assert waited == [True]     # a piece was written while the next was still to come
    assert _read_all(ssd, 4 << 20, len(data)) == data


def test_a_read_stream_starts_small_so_its_first_piece_is_sent_while_the_rest_is_read(
        ssd, monkeypatch):
    """A read's pieces ramp up like a write's (256 KiB, 512 KiB, then 1 MiB): the first is
    handed to ``drain`` (the socket) while the later ones are still being read; the bytes
    come back whole and in order."""
    data = payload((3 << 20) + 100, 8)
    ssd.write_from(6 << 20, memoryview(data))
    first_drained = threading.Event()
    waited: list[bool] = []
    pread_all = aligned_io._pread_all

    def waiting_pread(fd, buffer, offset):
        if offset >= (6 << 20) + (1 << 20):   # a later piece: the first must be out first
            waited.append(first_drained.wait(30))
        pread_all(fd, buffer, offset)
    monkeypatch.setattr(aligned_io, "_pread_all", waiting_pread)
    sizes: list[int] = []
    out = bytearray()

    def drain(piece: memoryview) -> None:
        sizes.append(len(piece))
        out.extend(piece)
        first_drained.set()
    ssd.read_stream(6 << 20, len(data), drain)
    assert sizes == [256 << 10, 512 << 10, 1 << 20, 1 << 20, (256 << 10) + 100]
    assert waited and all(waited)   # the later reads waited for the first drain: no deadlock
    assert bytes(out) == data


def test_concurrent_streams_of_neighbours_sharing_blocks_keep_their_bytes(ssd):
    # 64-byte aligned neighbours: the block at each boundary is shared by two streams
    extents = [(i * (STREAM_CHUNK_BYTES + 1088), STREAM_CHUNK_BYTES + 1088) for i in range(12)]
    values = [payload(length, 100 + i) for i, (_, length) in enumerate(extents)]

    def writer(parity):
        for i in range(parity, len(extents), 2):
            offset, length = extents[i]
            ssd.write_stream(offset, length, _Source(values[i]))

    threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (offset, length), value in zip(extents, values):
        assert _read_all(ssd, offset, length) == value


def test_a_producer_failing_mid_range_leaves_neighbours_intact_and_the_file_usable(ssd):
    before, after = payload(1000, 1), payload(1000, 2)
    ssd.write_from(0, memoryview(before))
    length = 3 * STREAM_CHUNK_BYTES
    ssd.write_from(1024 + length, memoryview(after))
    with pytest.raises(ConnectionResetError):
        ssd.write_stream(1024, length, _Source(payload(length, 3), fail_after=2))
    assert _read_all(ssd, 0, 1000) == before
    assert _read_all(ssd, 1024 + length, 1000) == after
    data = payload(length, 4)                       # the same thread's ring is reusable
    ssd.write_stream(1024, length, _Source(data))
    assert _read_all(ssd, 1024, length) == data


def test_a_consumer_failing_mid_range_propagates_and_reads_go_on(ssd):
    data = payload(5 * STREAM_CHUNK_BYTES, 5)
    ssd.write_from(64, memoryview(data))
    seen = []

    def drain(piece):
        if len(seen) == 1:
            raise BrokenPipeError("client closed")
        seen.append(bytes(piece))

    with pytest.raises(BrokenPipeError):
        ssd.read_stream(64, len(data), drain)
    assert seen[0] == data[:len(seen[0])]
    assert _read_all(ssd, 64, len(data)) == data


def test_a_read_past_the_file_raises_oserror(tmp_path):
    backend = SsdBackend("ssd0", 1 << 20, directory=str(tmp_path), node_id="n1")
    try:
        if backend.prewriter is not None:          # its zeros would grow the file again
            assert backend.prewriter.done.wait(60)
        os.truncate(backend.path, 4096)            # the file shrank under us
        with pytest.raises(OSError, match="ends before"):
            backend.read_stream(0, 1 << 20, lambda piece: None)
    finally:
        backend.close()


def test_tier_moves_go_through_the_streams_both_ways(ssd):
    dram = ShmBackend("dram0", 16 << 20, name_prefix="kvstore-test-streams")
    try:
        data = payload(5 * STREAM_CHUNK_BYTES + 333, 9)
        dram.write_from(4096 + 64, memoryview(data))
        copy_range(dram, 4096 + 64, ssd, 777 * 64, len(data))          # demotion
        assert _read_all(ssd, 777 * 64, len(data)) == data
        copy_range(ssd, 777 * 64, dram, 8 << 20, len(data))            # promotion
        assert bytes(dram.view(8 << 20, len(data))) == data
    finally:
        dram.close()


def test_a_daemon_serves_large_ssd_objects_before_and_after_a_restart(tmp_path):
    sizes = [64, STREAM_CHUNK_BYTES - 1, 4 << 20, 9 * STREAM_CHUNK_BYTES + 4097]
    values = {f"big/{i}": payload(size, 20 + i) for i, size in enumerate(sizes)}
    daemon_args = ["--dram", "16MiB", "--ssd", f"{tmp_path}:64MiB", "--node-id", "streams-node",
                   "--no-reap-orphans"]
    # NOTE: --promote off: the gets below would otherwise move the objects to DRAM (a hit
    # promotes, and the SSD copy is freed), and DRAM does not survive the restart
    with ServerProcess(["master", "--port", "0", "--heartbeat-interval", "100ms",
                        "--promote", "off"]) as master:
        with ServerProcess(["daemon", "--master", master.address, *daemon_args]) as daemon:
            with kvstore.connect(master.address, transport="tcp") as store:
                for key, value in values.items():
                    store.put(key, value, tier="ssd")
                for key, value in values.items():
                    assert store.get(key) == value
            assert "direct I/O" in daemon.stderr()
        with ServerProcess(["daemon", "--master", master.address, *daemon_args]) as restarted:
            with kvstore.connect(master.address, transport="tcp") as store:
                # NOTE: a bound for a loaded machine, not a timing margin
                deadline = time.monotonic() + 60
                while not all(store.exists(key) for key in values):  # re-registration
                    assert time.monotonic() < deadline, \
                        f"objects not re-registered; daemon log:\n{restarted.stderr()}"
                    time.sleep(0.05)
                for key, value in values.items():
                    assert store.get(key) == value
            assert "recovered 4 object(s)" in restarted.stderr()


def test_a_single_4mib_ssd_put_commits_in_one_unstriped_write_and_survives_a_sigkill(
        tmp_path, monkeypatch):
    """A single tcp put into the SSD tier goes as one WRITE_COMMIT (not 4 stripes and a
    CLIENT_COMMIT): no commit frame is sent, its index record is on disk when the put
    returns (heartbeats are slow: nothing else could have delivered it), and a daemon
    SIGKILLed right after serves it with its bytes once restarted. A DRAM put of the same
    size, and an SSD put of 16 MiB, keep the striped WRITEs and the CLIENT_COMMIT."""
    from kvstore.client.committer import DaemonCommitter
    from kvstore.daemon.ssd import INDEX_NAME
    from kvstore.daemon.ssd_index import load_index
    from kvstore.transport.tcp import TcpTransport

    sent, write_commits = [], []
    begin, write_commit = DaemonCommitter.begin, TcpTransport.write_commit
    monkeypatch.setattr(DaemonCommitter, "begin", lambda self, entries, deadline, *rest:
                        sent.append(entries) or begin(self, entries, deadline, *rest))
    monkeypatch.setattr(TcpTransport, "write_commit", lambda self, target, *args, **kwargs:
                        write_commits.append(target.length) or
                        write_commit(self, target, *args, **kwargs))
    daemon_args = ["daemon", "--dram", "16MiB", "--ssd", f"{tmp_path}:64MiB", "--node-id",
                   "one-stream", "--no-reap-orphans"]
    value, dram_value = payload(4 << 20, 41), payload(4 << 20, 42)
    with ServerProcess(["master", "--port", "0", "--heartbeat-interval", "3s",
                        "--promote", "off"]) as master:
        daemon = ServerProcess([*daemon_args, "--master", master.address])
        try:
            with kvstore.connect(master.address, transport="tcp") as store:
                store.put("one/ssd", value, tier="ssd")
                assert write_commits == [4 << 20] and sent == []
                assert "one/ssd" in load_index(str(tmp_path / INDEX_NAME))[0]
                store.put("one/dram", dram_value, tier="dram")
                assert write_commits == [4 << 20] and len(sent) == 1
                big = payload(16 << 20, 43)        # longer: stripes and a CLIENT_COMMIT
                store.put("one/big", big, tier="ssd")
                assert write_commits == [4 << 20] and len(sent) == 2
                assert store.get("one/big") == big
                assert store.get("one/ssd") == value
        finally:
            daemon.kill()
            daemon.close()
        with ServerProcess([*daemon_args, "--master", master.address]):
            with kvstore.connect(master.address, transport="tcp") as store:
                deadline = time.monotonic() + 60     # a bound for a loaded machine
                while not store.exists("one/ssd"):   # re-registration
                    assert time.monotonic() < deadline, "not re-registered"
                    time.sleep(0.05)
                assert store.get("one/ssd") == value
