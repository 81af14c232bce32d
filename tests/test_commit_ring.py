"""The commit ring (kvstore/commit_ring.py, daemon/ring_drain.py; durable commit for same-host
puts, issue 10): what must hold.

Format level (a ring this test creates): records round-trip; a torn record (half a record
published) is ignored and counted, never handed on, and the region keeps working; several
writer processes appending at once never lose, duplicate or corrupt a record; a full region
refuses the append. With real master and daemon processes: a put through shared memory is
durable without waking the daemon (SIGSTOPped from write to master SIGKILL, then adopted by
a restarted master); a record with a forged capability is not applied nor adopted; a full
ring falls back to CLIENT_COMMIT and the put succeeds; a ring-committed put the master
refuses (revoked) is not resurrected by a restarted master; a commit whose capability is
about to expire goes by frame, not into the ring, so the daemon's refusal reaches the writer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

from client_cluster import payload
from crash_servers import daemon_process, master_process, wait_adopted
from stopped_process import stop_process

import kvstore
from kvstore import capability, commit_ring
from kvstore._deadline import Deadline
from kvstore._posix_shm import unique_shm_name
from kvstore.client.checksum import checksum
from kvstore.client.committer import DaemonCommitter
from kvstore.commit_ring import RingReader, encode_record, writer_for
from kvstore.rpc import connect_master
from kvstore.transport.shm import ShmTransport

SLOW_BEAT = ("--heartbeat-interval", "3s", "--node-ttl", "60s")
SIZE = 5000


@pytest.fixture
def ring():
    reader = RingReader(unique_shm_name("kvstore-ringtest"), num_regions=4,
                        region_bytes=4096)
    yield reader
    reader.close()


def _drain_all(reader):
    got = []
    reader.drain(lambda writer, body: got.append((writer, body)))
    return got


def test_records_round_trip_and_a_full_region_refuses(ring):
    writer = commit_ring.RingWriter(ring.name)
    assert writer.append(encode_record("alice", b"one"))
    assert writer.append(encode_record("bob", b"two" * 100))
    assert ring.pending()
    assert _drain_all(ring) == [("alice", b"one"), ("bob", b"two" * 100)]
    assert not ring.pending() and ring.num_torn == 0
    # fill the region: the append that does not fit is refused, nothing half-written
    record = encode_record("w", b"x" * 1000)
    count = 0
    while writer.append(record):
        count += 1
    assert count == 4096 // len(record)
    assert _drain_all(ring) == [("w", b"x" * 1000)] * count
    assert writer.append(record)            # room again once drained (positions wrap)
    assert _drain_all(ring) == [("w", b"x" * 1000)]
    assert not writer.append(b"\0" * 8192)  # larger than a region: never fits


def test_a_torn_record_is_ignored_and_counted(ring):
    writer = commit_ring.RingWriter(ring.name)
    assert writer.append(encode_record("alice", b"before"))
    assert _drain_all(ring) == [("alice", b"before")]
    # a writer that died mid-append and whose position got published anyway: half a
    # record (its CRC cannot match), then a record of a length past the published end
    layout = writer.layout
    region = writer._region
    record = encode_record("mallory", b"y" * 200)
    pos = layout.write_pos[region]
    at = pos % layout.region_bytes
    layout.region(region)[at:at + len(record) // 2] = record[:len(record) // 2]
    layout.write_pos[region] = pos + len(record)
    assert _drain_all(ring) == []
    assert ring.num_torn == 1
    # a checksum that does not match the bytes (scribbled), published whole
    bad = bytearray(encode_record("mallory", b"z" * 64))
    bad[-10] ^= 0xFF
    assert zlib.crc32(bytes(bad[8:])) != int.from_bytes(bad[4:8], "little")
    pos = layout.write_pos[region]
    at = pos % layout.region_bytes
    layout.region(region)[at:at + len(bad)] = bad
    layout.write_pos[region] = pos + len(bad)
    assert _drain_all(ring) == []
    assert ring.num_torn == 2
    # the region keeps working for its writer
    assert writer.append(encode_record("alice", b"after"))
    assert _drain_all(ring) == [("alice", b"after")]


_WRITER = """
import sys, time
from kvstore.commit_ring import writer_for, encode_record
name, who, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
writer = writer_for(name)
for i in range(count):
    record = encode_record(who, f"{who}:{i}:".encode() + bytes([i % 251]) * (i % 300))
    while not writer.append(record):
        time.sleep(0.001)   # the region is full: the reader drains it
print("done", flush=True)
"""


def test_concurrent_writer_processes_never_lose_or_corrupt_a_record(ring):
    count = 400
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, ring.name, f"w{n}", str(count)],
                              stdout=subprocess.PIPE, text=True) for n in range(3)]
    got = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < 3 * count:
            assert time.monotonic() < deadline, f"only {len(got)} records drained"
            if not ring.drain(lambda writer, body: got.append((writer, body))):
                time.sleep(0.001)   # nothing published yet: the writers are starting
        for proc in procs:
            assert proc.wait(timeout=30) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert ring.num_torn == 0
    for n in range(3):
        mine = [body for writer, body in got if writer == f"w{n}"]
        assert mine == [f"w{n}:{i}:".encode() + bytes([i % 251]) * (i % 300)
                        for i in range(count)]


# ---- with real processes ------------------------------------------------------------------

def _master(*args, port=0):
    return master_process(*SLOW_BEAT, *args, port=port)


def _daemon(master, *args):
    return daemon_process(master, "--dram", "16MiB", *args)


def _restart(master, port):
    master.kill()
    master.close()
    return _master(port=port)


def _shm_written(client, keys, value, client_id="raw-writer"):
    """PutStart ``keys`` and write ``value`` to each one's replica through shared memory."""
    slots = client.put_start(keys, [len(value)] * len(keys), client_id=client_id)
    assert slots.client_commit and slots.commit_rings, "the node should offer its ring"
    shm = ShmTransport()
    try:
        for targets in slots:
            shm.write(targets[0], memoryview(value), timeout_s=10)
    finally:
        shm.close()
    return slots


def _wait_drained(ring_name):
    # NOTE: through this process's writer, not a new mapping: closing another descriptor
    # of the ring's file would drop this process's region lock (POSIX record locks)
    layout = writer_for(ring_name).layout
    deadline = time.monotonic() + 30
    while any(layout.write_pos[i] != layout.read_pos[i] for i in range(layout.num_regions)):
        assert time.monotonic() < deadline, "the daemon never drained its ring"
        time.sleep(0.01)  # the daemon's drain thread


def test_an_shm_put_is_durable_without_waking_the_daemon():
    master = _master()
    port = master.port
    daemon = _daemon(master)
    restarted = None
    try:
        value = payload(64 * 1024, seed=3)
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
            stop_process(daemon.proc.pid)    # it cannot confirm anything now
            try:
                store.put("asleep/key", value)          # returns: the ring holds the commit
                master.kill()
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
        restarted = _restart(master, port)
        wait_adopted(restarted, "asleep/key")
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert store.get("asleep/key") == value
    finally:
        daemon.close()
        master.close()
        if restarted is not None:
            restarted.close()


def test_a_forged_ring_record_is_not_applied_nor_adopted():
    master = _master()
    port = master.port
    daemon = _daemon(master)
    client = restarted = None
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
        client, _ = connect_master(master.address)
        value = payload(SIZE, seed=5)
        slots = _shm_written(client, ["forged", "wrongkey"], value)
        ring_name = next(iter(slots.commit_rings.values()))
        forged = slots[0][0]
        blob = bytearray(forged.capability)
        blob[-1] ^= 0x01                                  # the MAC no longer verifies
        committer = DaemonCommitter(None)
        total = checksum(memoryview(value))
        # one record: a forged capability, and a valid one used for another key
        assert committer.ring_commit([(0, "forged", forged._replace(capability=bytes(blob)),
                                       total),
                                      (1, "other", slots[1][0], total)],
                                     slots.commit_rings) == []
        _wait_drained(ring_name)
        client.close()
        client = None
        restarted = _restart(master, port)
        wait_adopted(restarted, "anchor")
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert store.batch_exists(["forged", "other", "wrongkey"]) == [False] * 3
        assert "commit ring: 2 entries" in daemon.stderr()
    finally:
        if client is not None:
            client.close()
        daemon.close()
        master.close()
        if restarted is not None:
            restarted.close()


def test_a_full_ring_falls_back_to_client_commit():
    with _master() as master, _daemon(master) as daemon:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("first", b"f" * SIZE)
            client, _ = connect_master(master.address)
            try:
                slots = client.put_start(["probe"], [SIZE], client_id="probe")
                ring_name = next(iter(slots.commit_rings.values()))
                client.put_revoke(["probe"], client_id="probe")
            finally:
                client.close()
            # NOTE: returns once the daemon confirmed the revoke's removal (a PutEnd waits
            # for the frees before it), so the stopped daemon below owes the master nothing
            store.put("settled", b"s" * SIZE)
            committer = store._transfers.committer
            writer = writer_for(ring_name)      # this process's region: the store's too
            stop_process(daemon.proc.pid)
            try:
                filler = encode_record("filler", b"")    # an empty commit: applies nothing
                while writer.append(filler):
                    pass
                done = threading.Event()
                errors = []

                def put():
                    try:
                        store.put("full/key", b"k" * SIZE)
                    except Exception as exc:  # noqa: BLE001 - reported below
                        errors.append(exc)
                    done.set()

                thread = threading.Thread(target=put)
                thread.start()
                deadline = time.monotonic() + 10
                while not committer.num_ring_fallbacks:
                    assert time.monotonic() < deadline, "the put never fell back"
                    time.sleep(0.005)  # the put's own thread reaches its commit
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
            thread.join(timeout=30)
            assert done.is_set() and not errors, errors
            assert store.get("full/key") == b"k" * SIZE


def test_a_ring_committed_put_the_master_refuses_is_not_resurrected():
    master = _master()
    port = master.port
    daemon = _daemon(master)
    client = restarted = None
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
        client, _ = connect_master(master.address)
        committer = DaemonCommitter(None)
        value = payload(SIZE, seed=11)
        total = checksum(memoryview(value))
        slots = _shm_written(client, ["early", "late"], value)
        ring_name = next(iter(slots.commit_rings.values()))
        # "early": in the ring (and maybe applied) before the master refuses it
        assert committer.ring_commit([(0, "early", slots[0][0], total)],
                                     slots.commit_rings) == []
        assert client.put_revoke(["early", "late"], client_id="raw-writer") == [None, None]
        ended = client.put_end(["early", "late"], [total, total], client_id="raw-writer",
                               client_committed=True)
        assert all(isinstance(e, kvstore.KeyNotFoundError) for e in ended)
        # "late": appended only after the refusal
        assert committer.ring_commit([(1, "late", slots[1][0], total)],
                                     slots.commit_rings) == []
        _wait_drained(ring_name)
        client.close()
        client = None
        restarted = _restart(master, port)
        wait_adopted(restarted, "anchor")
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert store.batch_exists(["early", "late"]) == [False, False]
    finally:
        if client is not None:
            client.close()
        daemon.close()
        master.close()
        if restarted is not None:
            restarted.close()


def test_a_torn_record_in_a_daemons_ring_is_dropped_and_later_puts_commit():
    master = _master()
    port = master.port
    daemon = _daemon(master)
    restarted = None
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)           # claims this process's region
            client, _ = connect_master(master.address)
            try:
                value = payload(SIZE, seed=17)
                slots = _shm_written(client, ["torn"], value)
                ring_name = next(iter(slots.commit_rings.values()))
                writer = writer_for(ring_name)
                # half of a record for "torn" (no zeros in its second half, which would
                # match the region's fresh bytes), published as if whole
                record = encode_record("cluster", b"\x0a\x04torn\x12\xc8\x01" + b"x" * 200)
                layout, region = writer.layout, writer._region
                pos = layout.write_pos[region]
                at = pos % layout.region_bytes
                layout.region(region)[at:at + len(record) // 2] = record[:len(record) // 2]
                layout.write_pos[region] = pos + len(record)
                _wait_drained(ring_name)
            finally:
                client.close()
            store.put("after", b"z" * SIZE)            # the region keeps working
        assert "torn records dropped" in daemon.stderr()
        restarted = _restart(master, port)
        wait_adopted(restarted, "after")
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert store.get("after") == b"z" * SIZE
            assert not store.exists("torn")
    finally:
        daemon.close()
        master.close()
        if restarted is not None:
            restarted.close()


def test_a_commit_whose_capability_expires_soon_goes_by_frame_and_its_refusal_is_reported():
    # NOTE: the drain refuses an expired capability where the writer never hears of it;
    # the writer sends such an entry as CLIENT_COMMIT, whose answer it reads
    with _master("--pending-timeout", "1s") as master, _daemon(master):
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)        # every commit by frame here: it works
            assert store.get("anchor") == b"a" * SIZE
        client, _ = connect_master(master.address)
        try:
            value = payload(SIZE, seed=23)
            slots = _shm_written(client, ["late"], value)
            ring_name = next(iter(slots.commit_rings.values()))
            layout = writer_for(ring_name).layout
            published = [layout.write_pos[i] for i in range(layout.num_regions)]
            entry = (0, "late", slots[0][0], checksum(memoryview(value)))
            committer = DaemonCommitter(None)
            # 1 s of validity at most (the master's --pending-timeout): left to the frame
            assert committer.ring_commit([entry], slots.commit_rings) == [entry]
            assert committer.num_ring_expiring == 1 and committer.num_ring_records == 0
            assert [layout.write_pos[i] for i in range(layout.num_regions)] == published
            expiry_ms = capability.expiry_ms(slots[0][0].capability)
            while time.time() * 1000 <= expiry_ms:
                time.sleep(0.01)  # the capability's own wall-clock expiry
            failures = committer.begin([entry], Deadline.after(10)).finish()
            assert set(failures) == {0}
            assert "'late'" in str(failures[0]) and "expired" in str(failures[0])
            assert failures[0].keys == ["late"]
            committer.close()
        finally:
            client.close()


def test_capability_expiry_reads_the_stated_expiry_and_a_short_blob_as_expired():
    blob = capability.issue(capability.new_secret(), "n", "s", 0, 10, "k", "", 1234567, 0)
    assert capability.expiry_ms(blob) == 1234567
    assert capability.expiry_ms(b"") == 0
    assert capability.expiry_ms(blob[:10]) == 0
