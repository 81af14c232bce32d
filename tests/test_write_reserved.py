"""The single tcp put into reserved space made visible by its daemon (WRITE_RESERVED, op 18;
client/write_reserved.py, daemon/reserved_puts.py; issue 15, 15u).

What must hold, with real master and daemon processes: a single 64 KiB tcp put with a
reservation sends neither PutStart nor PutEnd from the client (one WRITE_RESERVED), lands
inside its reservation, reads back, and survives a master SIGKILL (both durable-commit
designs: the daemon's own commit with PutEnd's capability, and the master's push where the
master keeps commits to itself); a write outside the reservation is refused before a byte
lands; a frame naming another writer's reservation, or a range the master refuses, commits
nothing and keeps the connection; an expired reservation is refused by the daemon, and one
the master does not know is refused by the master, and in both cases the client puts the
key through PutStart instead; a second key over a range committed already
is refused and the first keeps its bytes; a frame cut short commits nothing; malformed
tails end only their own connection; a daemon without the op answers BAD_FRAME and the
client stops sending it there. Heartbeats are slow (3 s), so nothing here is delivered by a
heartbeat in time to hide a bug.
"""

from __future__ import annotations

import time

import pytest

from client_cluster import payload
from crash_servers import daemon_process, data_plane, master_process, wait_adopted
from reservation_helpers import inside, replica_of
from standalone_daemon import standalone_daemon_fixture

import kvstore
from kvstore._deadline import Deadline
from kvstore.client.checksum import checksum
from kvstore.client.reservations import ReservedSpace
from kvstore.rpc import MasterClient, connect_master
from kvstore.rpc.results import ReservationGrant
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status

SLOW_BEAT = ("--heartbeat-interval", "3s", "--node-ttl", "60s")
MiB = 1 << 20
SIZE = 64 << 10

standalone = standalone_daemon_fixture("standalone-wr", 1 * MiB)


def _reply(sock):
    status, _, msg_len, _, length = data_frames.REPLY.unpack(
        data_frames.recv_exact(sock, data_frames.REPLY.size))
    message = data_frames.recv_exact(sock, msg_len).decode() if msg_len else ""
    return status, message, length


def _send(sock, grant, offset, key, value, *, reservation_id=None, client_id="raw-writer",
          length=None):
    head = data_frames.encode_write_reserved(
        grant.target.segment_id.encode(), 7, offset, len(value) if length is None else length,
        grant.target.capability, key.encode(), checksum(memoryview(value)),
        grant.reservation_id if reservation_id is None else reservation_id,
        client_id.encode())
    sock.sendall(head + bytes(value))


def _closed(sock) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _usable(sock) -> bool:
    sock.sendall(data_frames.encode_request(Op.PING, b"", 9, 0, 0))
    return _reply(sock)[0] == Status.OK


@pytest.mark.parametrize("design", [(), ("--no-client-commit",)],
                         ids=["daemon-commit", "master-push"])
def test_a_reserved_tcp_put_sends_no_master_call_and_survives_a_master_crash(design,
                                                                              monkeypatch):
    master = master_process(*SLOW_BEAT, *design)
    port = master.port
    daemon = daemon_process(master, "--dram", "64MiB")
    restarted = None
    try:
        calls = []
        for name in ("begin_put_start", "put_start", "put_end", "begin_put_end",
                     "put_end_reserved_committing"):
            original = getattr(MasterClient, name)
            monkeypatch.setattr(MasterClient, name,
                                lambda self, *a, _n=name, _o=original, **k:
                                calls.append(_n) or _o(self, *a, **k))
        values = {f"wr/{i}": payload(SIZE, seed=i) for i in range(20)}
        with kvstore.connect(master.address, transport="tcp", timeout_s=10,
                             reserve_bytes=8 * MiB) as store:
            for key, value in values.items():
                store.put(key, value)
            assert calls == [], calls     # the daemon sent each PutEnd, nothing else did
            grant = store._reserved._grant
            assert store._reserved.num_reserved == 1
            for key, value in values.items():
                assert inside(grant, replica_of(store, key)), key
                assert store.get(key) == value
            # a key that exists is a success; its bytes are not overwritten
            store.put("wr/0", payload(SIZE, seed=99))
            assert store.get("wr/0") == values["wr/0"]
        master.kill()                     # right after the last put returned
        master.close()
        restarted = master_process("--heartbeat-interval", "200ms", *design, port=port)
        wait_adopted(restarted, "wr/19", daemon)
        with kvstore.connect(restarted.address, transport="tcp", timeout_s=10) as store:
            assert store.batch_get(list(values)) == list(values.values())
    finally:
        for server in (restarted, daemon, master):
            if server is not None:
                server.close()


def test_write_reserved_refusals_commit_nothing_and_keep_stored_bytes():
    master = master_process(*SLOW_BEAT)
    daemon = daemon_process(master, "--dram", "64MiB")
    client = None
    socks = []
    try:
        client, _ = connect_master(master.address)
        grant = client.reserve(1 * MiB, client_id="raw-writer")
        other = client.reserve(1 * MiB, client_id="other-writer")
        assert isinstance(grant, ReservationGrant) and isinstance(other, ReservationGrant)
        start = grant.target.offset
        value = payload(4096, seed=3)

        def new_sock():
            sock = data_plane(daemon.address)
            socks.append(sock)
            return sock

        # accepted: visible and durable once answered
        sock = new_sock()
        _send(sock, grant, start, "wr/ok", value)
        assert _reply(sock)[0] == Status.OK
        # outside the reservation's capability (the other writer's range): refused before
        # a byte lands, then the daemon closes
        sock = new_sock()
        _send(sock, grant, other.target.offset, "wr/outside", value)
        status, message, _ = _reply(sock)
        assert status == Status.CAPABILITY_REFUSED, message
        assert _closed(sock)
        # inside this grant but naming the other writer's reservation: the master refuses
        # (not this client's, or outside it), nothing committed, the connection stays
        sock = new_sock()
        _send(sock, grant, start + 8192, "wr/theft", value,
              reservation_id=other.reservation_id)
        status, message, _ = _reply(sock)
        assert status == Status.RESERVATION_GONE and "not yours" in message, message
        _send(sock, grant, start + 8192, "wr/theft2", value,
              reservation_id=other.reservation_id, client_id="other-writer")
        status, message, _ = _reply(sock)
        assert status == Status.PUT_REFUSED and "outside" in message, message
        # unaligned (the master's check): refused, connection kept
        _send(sock, grant, start + 8192 + 8, "wr/odd", value)
        status, message, _ = _reply(sock)
        assert status == Status.PUT_REFUSED and "multiple" in message, message
        assert _usable(sock)
        # a second key over the committed range: the daemon refuses the write before a
        # byte lands (RANGE_COMMITTED); the first key keeps its bytes
        sock = new_sock()
        _send(sock, grant, start, "wr/twin", payload(4096, seed=4))
        status, message, _ = _reply(sock)
        assert status == Status.RANGE_COMMITTED, message
        assert _closed(sock)
        # cut short: the header and half the payload, then the writer is gone
        sock = new_sock()
        _send(sock, grant, start + 16384, "wr/short", value[:2048], length=4096)
        sock.close()
        # malformed tails: reservation 0, a client id over the limit: BAD_FRAME, closed
        for reservation_id, client_id in ((0, "raw-writer"), (grant.reservation_id,
                                                                 "c" * 300)):
            sock = new_sock()
            head = data_frames.encode_request(
                Op.WRITE_RESERVED, grant.target.segment_id.encode(), 8, start + 32768, 4096,
                grant.target.capability) + data_frames.WRITE_COMMIT_TAIL.pack(6, 1) + b"wr/bad" + \
                data_frames.WRITE_RESERVED_TAIL.pack(reservation_id, len(client_id)) + \
                client_id.encode()
            sock.sendall(head + bytes(value))
            assert _reply(sock)[0] == Status.BAD_FRAME
            assert _closed(sock)
        with kvstore.connect(master.address, transport="tcp", timeout_s=10) as store:
            assert store.get("wr/ok") == value
            assert store.batch_exists(["wr/outside", "wr/theft", "wr/theft2", "wr/odd",
                                       "wr/twin", "wr/short", "wr/bad"]) == [False] * 7
        # the same key replayed at the same range (a retry whose reply was lost): refused
        # by the daemon's guard before a byte lands, the stored object unchanged
        sock = new_sock()
        _send(sock, grant, start, "wr/ok", value)
        assert _reply(sock)[0] == Status.RANGE_COMMITTED
    finally:
        for sock in socks:
            sock.close()
        if client is not None:
            client.close()
        daemon.close()
        master.close()


def test_an_expired_reservation_is_refused_and_the_put_goes_through_putstart():
    """A writer whose clock still calls its reservation usable (frozen here) after the
    master's TTL: the daemon refuses the WRITE_RESERVED (expired capability) before a byte
    lands, and the client puts the key through PutStart: stored outside the old grant, the
    other writer's objects (which took the reclaimed space) intact."""
    master = master_process(*SLOW_BEAT, "--reservation-ttl", "1s")
    daemon = daemon_process(master, "--dram", "16MiB")
    try:
        with kvstore.connect(master.address, transport="tcp", timeout_s=10,
                             reserve_bytes=4 * MiB) as store, \
                kvstore.connect(master.address, transport="tcp") as other:
            frozen = [0.0]
            store._reserved = ReservedSpace(4 * MiB, store.client_id, store.host_id,
                                            clock=lambda: frozen[0])
            store.put("before", payload(2000, seed=1))
            grant = store._reserved._grant
            assert inside(grant, replica_of(store, "before"))
            deadline = time.monotonic() + 30
            while sum(n.reserved_bytes for n in store._master.list_nodes()):
                assert time.monotonic() < deadline, "the reservation never expired"
                time.sleep(0.05)   # NOTE: the master's TTL runs on its own clock
            others = {f"other/{i}": payload(5000, seed=50 + i) for i in range(40)}
            other.batch_put(list(others), list(others.values()))
            store.put("late", payload(2000, seed=2))
            assert store.get("late") == payload(2000, seed=2)
            assert store._reserved._grant is None or store._reserved._grant is not grant
            for key, value in others.items():
                assert other.get(key) == value, key
            assert store.get("before") == payload(2000, seed=1)
    finally:
        daemon.close()
        master.close()


def test_a_daemon_without_the_op_answers_bad_frame_and_is_not_sent_it_again(daemon):
    """A data plane without an object table (as a daemon older than op 18) refuses the
    frame before its payload; the transport then stops choosing WRITE_RESERVED there."""
    from kvstore.transport.base import Target
    from kvstore.transport.tcp import TcpTransport
    from kvstore.transport.tcp_conn import ReplyError

    transport = TcpTransport()
    try:
        target = Target(node_id="standalone-wr", host_id="", data_addr=daemon.address,
                        segment_id="dram0", shm_name="", offset=0, length=4096)
        assert transport.takes_write_reserved(target)
        with pytest.raises(ReplyError) as refused:
            transport.write_reserved(target, memoryview(bytes(4096)), "k", 1, 5, "c",
                                     timeout_s=10)
        assert refused.value.status == Status.BAD_FRAME
        assert not transport.takes_write_reserved(target)
        assert transport.takes_write_commit(target)
    finally:
        transport.close()


def test_a_reservation_the_master_does_not_know_sends_the_put_through_putstart():
    """The daemon's PutEnd answers that the master does not know the reservation (here: a
    grant whose id no master issued, as after a master restart): the daemon commits
    nothing and answers RESERVATION_GONE, and the client puts the key through PutStart,
    outside the old grant, with its bytes."""
    import dataclasses

    master = master_process(*SLOW_BEAT)
    daemon = daemon_process(master, "--dram", "16MiB")
    try:
        with kvstore.connect(master.address, transport="tcp", timeout_s=10,
                             reserve_bytes=4 * MiB) as store:
            store.put("first", payload(3000, seed=1))
            space = store._reserved
            grant = space._grant
            space._grant = unknown = dataclasses.replace(
                grant, reservation_id=grant.reservation_id ^ (1 << 40))
            store.put("second", payload(3000, seed=2))
            assert space._grant is not unknown          # forgotten
            assert store.get("second") == payload(3000, seed=2)
            assert not inside(grant, replica_of(store, "second"))
            assert store.get("first") == payload(3000, seed=1)
    finally:
        daemon.close()
        master.close()
