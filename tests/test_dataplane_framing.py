"""The data plane's request framing against how bytes arrive: several requests (and a WRITE's
payload) in one segment of the stream, a request dribbled in a few bytes at a time, a WRITE
payload that straddles the daemon's request buffer, and garbage right behind a good request.
Each must be answered in order with the right bytes, and bad input must end only its own
connection, storing nothing.

Against a real standalone ``kvstore daemon``; the client is a raw socket so the test decides
exactly which bytes go in each send.
"""

from __future__ import annotations

import socket

import numpy as np
from standalone_daemon import standalone_daemon_fixture

from kvstore.daemon.dataplane import REQUEST_BUFFER_BYTES
from kvstore.transport import data_frames
from kvstore.transport.base import Target
from kvstore.transport.data_frames import Op, Status
from kvstore.transport.tcp import TcpTransport

TOKEN = "framing-token"
NODE_ID = "framing-node"
SEGMENT_BYTES = 8 * 1024 * 1024
TIMEOUT_S = 10.0


daemon = standalone_daemon_fixture(NODE_ID, SEGMENT_BYTES, TOKEN)


def connect(daemon) -> socket.socket:
    sock = socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT_S)
    sock.sendall(data_frames.encode_hello(TOKEN))
    assert read_reply(sock)[0] == Status.OK
    return sock


def read_reply(sock: socket.socket) -> tuple[int, int, int, str]:
    """(status, request id, payload length, message)."""
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, _, msg_len, request_id, length = data_frames.REPLY.unpack(header)
    return status, request_id, length, data_frames.recv_exact(sock, msg_len).decode()


def is_closed(sock: socket.socket) -> bool:
    """True once the server has closed (a reset counts: it closed with our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def read_back(daemon, offset: int, length: int) -> bytes:
    transport = TcpTransport(token=TOKEN, num_streams=1)
    try:
        out = bytearray(length)
        transport.read_into(Target(NODE_ID, "h", daemon.address, "dram0", "", offset, length),
                            memoryview(out), timeout_s=TIMEOUT_S)
        return bytes(out)
    finally:
        transport.close()


def write(offset: int, payload: bytes, request_id: int) -> bytes:
    return data_frames.encode_request(Op.WRITE, b"dram0", request_id, offset,
                                      len(payload)) + payload


def read(offset: int, length: int, request_id: int) -> bytes:
    return data_frames.encode_request(Op.READ, b"dram0", request_id, offset, length)


def random_bytes(num_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8).tobytes()


def test_requests_coalesced_in_one_send_are_answered_in_order(daemon):
    first, second = random_bytes(3000, 1), random_bytes(1500, 2)
    stream = (write(0, first, 1) + read(0, 3000, 2) + write(8192, second, 3)
              + data_frames.REQUEST.pack(b"KQ", Op.PING, 0, 0, 4, 0, 0)
              + read(8192, 1500, 5) + read(SEGMENT_BYTES, 1, 6) + read(100, 50, 7))
    assert len(stream) > REQUEST_BUFFER_BYTES   # the buffer refills in mid-request
    with connect(daemon) as sock:
        sock.sendall(stream)
        assert read_reply(sock)[:3] == (Status.OK, 1, 0)
        assert read_reply(sock)[:3] == (Status.OK, 2, 3000)
        assert data_frames.recv_exact(sock, 3000) == first
        assert read_reply(sock)[:3] == (Status.OK, 3, 0)
        assert read_reply(sock)[:3] == (Status.OK, 4, 0)
        assert read_reply(sock)[:3] == (Status.OK, 5, 1500)
        assert data_frames.recv_exact(sock, 1500) == second
        # a refused READ keeps the connection and its place in the stream
        assert read_reply(sock)[:3] == (Status.OUT_OF_RANGE, 6, 0)
        assert read_reply(sock)[:3] == (Status.OK, 7, 50)
        assert data_frames.recv_exact(sock, 50) == first[100:150]


def test_a_request_dribbled_a_few_bytes_at_a_time(daemon):
    payload = random_bytes(5000, 3)
    stream = write(65536, payload, 11) + read(65536, 5000, 12)
    with connect(daemon) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(stream), 7):
            sock.sendall(stream[start:start + 7])
        assert read_reply(sock)[:3] == (Status.OK, 11, 0)
        assert read_reply(sock)[:3] == (Status.OK, 12, 5000)
        assert data_frames.recv_exact(sock, 5000) == payload


def test_a_large_write_behind_a_read_in_one_send(daemon):
    """The WRITE's first bytes come out of the request buffer, the rest straight from the
    socket into the segment: every byte must land, in order."""
    payload = random_bytes(1024 * 1024 + 123, 4)
    with connect(daemon) as sock:
        sock.sendall(read(0, 16, 21) + write(1 << 20, payload, 22))
        assert read_reply(sock)[:3] == (Status.OK, 21, 16)
        data_frames.recv_exact(sock, 16)
        assert read_reply(sock)[:3] == (Status.OK, 22, 0)
    assert read_back(daemon, 1 << 20, len(payload)) == payload


def test_garbage_behind_a_good_request_ends_only_that_connection(daemon):
    kept = random_bytes(4096, 5)
    with connect(daemon) as sock:
        sock.sendall(write(3 << 20, kept, 31))
        assert read_reply(sock)[:3] == (Status.OK, 31, 0)
    with connect(daemon) as sock:
        # a good READ, then a frame with a bad magic whose "payload" would overwrite `kept`
        sock.sendall(read(3 << 20, 8, 32) + b"XX" + write(3 << 20, b"\0" * 2048, 33)[2:])
        assert read_reply(sock)[:3] == (Status.OK, 32, 8)
        assert data_frames.recv_exact(sock, 8) == kept[:8]
        status, _, _, message = read_reply(sock)
        assert status == Status.BAD_FRAME and "magic" in message
        assert is_closed(sock)
    assert read_back(daemon, 3 << 20, 4096) == kept


def test_a_write_cut_inside_its_payload_gets_no_reply_and_touches_nothing_else(daemon):
    """The peer goes away inside a WRITE's payload (part of it held in the request buffer):
    no OK reply is sent, the connection ends, and the bytes right after the range are
    untouched."""
    neighbour = random_bytes(4096, 6)
    with connect(daemon) as sock:
        sock.sendall(write((5 << 20) + 2000, neighbour, 40))
        assert read_reply(sock)[:3] == (Status.OK, 40, 0)
    with connect(daemon) as sock:
        # 1,000 bytes short; the missing tail "arrives" as bytes meant for the neighbour
        sock.sendall(write(5 << 20, b"\1" * 2000, 41)[:-1000])
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""   # no reply came before the close
    assert read_back(daemon, (5 << 20) + 2000, 4096) == neighbour
