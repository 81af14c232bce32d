"""``FastCarrier``: master calls over the master's framed-TCP fast path (``fast_frames``).

The same protobuf messages as gRPC, without HTTP/2: a round trip costs tens of microseconds
instead of ~0.5 ms. Errors map through the same table (``kvstore.rpc.errors.status_error``).

Threading: thread-safe. Each call checks a connection out of a small pool (or opens one),
so concurrent calls never share a socket; a connection goes back to the pool only after a
complete, well-formed exchange.

Timeouts: every socket operation of a call is bounded by what is left of its ``timeout_s``
(on a plain connection by the kernel's socket timeouts, up to ``TIMEOUT_SLACK_S`` longer);
running past it raises MasterUnavailableError (DEADLINE_EXCEEDED) and the connection is
dropped (its late reply must not be read by the next call).

TLS (``tls``): each connection does a client handshake (``kvstore._tls.wrap_client``) before
the hello; a refused handshake is AuthenticationError, never retried.

Broken connections (master restarted, peer closed): the call raises ConnectionLostError and
the idle pool is emptied (its connections lead to the same dead peer); the call policy above
decides whether to send the request again.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from typing import Any

import grpc

from kvstore._deadline import Deadline
from kvstore._errors import ClosedError, KVStoreError
from kvstore._tls import TLSConfig, handshake_error, wrap_client
from kvstore.rpc import fast_frames as ff
from kvstore.rpc.carrier import Carrier
from kvstore.rpc.errors import CODE_NUMBER_TO_STATUS, status_error
from kvstore.rpc.methods import Method

#: Bytes a connection's reply buffer starts with; it grows (up to MAX_FRAME_BYTES) for a
#: larger reply and keeps that size.
_REPLY_BUFFER_BYTES = 64 * 1024
#: How much longer than a call's timeout a plain connection's kernel timeout may be before
#: it is set again (see ``_Connection.set_timeout``): a call may wait up to this much past
#: its deadline.
TIMEOUT_SLACK_S = 0.002


class _Connection:
    """One handshaken socket. Not thread-safe: owned by one call at a time."""

    def __init__(self, host: str, port: int, token: str | None, timeout_s: float,
                 spin_s: float, tls: tuple[ssl.SSLContext, TLSConfig] | None):
        self.spin_s = spin_s
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        # NOTE: a plain connection's socket stays blocking, bounded by the kernel's
        # SO_RCVTIMEO/SO_SNDTIMEO: a Python socket timeout makes every send and receive two
        # system calls (poll first) and every settimeout a third (the fd's mode), which cost
        # a one-key call about 8 us of client CPU (bench/RESULTS.md, "Master fast path in
        # wire form"). TLS keeps Python's timeouts (its reads cannot take MSG_DONTWAIT).
        self.plain = tls is None
        self.kernel_timeout_s = 0.0
        if tls is not None:
            self.sock = wrap_client(self.sock, tls[0], host, tls[1], f"{host}:{port}")
        # NOTE: replies are read with recv_into into this buffer, not through a buffered
        # file: one system call usually brings a whole reply, and the file's Python-level
        # readinto cost more than the copy it saved.
        self.buffer = bytearray(_REPLY_BUFFER_BYTES)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.set_timeout(timeout_s)
            self.sock.sendall(ff.encode_hello(token))
            status, _, body = self._read_reply(0)
        except ssl.SSLError as exc:
            # NOTE: under TLS 1.3 a refused client certificate shows here, after the
            # client's side of the handshake, as the server's alert
            self.close()
            raise handshake_error(exc, f"{host}:{port}") from exc
        except BaseException:
            self.close()
            raise
        if status != ff.OK:
            self.close()
            raise status_error(CODE_NUMBER_TO_STATUS.get(status, grpc.StatusCode.UNKNOWN),
                               str(body, "utf-8", "replace"), "handshake")
        self.next_request_id = 1

    def set_timeout(self, timeout_s: float) -> None:
        """Bound each later send and receive by ``timeout_s`` (running past it raises
        TimeoutError). A plain connection keeps its kernel timeout while that is within
        ``TIMEOUT_SLACK_S`` above ``timeout_s``: no system call for the calls of one client,
        whose timeouts differ by microseconds."""
        if not self.plain:
            self.sock.settimeout(timeout_s)
            return
        if timeout_s <= self.kernel_timeout_s <= timeout_s + TIMEOUT_SLACK_S:
            return
        # NOTE: a zero timeval means "no timeout" to the kernel: at least 1 us
        bound_s = max(timeout_s, 0.0) + TIMEOUT_SLACK_S / 2
        seconds = int(bound_s)
        timeval = struct.pack("ll", seconds, max(int((bound_s - seconds) * 1e6), 1))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.sock.settimeout(None)
        self.kernel_timeout_s = bound_s

    def send(self, method_id: int, body: bytes, timeout_s: float) -> int:
        """Send one request (header and body in one sendall); return its request id."""
        self.set_timeout(timeout_s)
        request_id = self.next_request_id
        self.next_request_id = (request_id + 1) & 0xFFFFFFFF
        try:
            self.sock.sendall(ff.encode_request(method_id, request_id, body))
        except BlockingIOError as exc:   # the kernel's SO_SNDTIMEO ran out
            raise TimeoutError("send timed out") from exc
        return request_id

    def receive(self, request_id: int, timeout_s: float) -> tuple[int, memoryview]:
        """The (status, reply body) of request ``request_id``. The body is a view of this
        connection's buffer: valid until its next exchange, so parse it before checkin."""
        num_read = 0
        if self.spin_s:
            if not self.plain:
                self.sock.settimeout(0.0)
            num_read = self._spin(min(self.spin_s, timeout_s))
        self.set_timeout(timeout_s)
        try:
            status, reply_id, reply_body = self._read_reply(num_read)
        except BlockingIOError as exc:   # the kernel's SO_RCVTIMEO ran out
            raise TimeoutError("receive timed out") from exc
        if reply_id != request_id:
            raise ConnectionError(f"reply to request {reply_id}, expected {request_id}")
        return status, reply_body

    def _spin(self, spin_s: float) -> int:
        """Poll the (non-blocking) socket for a reply for up to ``spin_s``; return the bytes
        received into the buffer (0 if none came).

        NOTE: why poll: a thread blocked in recv lets its CPU idle, and on the build VM waking
        an idle vCPU plus the caches it lost cost more than the master's work: polling up to
        200 us cut 64 KiB get and put p50 by about 30%, for up to ``spin_s`` of CPU per call
        (bench/RESULTS.md, Client).
        """
        view = memoryview(self.buffer)
        give_up_at = time.perf_counter() + spin_s
        # NOTE: a plain socket stays blocking: each poll asks not to wait (MSG_DONTWAIT)
        if self.plain:
            sock = self.sock
            receive = lambda: sock.recv_into(view, 0, socket.MSG_DONTWAIT)  # noqa: E731
        else:
            receive = lambda: self.sock.recv_into(view)  # noqa: E731
        while True:
            try:
                received = receive()
            except (BlockingIOError, ssl.SSLWantReadError):
                if time.perf_counter() > give_up_at:
                    return 0
                continue
            if not received:
                raise ConnectionError("master closed the fast-path connection")
            return received

    def _read_reply(self, num_read: int) -> tuple[int, int, memoryview]:
        """Read one reply frame, of which ``num_read`` bytes are already in the buffer."""
        header_size = ff.REPLY.size
        # NOTE: the first receive may take the whole buffer: with one request outstanding,
        # a reply is all the peer can have sent, so one system call usually brings it all.
        if num_read < header_size:
            num_read = self._read_at_least(num_read, header_size, len(self.buffer))
        body_len, status, request_id = ff.REPLY.unpack_from(self.buffer)
        if body_len > ff.MAX_FRAME_BYTES:
            raise ConnectionError(f"reply of {body_len} bytes exceeds {ff.MAX_FRAME_BYTES}")
        frame_len = header_size + body_len
        if frame_len > len(self.buffer):
            # NOTE: a new buffer rather than extend(): a bytearray with a live view (an
            # earlier reply body) cannot be resized.
            grown = bytearray(frame_len)
            grown[:num_read] = memoryview(self.buffer)[:num_read]
            self.buffer = grown
        if num_read < frame_len:
            num_read = self._read_at_least(num_read, frame_len, frame_len)
        if num_read != frame_len:
            # NOTE: one request is outstanding per connection, so bytes past its reply can
            # only mean a confused peer; reading on would misframe every later reply.
            raise ConnectionError(f"master sent {num_read - frame_len} bytes past a reply")
        return status, request_id, memoryview(self.buffer)[header_size:frame_len]

    def _read_at_least(self, num_read: int, num_bytes: int, limit: int) -> int:
        """Receive into the buffer from ``num_read`` until at least ``num_bytes`` (and at most
        ``limit``) bytes are there; return the count."""
        view = memoryview(self.buffer)
        while num_read < num_bytes:
            received = self.sock.recv_into(view[num_read:limit])
            if not received:
                raise ConnectionError("master closed the fast-path connection")
            num_read += received
        return num_read

    def close(self) -> None:
        self.sock.close()


class FastCarrier(Carrier):
    """Calls the master's fast path at ``host``:``port``. Thread-safe.

    ``reply_spin_s`` > 0: each call polls for its reply for up to that long before it blocks
    (lower latency for up to that much CPU per call; see ``_Connection._spin``).
    """

    name = "fast"

    def __init__(self, host: str, port: int, *, token: str | None = None,
                 tls: TLSConfig | None = None, max_idle_connections: int = 16,
                 reply_spin_s: float = 0.0):
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.reply_spin_s = reply_spin_s
        self._token = token
        # NOTE: one context for every connection: it holds the loaded certificates
        self._tls = (tls.client_context(), tls) if tls is not None else None
        self._max_idle = max_idle_connections
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self, method: Method, request: Any, timeout_s: float) -> "PendingCall":
        """See ``Carrier.start``. Raises at once only what needs no reply: the mapped
        RESOURCE_EXHAUSTED (request too large), ClosedError, or a failure to connect."""
        body = request.SerializeToString()
        if len(body) > ff.MAX_FRAME_BYTES:
            raise status_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"request of {len(body)} bytes exceeds {ff.MAX_FRAME_BYTES}",
                               method.name)
        return PendingCall(self, method, body, Deadline.after(timeout_s))

    def _checkout(self, deadline: Deadline, method: str) -> _Connection:
        with self._lock:
            if self._closed:
                raise ClosedError("this master client is closed")
            if self._idle:
                return self._idle.pop()
        try:
            return _Connection(self.host, self.port, self._token, deadline.timeout_s(),
                               self.reply_spin_s, self._tls)
        except (socket.timeout, TimeoutError) as exc:
            raise status_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"connecting to {self.address} timed out", method) from exc
        except OSError as exc:
            raise status_error(grpc.StatusCode.UNAVAILABLE,
                               f"cannot reach {self.address}: {exc}", method) from exc

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _closed_or(self, error: KVStoreError) -> KVStoreError:
        return ClosedError("this master client was closed") if self._closed else error

    def close(self) -> None:
        """Close every idle connection; connections in use close when their call ends."""
        with self._lock:
            self._closed = True
        self._drop_idle()


class PendingCall:
    """One fast-path call whose request is sent (``FastCarrier.start``) and whose reply is
    read by ``result()``. Not thread-safe: owned by the thread that started it."""

    __slots__ = ("_carrier", "_method", "_deadline", "_conn", "_request_id", "_send_error")

    def __init__(self, carrier: FastCarrier, method: Method, body: bytes, deadline: Deadline):
        self._carrier, self._method, self._deadline = carrier, method, deadline
        self._conn = carrier._checkout(deadline, method.name)
        self._send_error: OSError | None = None
        try:
            self._request_id = self._conn.send(method.method_id, body, deadline.timeout_s())
        except OSError as exc:
            # NOTE: kept for result(), which reports every failed exchange the same way
            self._send_error = exc

    def result(self) -> Any:
        """The reply, or the mapped kvstore error (see the module docstring). Call once."""
        conn, name, carrier = self._conn, self._method.name, self._carrier
        try:
            if self._send_error is not None:
                raise self._send_error
            status, reply_body = conn.receive(self._request_id, self._deadline.timeout_s())
        except (socket.timeout, TimeoutError) as exc:
            conn.close()
            raise status_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "no reply before the deadline", name) from exc
        except OSError as exc:
            conn.close()
            carrier._drop_idle()
            raise carrier._closed_or(status_error(
                grpc.StatusCode.UNAVAILABLE, f"connection lost: {exc}", name)) from exc
        # NOTE: the body is a view of the connection's buffer: parse before checkin.
        if status == ff.OK:
            try:
                reply = self._method.reply_class.FromString(reply_body)
            finally:
                carrier._checkin(conn)
            return reply
        message = str(reply_body, "utf-8", "replace")
        carrier._checkin(conn)
        code = CODE_NUMBER_TO_STATUS.get(status, grpc.StatusCode.UNKNOWN)
        raise status_error(code, message, name)
