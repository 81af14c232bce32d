"""The daemon's data-plane server: serves READ/WRITE of segment ranges (frames.py format).

Threading: one accept thread, and one thread per connection with blocking sockets. NOTE: for
bulk bytes in CPython this beats asyncio: ``recv_into``/``sendmsg`` release the GIL for the
whole copy, and a blocking thread avoids the event loop's per-chunk wake-ups (measured in
bench/transfer_bench.py).

Resource handling: ``start`` binds and listens before it returns (so the address is known
and connections queue); ``stop`` closes the listener, shuts every open connection down and
joins the threads. At most ``max_connections`` connections are served at once; beyond that
new ones are closed at once.

Error handling: a bad frame ends only its own connection (after an error reply where the
format allows one); the server keeps serving every other client. A client that connects and
sends no complete handshake within ``handshake_timeout_s`` is disconnected.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

from kvstore.daemon.segments import Segment
from kvstore.transport import frames
from kvstore.transport.frames import Op, Status

log = logging.getLogger("kvstore.daemon.dataplane")


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


class DataPlaneServer:
    """Serves the segments given to it over TCP on exactly ``host``:``port`` (0 = pick)."""

    def __init__(self, segments: list[Segment], *, node_id: str, host: str, port: int = 0,
                 token: str | None = None, max_connections: int = 1024,
                 handshake_timeout_s: float = 10.0):
        self.node_id = node_id
        self._segment_id_to_segment = {s.segment_id.encode(): s for s in segments}
        self._host = host
        self._port = port
        self._token = token
        self._max_connections = max_connections
        self._handshake_timeout_s = handshake_timeout_s
        self.stats = DataPlaneStats()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn_to_thread: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self.address = ""

    def start(self) -> str:
        """Bind, listen and start accepting; return the bound "host:port"."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, self._port))
        listener.listen(512)
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name="kvstore-dataplane-accept")
        self._accept_thread.start()
        return self.address

    def stop(self) -> None:
        """Stop accepting, disconnect every client, join the threads. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            connections = dict(self._conn_to_thread)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in connections.values():
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("data plane: accept failed")
                continue
            with self._lock:
                if len(self._conn_to_thread) >= self._max_connections:
                    log.warning("data plane: refusing %s: %d connections open", peer,
                                self._max_connections)
                    conn.close()
                    continue
                thread = threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                          name=f"kvstore-dataplane-{peer[1]}")
                self._conn_to_thread[conn] = thread
            self.stats.num_connections += 1
            thread.start()

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        try:
            frames.configure_socket(conn)
            conn.settimeout(self._handshake_timeout_s)
            if self._handshake(conn):
                conn.settimeout(None)
                while self._serve_one(conn):
                    pass
        except _BadFrame as exc:
            self.stats.num_errors += 1
            log.warning("data plane: bad frame from %s: %s", peer, exc)
            self._reply_quietly(conn, Status.BAD_FRAME, str(exc))
        except (OSError, frames.PeerClosedError) as exc:
            # a peer that vanished (or a stop()) is routine, not an error of ours
            log.debug("data plane: connection from %s ended: %s", peer, exc)
        except Exception:  # noqa: BLE001 - one connection's bug must not end the server
            self.stats.num_errors += 1
            log.exception("data plane: connection from %s failed", peer)
        finally:
            with self._lock:
                self._conn_to_thread.pop(conn, None)
            conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        magic, version, token_len = frames.HELLO.unpack(frames.recv_exact(conn, frames.HELLO.size))
        if magic != frames.HELLO_MAGIC or version != frames.PROTOCOL_VERSION:
            raise _BadFrame(f"bad hello (magic {magic!r}, version {version})")
        if token_len > frames.MAX_TOKEN_BYTES:
            raise _BadFrame(f"token length {token_len} over {frames.MAX_TOKEN_BYTES}")
        token = frames.recv_exact(conn, token_len)
        if not frames.tokens_equal(self._token, token):
            self.stats.num_errors += 1
            log.warning("data plane: wrong token from %s", conn.getpeername())
            self._reply_quietly(conn, Status.AUTH_FAILED, "wrong or missing token")
            return False
        conn.sendall(frames.encode_reply(Status.OK, 0, 0, self.node_id))
        return True

    def _serve_one(self, conn: socket.socket) -> bool:
        """Serve one request; False when the connection must end (clean close or refusal)."""
        header = bytearray(frames.REQUEST.size)
        view = memoryview(header)
        first = conn.recv_into(view)
        if first == 0:
            return False  # clean close between requests
        if first < len(header):
            frames.recv_exact_into(conn, view[first:])
        magic, op_code, _, seg_len, request_id, offset, length = frames.REQUEST.unpack(header)
        if magic != frames.REQUEST_MAGIC:
            raise _BadFrame(f"bad request magic {bytes(magic)!r}")
        if op_code == Op.PING:
            if seg_len:
                raise _BadFrame("PING carries no segment id")
            conn.sendall(frames.encode_reply(Status.OK, request_id))
            return True
        if op_code not in (Op.READ, Op.WRITE):
            raise _BadFrame(f"unknown op {op_code}")
        if not 0 < seg_len <= frames.MAX_SEGMENT_ID_BYTES:
            raise _BadFrame(f"segment id length {seg_len}")
        segment = self._segment_id_to_segment.get(frames.recv_exact(conn, seg_len))
        status, message = Status.OK, ""
        if segment is None:
            status, message = Status.NO_SEGMENT, "no such segment on this node"
        elif not segment.check_range(offset, length):
            status, message = Status.OUT_OF_RANGE, (
                f"range [{offset}, +{length}) outside segment of {segment.size_bytes} bytes")
        if status != Status.OK:
            self.stats.num_errors += 1
            conn.sendall(frames.encode_reply(status, request_id, 0, message))
            # NOTE: a refused WRITE's payload is still on the wire; we cannot skip a length
            # we do not trust, so the connection ends. A refused READ leaves it usable.
            return op_code == Op.READ
        if op_code == Op.WRITE:
            segment.recv_range(conn, offset, length)
            conn.sendall(frames.encode_reply(Status.OK, request_id))
            self.stats.num_writes += 1
            self.stats.bytes_written += length
        else:
            segment.send_range(conn, frames.encode_reply(Status.OK, request_id, length),
                               offset, length)
            self.stats.num_reads += 1
            self.stats.bytes_read += length
        return True

    @staticmethod
    def _reply_quietly(conn: socket.socket, status: Status, message: str) -> None:
        try:
            conn.settimeout(1.0)
            conn.sendall(frames.encode_reply(status, 0, 0, message))
        except OSError:
            pass
