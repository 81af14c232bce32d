"""The fast path's deadlines on a plain connection (``kvstore.rpc.fast_carrier``: a blocking
socket bounded by the kernel's SO_RCVTIMEO/SO_SNDTIMEO): a stalled send or reply fails by
the call's deadline, and a call with a shorter deadline than the last one is bounded by its
own, not the earlier one."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from kvstore._errors import MasterUnavailableError
from kvstore.rpc import fast_frames as ff
from kvstore.rpc.fast_carrier import TIMEOUT_SLACK_S
from kvstore.v1 import master_pb2 as pb
from raw_master import RawMaster


class _Peer:
    """A fast-path peer that completes the handshake, answers the first ``num_answered``
    requests with an empty OK reply and then neither reads nor answers."""

    def __init__(self, num_answered: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._num_answered = num_answered
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.conns.append(conn)
        reader = conn.makefile("rb")
        reader.read(ff.HELLO.size)
        conn.sendall(ff.encode_reply(grpc.StatusCode.OK, 0, b"peer"))
        for _ in range(self._num_answered):
            body_len, _, request_id = ff.REQUEST.unpack(reader.read(ff.REQUEST.size))
            reader.read(body_len)
            conn.sendall(ff.encode_reply(grpc.StatusCode.OK, request_id, b""))

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()


def test_a_send_the_peer_never_reads_fails_by_the_deadline():
    peer = _Peer(num_answered=0)
    client = RawMaster.over_fast("127.0.0.1", peer.port, timeout_s=0.5)
    try:
        started = time.monotonic()
        big = pb.ExistsRequest(keys=[f"k{i:07d}" * 8 for i in range(200_000)])   # ~12 MiB
        with pytest.raises(MasterUnavailableError, match="DEADLINE_EXCEEDED"):
            client.call("Exists", big)
        assert time.monotonic() - started < 3.0
    finally:
        client.close()
        peer.close()


def test_a_shorter_deadline_than_the_last_call_bounds_its_own_call():
    peer = _Peer(num_answered=1)
    client = RawMaster.over_fast("127.0.0.1", peer.port, timeout_s=30.0)
    try:
        client.call("Stats", pb.StatsRequest())        # answered, with a 30 s kernel timeout
        started = time.monotonic()
        with pytest.raises(MasterUnavailableError, match="DEADLINE_EXCEEDED"):
            client.call("Stats", pb.StatsRequest(), timeout_s=0.3)
        waited_s = time.monotonic() - started
        assert 0.3 - 0.05 <= waited_s < 0.3 + TIMEOUT_SLACK_S + 1.5
    finally:
        client.close()
        peer.close()
