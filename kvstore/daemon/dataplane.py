"""The daemon's data-plane server: serves READ/WRITE of segment ranges (data_frames.py format).

Storage is reached only through the tier backends (``kvstore.daemon.backends.Backend``):
a backend that hands out a view (DRAM) is received into / sent from directly; any other
(SSD, HBM) goes through this connection thread's staging buffer of ``STAGING_BYTES``, one
``write_from`` / ``read_into`` per chunk. Socket-level work stays here.

Threading and resource handling: ``kvstore._tcpserver.ThreadedTcpServer`` (one accept
thread, one thread per connection with blocking sockets; at most ``max_connections``).

Error handling: a bad frame ends only its own connection (after an error reply where the
format allows one); the server keeps serving every other client. A client that connects and
sends no complete handshake within ``handshake_timeout_s`` is disconnected.
"""

from __future__ import annotations

import logging
import mmap
import socket
import threading
from dataclasses import dataclass

from kvstore._tcpserver import ThreadedTcpServer
from kvstore._wire import BadHello, data_plane_token, read_hello, tokens_equal
from kvstore.daemon.backends import Backend
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status

log = logging.getLogger("kvstore.daemon.dataplane")

STAGING_BYTES = 8 << 20


@dataclass
class DataPlaneStats:
    """Counters since start. Updated without a lock: exact enough for metrics, never negative."""

    num_connections: int = 0
    num_reads: int = 0
    num_writes: int = 0
    num_errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class _BadFrame(Exception):
    """The peer sent something that is not a valid frame; reply BAD_FRAME and close."""


class DataPlaneServer(ThreadedTcpServer):
    """Serves the segments given to it over TCP on exactly ``host``:``port`` (0 = pick)."""

    def __init__(self, segments: list[Backend], *, node_id: str, host: str, port: int = 0,
                 token: str | None = None, max_connections: int = 1024,
                 handshake_timeout_s: float = 10.0):
        super().__init__(host=host, port=port, max_connections=max_connections,
                         name="kvstore-dataplane", log=log)
        self.node_id = node_id
        self._segment_id_to_segment = {s.segment_id.encode(): s for s in segments}
        self._token = token
        # NOTE: tenants' clients present this one (the master hands it to them), so that
        # no tenant needs the cluster token; kvstore/_wire.py data_plane_token
        self._tenant_token = data_plane_token(token) if token else None
        self._handshake_timeout_s = handshake_timeout_s
        self.stats = DataPlaneStats()
        self.address = ""
        self._local = threading.local()

    def start(self) -> str:
        """Bind, listen and start accepting; return the bound "host:port"."""
        host, port = self.bind_and_listen()
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    def on_accept(self) -> None:
        self.stats.num_connections += 1

    def handle_connection(self, conn: socket.socket, peer: tuple) -> None:
        try:
            data_frames.configure_socket(conn)
            conn.settimeout(self._handshake_timeout_s)
            if self._handshake(conn):
                conn.settimeout(None)
                while self._serve_one(conn):
                    pass
        except _BadFrame as exc:
            self.stats.num_errors += 1
            log.warning("data plane: bad frame from %s: %s", peer, exc)
            self._reply_quietly(conn, Status.BAD_FRAME, str(exc))
        except (OSError, data_frames.PeerClosedError) as exc:
            # a peer that vanished (or a stop()) is routine, not an error of ours
            log.debug("data plane: connection from %s ended: %s", peer, exc)
        except Exception:
            self.stats.num_errors += 1
            raise

    def _handshake(self, conn: socket.socket) -> bool:
        try:
            token = read_hello(lambda n: data_frames.recv_exact(conn, n),
                               data_frames.HELLO_MAGIC, data_frames.PROTOCOL_VERSION)
        except BadHello as exc:
            raise _BadFrame(str(exc)) from exc
        if not (tokens_equal(self._token, token) or tokens_equal(self._tenant_token, token)):
            self.stats.num_errors += 1
            log.warning("data plane: wrong token from %s", conn.getpeername())
            self._reply_quietly(conn, Status.AUTH_FAILED, "wrong or missing token")
            return False
        conn.sendall(data_frames.encode_reply(Status.OK, 0, 0, self.node_id))
        return True

    def _serve_one(self, conn: socket.socket) -> bool:
        """Serve one request; False when the connection must end (clean close or refusal)."""
        header = bytearray(data_frames.REQUEST.size)
        view = memoryview(header)
        first = conn.recv_into(view)
        if first == 0:
            return False  # clean close between requests
        if first < len(header):
            data_frames.recv_exact_into(conn, view[first:])
        magic, op_code, _, seg_len, request_id, offset, length = data_frames.REQUEST.unpack(header)
        if magic != data_frames.REQUEST_MAGIC:
            raise _BadFrame(f"bad request magic {bytes(magic)!r}")
        if op_code == Op.PING:
            if seg_len:
                raise _BadFrame("PING carries no segment id")
            conn.sendall(data_frames.encode_reply(Status.OK, request_id))
            return True
        if op_code not in (Op.READ, Op.WRITE):
            raise _BadFrame(f"unknown op {op_code}")
        if not 0 < seg_len <= data_frames.MAX_SEGMENT_ID_BYTES:
            raise _BadFrame(f"segment id length {seg_len}")
        segment = self._segment_id_to_segment.get(data_frames.recv_exact(conn, seg_len))
        status, message = Status.OK, ""
        if segment is None:
            status, message = Status.NO_SEGMENT, "no such segment on this node"
        elif not segment.check_range(offset, length):
            status, message = Status.OUT_OF_RANGE, (
                f"range [{offset}, +{length}) outside segment of {segment.size_bytes} bytes")
        if status != Status.OK:
            self.stats.num_errors += 1
            conn.sendall(data_frames.encode_reply(status, request_id, 0, message))
            # NOTE: a refused WRITE's payload is still on the wire; we cannot skip a length
            # we do not trust, so the connection ends. A refused READ leaves it usable.
            return op_code == Op.READ
        if op_code == Op.WRITE:
            self._receive_into(conn, segment, offset, length)
            conn.sendall(data_frames.encode_reply(Status.OK, request_id))
            self.stats.num_writes += 1
            self.stats.bytes_written += length
        else:
            self._send_from(conn, segment, data_frames.encode_reply(Status.OK, request_id,
                                                                     length), offset, length)
            self.stats.num_reads += 1
            self.stats.bytes_read += length
        return True

    def _staging(self) -> memoryview:
        staging = getattr(self._local, "staging", None)
        if staging is None:
            # NOTE: page-aligned (anonymous mmap), so backends may do direct I/O from it
            self._local.mapping = mmap.mmap(-1, STAGING_BYTES)
            staging = self._local.staging = memoryview(self._local.mapping)
        return staging

    def _receive_into(self, conn: socket.socket, backend: Backend, offset: int,
                      length: int) -> None:
        view = backend.view(offset, length)
        if view is not None:
            data_frames.recv_exact_into(conn, view)
            return
        staging = self._staging()
        for start in range(0, length, STAGING_BYTES):
            chunk = staging[:min(STAGING_BYTES, length - start)]
            data_frames.recv_exact_into(conn, chunk)
            backend.write_from(offset + start, chunk)

    def _send_from(self, conn: socket.socket, backend: Backend, header: bytes, offset: int,
                   length: int) -> None:
        view = backend.view(offset, length)
        if view is not None:
            data_frames.sendmsg_all(conn, [header, view])
            return
        staging = self._staging()
        conn.sendall(header)
        for start in range(0, length, STAGING_BYTES):
            chunk = staging[:min(STAGING_BYTES, length - start)]
            backend.read_into(offset + start, chunk)
            conn.sendall(chunk)

    @staticmethod
    def _reply_quietly(conn: socket.socket, status: Status, message: str) -> None:
        try:
            conn.settimeout(1.0)
            conn.sendall(data_frames.encode_reply(status, 0, 0, message))
        except OSError:
            pass
