"""The single-key tcp put with its commit in the write (WRITE_COMMIT, op 14; issue 15).

What must hold, with real master and daemon processes: a single tcp put takes the
write-commit path (no CLIENT_COMMIT frame), reads back its bytes and survives a master
SIGKILL (the restarted master adopts it from the daemon's inventory: the acknowledged put
is not lost); a WRITE_COMMIT without a valid capability is refused before a byte lands, one
whose capability is for another key writes but commits nothing, and one cut short before its
payload is complete commits nothing; a WRITE_COMMIT whose PutEnd never comes (the writer
died) is removed from the daemon again when the master reclaims the pending object, so a
rebuilt master does not serve it; malformed frames end only their own connection.
Heartbeats are slow (3 s), so nothing here is delivered by a heartbeat in time to hide a bug.
"""

from __future__ import annotations

import time

import pytest

from client_cluster import payload
from crash_servers import daemon_process, data_plane, master_process, wait_adopted

import kvstore
from kvstore.client.checksum import checksum
from kvstore.client.committer import DaemonCommitter
from kvstore.rpc import connect_master
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status
from kvstore.transport.tcp import TcpTransport
from kvstore.transport.tcp_conn import ReplyError

SLOW_BEAT = ("--heartbeat-interval", "3s", "--node-ttl", "60s")
SIZE = 5000


def _master(*args, port=0):
    return master_process(*SLOW_BEAT, *args, port=port)


def _daemon(master, *args):
    return daemon_process(master, "--dram", "16MiB", *args)


def _restart(master, port, anchor, daemon=None):
    """SIGKILL ``master`` and start a new one on ``port``; return it once it adopted
    ``anchor`` from the daemon's inventory."""
    master.kill()
    master.close()
    restarted = _master(port=port)
    wait_adopted(restarted, anchor, daemon)
    return restarted


def _reply(sock):
    status, _, msg_len, _, length = data_frames.REPLY.unpack(
        data_frames.recv_exact(sock, data_frames.REPLY.size))
    message = data_frames.recv_exact(sock, msg_len).decode() if msg_len else ""
    return status, message, length


def _write_commit(sock, target, key, value, capability=None):
    head = data_frames.encode_write_commit(
        target.segment_id.encode(), 3, target.offset, len(value),
        target.capability if capability is None else capability, key.encode(),
        checksum(memoryview(value)))
    sock.sendall(head + bytes(value))
    return _reply(sock)


def _closed(sock) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_single_tcp_put_commits_in_its_write_and_survives_a_master_crash(monkeypatch):
    master = _master()
    port = master.port
    daemon = _daemon(master)
    restarted = None
    try:
        sent = []
        begin = DaemonCommitter.begin
        monkeypatch.setattr(DaemonCommitter, "begin",
                            lambda self, entries, deadline, *rest: sent.append(entries) or
                            begin(self, entries, deadline, *rest))
        value = payload(SIZE, seed=21)
        with kvstore.connect(master.address, transport="tcp", timeout_s=10) as store:
            store.put("wc/one", value)
            assert sent == []        # no CLIENT_COMMIT frame: the commit rode the write
            assert store.get("wc/one") == value
            # a batch still takes the general flow (one CLIENT_COMMIT per daemon)
            store.batch_put(["wc/a", "wc/b"], [value, value])
            assert len(sent) == 1 and len(sent[0]) == 2
        restarted = _restart(master, port, "wc/one")
        with kvstore.connect(restarted.address, transport="tcp", timeout_s=10) as store:
            assert store.get("wc/one") == value
            assert store.batch_exists(["wc/a", "wc/b"]) == [True, True]
    finally:
        for server in (restarted, daemon, master):
            if server is not None:
                server.close()


def test_write_commits_refused_or_cut_short_commit_nothing():
    master = _master("--pending-timeout", "60s")
    port = master.port
    daemon = _daemon(master)
    client = restarted = None
    socks = []
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
        client, _ = connect_master(master.address)
        value = payload(SIZE, seed=22)
        keys = ["wc/nocap", "wc/otherkey", "wc/short"]
        slots = client.put_start(keys, [SIZE] * 3, client_id="raw-writer")
        targets = [s[0] for s in slots]
        # no capability: refused before a byte lands, then the daemon closes
        sock = data_plane(daemon.address)
        socks.append(sock)
        status, message, _ = _write_commit(sock, targets[0], keys[0], value, capability=b"")
        assert status == Status.CAPABILITY_REFUSED, message
        assert _closed(sock)
        # another put's capability: the write is allowed for that range, but its commit
        # names another key: refused, the connection stays usable
        sock = data_plane(daemon.address)
        socks.append(sock)
        status, message, _ = _write_commit(sock, targets[1], "wc/not-this-key", value)
        assert status == Status.CAPABILITY_REFUSED and "commit refused" in message, message
        sock.sendall(data_frames.encode_request(Op.PING, b"", 4, 0, 0))
        assert _reply(sock)[0] == Status.OK
        # cut short: header and half the payload, then the writer is gone
        sock = data_plane(daemon.address)
        head = data_frames.encode_write_commit(
            targets[2].segment_id.encode(), 5, targets[2].offset, SIZE,
            targets[2].capability, keys[2].encode(), checksum(memoryview(value)))
        sock.sendall(head + bytes(value[:SIZE // 2]))
        sock.close()
        # malformed: a key of 0 bytes is BAD_FRAME and a close; the daemon keeps serving
        sock = data_plane(daemon.address)
        socks.append(sock)
        bad = data_frames.encode_request(Op.WRITE_COMMIT, targets[2].segment_id.encode(), 6,
                                         targets[2].offset, SIZE, targets[2].capability)
        sock.sendall(bad + data_frames.WRITE_COMMIT_TAIL.pack(0, 0))
        assert _reply(sock)[0] == Status.BAD_FRAME
        assert _closed(sock)
        # the keys' PutEnds (the master's own wait): the daemon's table holds none of them,
        # so a rebuilt master finds none; only a push could commit them and none ran yet
        client.close()
        client = None
        restarted = _restart(master, port, "anchor")
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert store.batch_exists(keys) == [False] * 3
            assert not store.exists("wc/not-this-key")
    finally:
        for sock in socks:
            sock.close()
        if client is not None:
            client.close()
        for server in (restarted, daemon, master):
            if server is not None:
                server.close()


def test_a_write_commit_whose_put_end_never_comes_is_not_resurrected():
    master = _master("--pending-timeout", "2s")
    port = master.port
    daemon = _daemon(master)
    client = restarted = None
    tcp = TcpTransport()
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
        client, _ = connect_master(master.address)
        value = payload(SIZE, seed=23)
        (targets,) = client.put_start(["wc/orphan"], [SIZE], client_id="raw-writer")
        tcp.write_commit(targets[0], memoryview(value), "wc/orphan",
                         checksum(memoryview(value)), timeout_s=10)   # committed there
        # the same frame again (a retry whose first copy was applied): refused, not re-done
        with pytest.raises(ReplyError) as info:
            tcp.write_commit(targets[0], memoryview(value), "wc/orphan",
                             checksum(memoryview(value)), timeout_s=10)
        assert info.value.status == Status.RANGE_COMMITTED
        deadline = time.monotonic() + 30
        while client.stats().num_pending:       # each call runs the master's due sweep
            assert time.monotonic() < deadline, "the master never reclaimed the put"
            time.sleep(0.1)  # the pending timeout is the master's clock, not ours
        ended = client.put_end(["wc/orphan"], [checksum(memoryview(value))],
                               client_id="raw-writer", client_committed=True)
        assert isinstance(ended[0], kvstore.KeyNotFoundError)
        client.close()
        client = None
        restarted = _restart(master, port, "anchor")
        with kvstore.connect(restarted.address, timeout_s=10) as store:
            assert not store.exists("wc/orphan")
    finally:
        tcp.close()
        if client is not None:
            client.close()
        for server in (restarted, daemon, master):
            if server is not None:
                server.close()


def test_a_replica_daemon_that_dies_during_the_write_commit_fails_the_put(monkeypatch):
    with _master() as master:
        daemon = _daemon(master)
        try:
            with kvstore.connect(master.address, transport="tcp", timeout_s=10) as store:
                store.put("before", b"b" * SIZE)
                original = TcpTransport.write_commit

                def die_first(self, *args, **kwargs):
                    daemon.kill()
                    daemon.close()
                    return original(self, *args, **kwargs)

                monkeypatch.setattr(TcpTransport, "write_commit", die_first)
                with pytest.raises(kvstore.TransferError) as info:
                    store.put("dies/key", b"d" * SIZE)
                assert info.value.keys == ["dies/key"]
                assert not store.exists("dies/key")   # revoked: a retry writes it anew
        finally:
            daemon.close()
