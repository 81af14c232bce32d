"""Bad input on the data port: every malformed, lying, truncated, out-of-range or
unauthenticated frame gets an error reply or a closed connection, the daemon keeps running,
a client connected throughout keeps working, and no stored byte changes."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
from standalone_daemon import standalone_daemon_fixture

from kvstore import AuthenticationError, TransferError
from kvstore.transport import data_frames
from kvstore.transport.base import Target
from kvstore.transport.data_frames import Op, Status
from kvstore.transport.tcp import TcpTransport

TOKEN = "s3cret-token"
NODE_ID = "dataplane-node"
SEGMENT_BYTES = 8 * 1024 * 1024
TIMEOUT_S = 10.0


daemon = standalone_daemon_fixture(NODE_ID, SEGMENT_BYTES, TOKEN)


@pytest.fixture(scope="module")
def good_client(daemon):
    """A client that connects before the attacks and checks the stored bytes after each."""
    transport = TcpTransport(token=TOKEN, num_streams=1)
    data = np.random.default_rng(1).integers(0, 256, 1024 * 1024, dtype=np.uint8)
    target = Target(NODE_ID, "h", daemon.address, "dram0", "", 4096, len(data))
    transport.write(target, memoryview(data), timeout_s=TIMEOUT_S)
    yield transport, target, data
    transport.close()


def assert_still_serving(daemon, good_client):
    transport, target, data = good_client
    assert daemon.proc.poll() is None, daemon.stderr()
    out = np.zeros(len(data), np.uint8)
    transport.read_into(target, memoryview(out), timeout_s=TIMEOUT_S)
    assert np.array_equal(out, data)


def connect(daemon, token: str | None = TOKEN) -> socket.socket:
    sock = socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT_S)
    if token is not None:
        sock.sendall(data_frames.encode_hello(token))
        status, _, _, _, _ = read_reply(sock)
        assert status == Status.OK
    return sock


def read_reply(sock: socket.socket) -> tuple[int, int, int, int, str]:
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, flags, msg_len, request_id, length = data_frames.REPLY.unpack(header)
    message = data_frames.recv_exact(sock, msg_len).decode()
    return status, flags, request_id, length, message


def is_closed(sock: socket.socket) -> bool:
    """True once the server has closed (after any reply bytes it sent)."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_random_bytes_before_handshake_close_the_connection(daemon, good_client):
    with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(os.urandom(4096))
        assert is_closed(sock)
    assert_still_serving(daemon, good_client)


def test_random_bytes_after_handshake_get_bad_frame(daemon, good_client):
    with connect(daemon) as sock:
        sock.sendall(b"\xff" * 26 + os.urandom(1000))
        status, _, _, _, message = read_reply(sock)
        assert status == Status.BAD_FRAME
        assert "magic" in message
        assert is_closed(sock)
    assert_still_serving(daemon, good_client)


def test_wrong_token_is_refused(daemon, good_client):
    with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.encode_hello("wrong"))
        assert read_reply(sock)[0] == Status.AUTH_FAILED
        assert is_closed(sock)
    target = Target(NODE_ID, "h", daemon.address, "dram0", "", 0, 10)
    with pytest.raises(AuthenticationError):
        TcpTransport(token="wrong").read_into(target, memoryview(bytearray(10)),
                                              timeout_s=TIMEOUT_S)
    with pytest.raises(AuthenticationError):
        TcpTransport(token=None).write(Target(NODE_ID, "h", daemon.address, "dram0", "", 0, 1),
                                       memoryview(b"x"), timeout_s=TIMEOUT_S)
    assert_still_serving(daemon, good_client)


def test_oversized_token_length_is_a_bad_frame(daemon, good_client):
    with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.HELLO.pack(data_frames.HELLO_MAGIC, 1, 60000))
        assert read_reply(sock)[0] == Status.BAD_FRAME
        assert is_closed(sock)
    assert_still_serving(daemon, good_client)


def test_read_past_segment_end_gets_error_and_connection_stays_usable(daemon, good_client):
    with connect(daemon) as sock:
        for offset, length in [(SEGMENT_BYTES, 1), (SEGMENT_BYTES - 10, 11), (1, 2**64 - 1),
                               (2**64 - 1, 2)]:
            sock.sendall(data_frames.encode_request(Op.READ, b"dram0", 7, offset, length))
            status, _, request_id, reply_length, _ = read_reply(sock)
            assert (status, request_id, reply_length) == (Status.OUT_OF_RANGE, 7, 0)
        sock.sendall(data_frames.encode_request(Op.READ, b"no-such-segment", 8, 0, 1))
        assert read_reply(sock)[0] == Status.NO_SEGMENT
        sock.sendall(data_frames.encode_request(Op.READ, b"dram0", 9, 4096, 16))
        status, _, request_id, reply_length, _ = read_reply(sock)
        assert (status, request_id, reply_length) == (Status.OK, 9, 16)
        assert data_frames.recv_exact(sock, 16) == good_client[2][:16].tobytes()
    assert_still_serving(daemon, good_client)


def test_write_past_segment_end_is_refused_and_stores_nothing(daemon, good_client):
    with connect(daemon) as sock:
        # a write whose range ends inside the good client's data must not touch it
        sock.sendall(data_frames.encode_request(Op.WRITE, b"dram0", 3, SEGMENT_BYTES - 8, 4096)
                     + b"\x00" * 4096)
        assert read_reply(sock)[0] == Status.OUT_OF_RANGE
        assert is_closed(sock)
    assert_still_serving(daemon, good_client)


def test_write_whose_length_lies_then_closes(daemon, good_client):
    """The header promises 1 MiB at an unused offset; 10 bytes come, then the peer goes."""
    with connect(daemon) as sock:
        sock.sendall(data_frames.encode_request(Op.WRITE, b"dram0", 4, 4 * 1024 * 1024, 1024 * 1024)
                     + b"0123456789")
    assert_still_serving(daemon, good_client)


def test_truncated_frames_at_every_cut(daemon, good_client):
    frame = data_frames.encode_request(Op.READ, b"dram0", 5, 0, 16)
    for cut in (1, 10, data_frames.REQUEST.size - 1, data_frames.REQUEST.size, len(frame) - 1):
        with connect(daemon) as sock:
            sock.sendall(frame[:cut])
            sock.shutdown(socket.SHUT_WR)
            assert is_closed(sock)
    with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.encode_hello(TOKEN)[:5])  # a truncated handshake
    assert_still_serving(daemon, good_client)


@pytest.mark.parametrize("bad_header", [
    data_frames.REQUEST.pack(b"KQ", 99, 0, 5, 1, 0, 1) + b"dram0",      # unknown op
    data_frames.REQUEST.pack(b"KQ", Op.READ, 0, 0, 1, 0, 1),             # empty segment id
    data_frames.REQUEST.pack(b"KQ", Op.READ, 0, 60000, 1, 0, 1),         # segment id too long
    data_frames.REQUEST.pack(b"KQ", Op.PING, 0, 5, 1, 0, 0) + b"dram0",  # PING with a segment id
])
def test_malformed_headers_get_bad_frame(daemon, good_client, bad_header):
    with connect(daemon) as sock:
        sock.sendall(bad_header)
        assert read_reply(sock)[0] == Status.BAD_FRAME
        assert is_closed(sock)
    assert_still_serving(daemon, good_client)


def test_ping_answers(daemon):
    with connect(daemon) as sock:
        sock.sendall(data_frames.REQUEST.pack(b"KQ", Op.PING, 0, 0, 42, 0, 0))
        assert read_reply(sock)[:3] == (Status.OK, 0, 42)


def test_many_bad_clients_at_once_leave_good_client_working(daemon, good_client):
    sockets = [socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT_S)
               for _ in range(50)]
    for i, sock in enumerate(sockets):
        sock.sendall(os.urandom(i * 37 % 200 + 1))
    assert_still_serving(daemon, good_client)
    for sock in sockets:
        sock.close()
    assert_still_serving(daemon, good_client)


def test_daemon_refuses_transfer_error_has_node(daemon):
    transport = TcpTransport(token=TOKEN)
    with pytest.raises(TransferError, match=NODE_ID):
        transport.read_into(Target(NODE_ID, "h", daemon.address, "dram1", "", 0, 1),
                            memoryview(bytearray(1)), timeout_s=TIMEOUT_S)
    transport.close()


def test_silent_client_is_dropped_after_the_handshake_timeout():
    from kvstore.daemon.config import DaemonConfig
    from kvstore.daemon.server import run_in_thread

    with run_in_thread(DaemonConfig(dram_bytes=1024 * 1024, handshake_timeout_s=0.3)) as daemon:
        host, port = daemon.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
            assert is_closed(sock)  # no hello within 0.3 s: the server hangs up


def test_connections_beyond_the_limit_are_refused_and_the_rest_served():
    from kvstore.daemon.config import DaemonConfig
    from kvstore.daemon.server import run_in_thread

    with run_in_thread(DaemonConfig(dram_bytes=1024 * 1024, max_connections=2)) as daemon:
        host, port = daemon.address.rsplit(":", 1)
        target = Target(daemon.node_id, "h", daemon.address, "dram0", "", 0, 4)
        held = [socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
                for _ in range(2)]
        for sock in held:
            sock.sendall(data_frames.encode_hello(None))
            assert read_reply(sock)[0] == Status.OK
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as extra:
            assert is_closed(extra)
        held[0].close()
        # a slot frees up: a client is served again
        transport = TcpTransport(num_streams=1)
        for _ in range(50):
            try:
                transport.write(target, memoryview(b"abcd"), timeout_s=TIMEOUT_S)
                break
            except TransferError:
                time.sleep(0.02)  # the server notices the close asynchronously
        out = bytearray(4)
        transport.read_into(target, memoryview(out), timeout_s=TIMEOUT_S)
        assert out == b"abcd"
        transport.close()
        held[1].close()
