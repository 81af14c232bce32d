"""A single tcp transfer reads its reply header and payload in one ``recvmsg_into``
(``Connection.read_only_reply``): refused reads still report the daemon's whole message
whatever the destination's size and keep the connection; a peer that splits its reply
anywhere still delivers the right bytes; a reply of the wrong size is a TransferError."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from standalone_daemon import standalone_daemon_fixture

from kvstore import TransferError
from kvstore.transport import data_frames
from kvstore.transport.base import Target
from kvstore.transport.data_frames import Status
from kvstore.transport.tcp import TcpTransport

NODE_ID = "single-reply-node"
SEGMENT_BYTES = 4 * 1024 * 1024
TIMEOUT_S = 10.0


daemon = standalone_daemon_fixture(NODE_ID, SEGMENT_BYTES)


@pytest.mark.parametrize("dst_bytes", [1, 16, 40, 64 * 1024])
def test_refused_read_reports_the_whole_message_and_keeps_the_connection(daemon, dst_bytes):
    transport = TcpTransport(num_streams=1)
    try:
        data = np.random.default_rng(dst_bytes).integers(0, 256, dst_bytes, dtype=np.uint8)
        good = Target(NODE_ID, "h", daemon.address, "dram0", "", 8192, dst_bytes)
        transport.write(good, memoryview(data), timeout_s=TIMEOUT_S)
        past_end = good._replace(offset=SEGMENT_BYTES - dst_bytes + 1)  # one byte past
        out = np.zeros(dst_bytes, np.uint8)
        with pytest.raises(TransferError) as refused:
            transport.read_into(past_end, memoryview(out), timeout_s=TIMEOUT_S)
        # the daemon's message, whole, even when it is longer than the destination
        assert f"OUT_OF_RANGE: range [{past_end.offset}, +{dst_bytes}) outside segment of " \
               f"{SEGMENT_BYTES} bytes" in str(refused.value)
        idle = transport._pool._addr_to_idle[daemon.address]
        assert len(idle) == 1          # the refused read left its connection in the pool
        transport.read_into(good, memoryview(out), timeout_s=TIMEOUT_S)
        assert np.array_equal(out, data)
        assert len(idle) == 1          # and the same connection served the next read
    finally:
        transport.close()


class _ScriptedPeer:
    """A data-plane peer on loopback that answers the hello with OK and every request with
    ``reply(request_header)`` sent in pieces of ``piece_bytes``."""

    def __init__(self, reply, piece_bytes: int):
        self._reply = reply
        self._piece_bytes = piece_bytes
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(data), self._piece_bytes):
            conn.sendall(data[start:start + self._piece_bytes])

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            hello = data_frames.recv_exact(conn, data_frames.HELLO.size)
            _, _, token_len = data_frames.HELLO.unpack(hello)
            data_frames.recv_exact(conn, token_len)
            conn.sendall(data_frames.encode_reply(Status.OK, 0, 0, NODE_ID))
            while True:
                try:
                    header = data_frames.recv_exact(conn, data_frames.REQUEST.size)
                except (OSError, data_frames.PeerClosedError):
                    return
                _, _, _, seg_len, request_id, offset, length = data_frames.REQUEST.unpack(header)
                data_frames.recv_exact(conn, seg_len)
                self._send(conn, self._reply(request_id, offset, length))

    def close(self) -> None:
        self._listener.close()


def _payload(offset: int, length: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(length))


@pytest.mark.parametrize("piece_bytes", [1, 7, 16, 17, 4096])
def test_a_reply_split_anywhere_delivers_the_right_bytes(piece_bytes):
    peer = _ScriptedPeer(lambda rid, offset, length: data_frames.encode_reply(
        Status.OK, rid, length) + _payload(offset, length), piece_bytes)
    transport = TcpTransport(num_streams=1)
    try:
        target = Target(NODE_ID, "h", peer.address, "dram0", "", 3, 10_000)
        out = bytearray(10_000)
        transport.read_into(target, memoryview(out), timeout_s=TIMEOUT_S)
        assert bytes(out) == _payload(3, 10_000)
    finally:
        transport.close()
        peer.close()


@pytest.mark.parametrize("reply_length", [0, 99, 101])
def test_a_reply_of_the_wrong_size_is_a_transfer_error(reply_length):
    peer = _ScriptedPeer(lambda rid, offset, length: data_frames.encode_reply(
        Status.OK, rid, reply_length) + _payload(offset, reply_length), 4096)
    transport = TcpTransport(num_streams=1)
    try:
        target = Target(NODE_ID, "h", peer.address, "dram0", "", 0, 100)
        with pytest.raises(TransferError, match=f"reply carries {reply_length} bytes, "
                                                "expected 100"):
            transport.read_into(target, memoryview(bytearray(100)), timeout_s=TIMEOUT_S)
    finally:
        transport.close()
        peer.close()
