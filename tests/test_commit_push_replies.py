"""The master's commit push (``--no-client-commit``, kvstore/master/commits.py) counts a
daemon's reply as a confirmation only when it answers the push just sent: a reply that names
another request id (one left over from an earlier push on the connection would look so) is
refused, the connection closed and the push sent again, and a PutEnd nobody truly confirmed
fails naming its key (issue 10). Wire level: a real master process and a raw data plane that
registers as a node, so the test decides each reply's request id."""

from __future__ import annotations

import socket
import threading

from crash_servers import master_process

import kvstore
from kvstore._wire import HELLO
from kvstore.rpc import Inventory, NodeSpec, SegmentSpec, connect_master
from kvstore.tiers import Tier
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status
from kvstore.v1 import master_pb2


class _RawDataPlane:
    """A node's data plane on loopback that answers the hello, then each COMMIT with the
    sequence its change set reaches and the request id ``request_id_offset`` past the
    push's (0: the right one). Counts the pushes it got."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.request_id_offset = 0
        self.num_pushes = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return                      # closed: the test ended
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                magic, _, token_len = HELLO.unpack(data_frames.recv_exact(conn, HELLO.size))
                data_frames.recv_exact(conn, token_len)
                conn.sendall(data_frames.encode_reply(Status.OK, 0))
                while True:
                    header = data_frames.recv_exact(conn, data_frames.REQUEST.size)
                    _, op, _, seg_len, request_id, base_seq, length = \
                        data_frames.REQUEST.unpack(header)
                    assert op == Op.COMMIT and seg_len == 0
                    body = master_pb2.HeartbeatResponse.FromString(
                        data_frames.recv_exact(conn, length))
                    self.num_pushes += 1
                    conn.sendall(data_frames.encode_reply(
                        Status.OK, (request_id + self.request_id_offset) & 0xFFFFFFFF,
                        body.seq))
            except (OSError, data_frames.PeerClosedError):
                return                      # the master closed the connection

    def close(self) -> None:
        self.listener.close()


def _register(client, plane: _RawDataPlane) -> None:
    client.register_node(NodeSpec(
        "raw-node", "raw-host", plane.address,
        [SegmentSpec("raw-dram", Tier.DRAM, 1 << 20)], commit_push=True), Inventory())


def test_a_reply_naming_another_request_is_no_confirmation_and_fails_the_put():
    plane = _RawDataPlane()
    try:
        with master_process("--commit-timeout", "300ms", "--no-client-commit") as master:
            client, _ = connect_master(master.address)
            try:
                _register(client, plane)
                plane.request_id_offset = 1     # every reply names the previous request
                (slot,) = client.put_start(["stale/key"], [4096], client_id="raw-writer")
                assert isinstance(slot, list) and slot    # a replica on the raw node
                (ended,) = client.put_end(["stale/key"], [0], client_id="raw-writer")
                assert isinstance(ended, kvstore.TransferError)     # ITEM_UNCOMMITTED
                assert "did not confirm the commit" in str(ended)
                assert plane.num_pushes >= 2    # refused, reconnected, pushed again
                assert client.exists(["stale/key"]) == [False]     # dropped, not committed
                # the same node answering its pushes' own ids confirms: the put succeeds
                plane.request_id_offset = 0
                client.put_start(["fresh/key"], [4096], client_id="raw-writer")
                assert client.put_end(["fresh/key"], [0], client_id="raw-writer") == [None]
                assert client.exists(["fresh/key"]) == [True]
            finally:
                client.close()
    finally:
        plane.close()
