"""Durable commit's client-parallel path (issue 10): the writer commits its replicas on their
daemons itself (CLIENT_COMMIT) while the master answers PutEnd without waiting.

What must hold, with real master and daemon processes: a client-committed put that the
master refuses (revoked or reclaimed PENDING object) is not resurrected by a master
restarted from the daemons' inventories, whether its commit reached the daemon before or
after the refusal; a CLIENT_COMMIT whose capability is absent, forged or for another key or
range is refused and applies nothing; a replica daemon that dies between the write and the
commit fails the put with a retryable error naming the key, and the key is not left behind;
an older client (no ``client_committed``) still gets the master's wait. Heartbeats are slow
(3 s), so nothing here is delivered by a heartbeat in time to hide a bug.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from client_cluster import payload
from crash_servers import daemon_process, data_plane, master_process, wait_adopted
from stopped_process import stop_process

import kvstore
from kvstore import capability
from kvstore._deadline import Deadline
from kvstore.client import write_commit
from kvstore.client.checksum import checksum
from kvstore.client.committer import DaemonCommitter
from kvstore.daemon.objects import ObjectTable, StoredObject
from kvstore.rpc import HeartbeatChanges, Inventory, connect_master
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status
from kvstore.transport.tcp import TcpTransport
from kvstore.v1 import master_pb2

SLOW_BEAT = ("--heartbeat-interval", "3s", "--node-ttl", "60s")
SIZE = 5000


def _master(*args, port=0):
    return master_process(*SLOW_BEAT, *args, port=port)


def _daemon(master, *args):
    return daemon_process(master, "--dram", "16MiB", *args)


def _restart_and_check_absent(master, port, absent, anchor="anchor"):
    """SIGKILL ``master``, start a new one on ``port``, wait until it adopted ``anchor``
    from the daemon's inventory, and check that none of ``absent`` came back."""
    master.kill()
    master.close()
    restarted = _master(port=port)
    try:
        wait_adopted(restarted, anchor)
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert store.batch_exists(absent) == [False] * len(absent)
    finally:
        restarted.close()


def _written(client, keys, value, client_id="raw-writer"):
    """PutStart ``keys`` and write ``value`` to each one's replica over TCP; the slots."""
    slots = client.put_start(keys, [len(value)] * len(keys), client_id=client_id)
    assert slots.client_commit, "the master should ask the writer to commit itself"
    tcp = TcpTransport()
    try:
        for targets in slots:
            tcp.write(targets[0], memoryview(value), timeout_s=10)
    finally:
        tcp.close()
    return slots


def _commit(committer, key, target, value):
    return committer.begin([(0, key, target, checksum(memoryview(value)))],
                           Deadline.after(10)).finish()


def test_a_client_committed_put_the_master_refuses_is_not_resurrected():
    master = _master("--pending-timeout", "3s")
    port = master.port
    daemon = _daemon(master)
    client = committer = None
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
        client, _ = connect_master(master.address)
        committer = DaemonCommitter(None)
        value = payload(SIZE, seed=11)
        total = checksum(memoryview(value))
        slots = _written(client, ["early", "late", "reclaimed"], value)
        # "early": on the daemon's table before the master refuses it (revoked)
        assert _commit(committer, "early", slots[0][0], value) == {}
        assert client.put_revoke(["early", "late"], client_id="raw-writer") == [None, None]
        ended = client.put_end(["early", "late"], [total, total], client_id="raw-writer",
                               client_committed=True)
        assert all(isinstance(e, kvstore.KeyNotFoundError) for e in ended)
        # "late": its commit reaches the daemon only after the refusal; the daemon knows
        # the key was removed after the capability was issued and drops it silently
        assert _commit(committer, "late", slots[1][0], value) == {}
        # "reclaimed": committed on the daemon, then the master's pending timeout passes
        assert _commit(committer, "reclaimed", slots[2][0], value) == {}
        deadline = time.monotonic() + 30
        while client.stats().num_pending:       # each call runs the master's due sweep
            assert time.monotonic() < deadline, "the master never reclaimed the put"
            time.sleep(0.1)  # the pending timeout is the master's clock, not ours
        ended = client.put_end(["reclaimed"], [total], client_id="raw-writer",
                               client_committed=True)
        assert isinstance(ended[0], kvstore.KeyNotFoundError)
        client.close()
        client = None
        _restart_and_check_absent(master, port, ["early", "late", "reclaimed"])
    finally:
        if committer is not None:
            committer.close()
        if client is not None:
            client.close()
        daemon.close()
        master.close()


def _send_commit(sock, commit):
    body = commit.SerializeToString()
    sock.sendall(data_frames.encode_client_commit(7, len(body)) + body)
    status, _, msg_len, _, length = data_frames.REPLY.unpack(
        data_frames.recv_exact(sock, data_frames.REPLY.size))
    message = data_frames.recv_exact(sock, msg_len).decode() if msg_len else ""
    payload_text = data_frames.recv_exact(sock, length).decode() if length else ""
    return status, message, payload_text


def test_client_commits_without_a_valid_capability_are_refused_and_change_nothing():
    master = _master()
    port = master.port
    daemon = _daemon(master)
    client = sock = None
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
        client, _ = connect_master(master.address)
        value = payload(SIZE, seed=12)
        keys = ["none", "forged", "other-range", "other-key"]
        slots = _written(client, keys, value)
        targets = [s[0] for s in slots]
        forged = capability.issue(b"\x05" * capability.SECRET_BYTES, targets[1].node_id,
                                  targets[1].segment_id, targets[1].offset, SIZE, "forged", "",
                                  2**62, 10**9)
        commit = master_pb2.ClientCommit(
            keys=keys, segment_ids=[t.segment_id for t in targets],
            # other-range: its own capability for another range; other-key: other-range's
            # capability and range, for another key
            offsets=[targets[0].offset, targets[1].offset, targets[3].offset,
                     targets[2].offset],
            sizes=[SIZE] * 4, checksums=[checksum(memoryview(value))] * 4,
            capabilities=[b"", forged, targets[2].capability, targets[2].capability])
        sock = data_plane(daemon.address)
        status, _, refused = _send_commit(sock, commit)
        assert status == Status.OK
        reasons = dict(line.split("\t", 1) for line in refused.splitlines())
        assert set(reasons) == {"0", "1", "2", "3"}, refused
        assert "no write capability" in reasons["0"]
        assert "does not verify" in reasons["1"]
        assert "allows" in reasons["2"]
        assert "another key" in reasons["3"]
        # a body that is not a ClientCommit: refused, the connection closed, nothing lost
        garbage = b"\xff" * 32
        sock.sendall(data_frames.encode_client_commit(8, len(garbage)) + garbage)
        assert data_frames.REPLY.unpack(data_frames.recv_exact(
            sock, data_frames.REPLY.size))[0] == Status.BAD_FRAME
        sock.close()
        sock = data_plane(daemon.address)          # the daemon keeps serving
        sock.sendall(data_frames.encode_request(Op.PING, b"", 1, 0, 0))
        assert data_frames.REPLY.unpack(data_frames.recv_exact(
            sock, data_frames.REPLY.size))[0] == Status.OK
        # the written keys end, with a master that waits for the daemon (old clients' way):
        # nothing of the refused commits was applied, and the master's commit still lands
        assert client.put_end(keys[:1], [checksum(memoryview(value))],
                              client_id="raw-writer") == [None]
        client.close()
        client = None
        _restart_and_check_absent(master, port, keys[1:], anchor="none")
    finally:
        if sock is not None:
            sock.close()
        if client is not None:
            client.close()
        daemon.close()
        master.close()


def test_a_replica_daemon_that_dies_between_write_and_commit_fails_the_put(monkeypatch):
    # NOTE: a tcp put: it commits by CLIENT_COMMIT and needs the daemon's answer. An shm put
    # commits through the daemon's commit ring, durable once appended, with no answer to
    # wait for (tests/test_commit_ring.py); a daemon dead by then took its DRAM bytes along.
    with _master() as master:
        daemon = _daemon(master)
        try:
            with kvstore.connect(master.address, transport="tcp", timeout_s=10) as store:
                store.put("before", b"b" * SIZE)
                begin = DaemonCommitter.begin

                def die_first(self, entries, deadline, *rest):   # the bytes are written
                    daemon.kill()
                    daemon.close()
                    return begin(self, entries, deadline, *rest)

                monkeypatch.setattr(DaemonCommitter, "begin", die_first)
                # NOTE: the general flow's CLIENT_COMMIT; a single tcp put's own path
                # (WRITE_COMMIT) is tests/test_write_commit.py's
                monkeypatch.setattr(write_commit, "applies", lambda *args: False)
                with pytest.raises(kvstore.TransferError) as info:
                    store.put("dies/key", b"d" * SIZE)
                assert info.value.keys == ["dies/key"]
                assert "did not confirm the commit" in str(info.value)
                assert "retry" in str(info.value)
                assert not store.exists("dies/key")   # removed again: a retry writes it anew
        finally:
            daemon.close()


def test_an_older_client_still_waits_for_the_masters_push():
    with _master("--commit-timeout", "500ms") as master, _daemon(master) as daemon:
        client, _ = connect_master(master.address)
        try:
            value = payload(SIZE, seed=13)
            total = checksum(memoryview(value))
            _written(client, ["old/1", "new/1", "after/1"], value)
            stop_process(daemon.proc.pid)
            try:
                # a client that committed itself is answered without the daemon
                assert client.put_end(["new/1"], [total], client_id="raw-writer",
                                      client_committed=True) == [None]
                started = time.monotonic()
                ended = client.put_end(["old/1"], [total], client_id="raw-writer")
                assert isinstance(ended[0], kvstore.TransferError)   # ITEM_UNCOMMITTED
                assert time.monotonic() - started >= 0.5
                # ... unless the node has not confirmed a free logged before it (old/1's
                # drop): its range may be one the daemon still lists (service docstring)
                started = time.monotonic()
                (after,) = client.put_end(["after/1"], [total], client_id="raw-writer",
                                          client_committed=True)
                assert isinstance(after, kvstore.TransferError)
                assert "did not confirm" in str(after)
                assert time.monotonic() - started >= 0.5
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
        finally:
            client.close()


def _removal(seq, base_seq, key):
    return HeartbeatChanges(master_id="m", seq=seq, full_resync=False,
                            added=Inventory(keys=[], segment_ids=[], offsets=[], lengths=[]),
                            removed_keys=[key], base_seq=base_seq)


def test_object_table_drops_a_client_commit_of_a_key_removed_since_its_capability():
    table = ObjectTable()
    stored = StoredObject("s", 0, 64, 1, 0)
    assert table.apply(_removal(3, 0, "k")) == 1          # removed at sequence 3
    assert table.commit_from_client([(0, "k", stored, 2)]) == []   # issued before: dropped
    assert table.get("k") is None
    assert table.commit_from_client([(0, "k", stored, 3)]) == []   # issued after: added
    assert table.get("k") == stored
    moved = StoredObject("s", 128, 64, 1, 0)
    refused = table.commit_from_client([(5, "k", moved, 4)])
    assert refused and refused[0][0] == 5 and "another range" in refused[0][1]
    assert table.get("k") == stored                        # nothing changed
    table.begin_registration()
    assert table.commit_from_client([(1, "x", stored, 9)])[0][0] == 1
    assert table.get("x") is None


def test_a_new_registration_forgets_the_removals_of_the_old_one():
    # the old registration removed "k" at sequence 50; the new one's capabilities start
    # again near 0: a commit of "k" under the new registration is added, not dropped
    table = ObjectTable()
    stored = StoredObject("s", 0, 64, 1, 0)
    assert table.apply(_removal(50, 0, "k")) == 1
    assert table.commit_from_client([(0, "k", stored, 49)]) == []   # old registration: dropped
    assert table.get("k") is None
    table.begin_registration()
    table.reset_sequence()
    assert table.commit_from_client([(0, "k", stored, 2)]) == []
    assert table.get("k") == stored
