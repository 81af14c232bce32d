"""``FastMasterClient``: the client of the master's framed-TCP metadata path (``fastframes``).

Same contract as ``rpc_client.MasterClient``: ``call(method, request, timeout_s=)`` returns
the reply message or raises the kvstore error mapped from the status, with the same table
(``rpc_client.map_status``). Used by ``KVStore`` when the master advertises a fast port.

Split calls: ``start`` sends a request and returns a ``PendingCall`` whose ``result()``
reads the reply, so a caller can work while the master does (the put flow hashes its values
during PutStart); ``call`` is ``start(...).result()``.

Threading: thread-safe. Each call checks a connection out of a small pool (or opens one),
so concurrent calls never share a socket; a connection goes back to the pool only after a
complete, well-formed exchange.

Deadlines: every socket operation of a call is bounded by what is left of ``timeout_s``;
running past it raises MasterUnavailableError (DEADLINE_EXCEEDED) and the connection is
dropped (its late reply must not be read by the next call).

Reconnects: a connection that breaks (master restarted, peer closed) is dropped. Read-only
and idempotent calls (``RETRYABLE_METHODS``) are retried once on a fresh connection; any
other call (PutStart above all: it allocates) fails with MasterUnavailableError, because
the master may or may not have run it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import grpc

from kvstore import _errors as errors
from kvstore.master import fastframes as ff
from kvstore.master.rpc_client import map_status
from kvstore.v1 import master_pb2 as pb

#: Calls that may run twice with the same effect as once: reads (a second GetReplicas only
#: re-grants a lease, which never shortens) and Stats/ListNodes.
RETRYABLE_METHODS = frozenset({"GetReplicas", "RenewLease", "Exists", "MatchPrefix", "Stats",
                               "ListNodes"})
#: Bytes a connection's reply buffer starts with; it grows (up to MAX_FRAME_BYTES) for a
#: larger reply and keeps that size.
_REPLY_BUFFER_BYTES = 64 * 1024


class _Method:
    """What ``call`` needs per method, looked up once per call instead of built per call."""

    __slots__ = ("method_id", "reply_class", "num_attempts")

    def __init__(self, name: str, method_id: int):
        self.method_id = method_id
        self.reply_class = getattr(pb, f"{name}Response")
        self.num_attempts = 2 if name in RETRYABLE_METHODS else 1


_NAME_TO_METHOD = {name: _Method(name, method_id)
                   for name, method_id in ff.METHOD_TO_ID.items()}


class _Connection:
    """One handshaken socket. Not thread-safe: owned by one call at a time."""

    def __init__(self, host: str, port: int, token: str | None, timeout_s: float,
                 spin_s: float):
        self.spin_s = spin_s
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        # NOTE: replies are read with recv_into into this buffer, not through a buffered
        # file: one system call usually brings a whole reply, and the file's Python-level
        # readinto cost more than the copy it saved.
        self.buffer = bytearray(_REPLY_BUFFER_BYTES)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(ff.encode_hello(token))
            status, _, body = self._read_reply(0)
        except BaseException:
            self.close()
            raise
        if status != ff.OK:
            self.close()
            raise map_status(ff.CODE_NUMBER_TO_STATUS.get(status, grpc.StatusCode.UNKNOWN),
                             str(body, "utf-8", "replace"), "handshake")
        self.next_request_id = 1

    def send(self, method_id: int, body: bytes, timeout_s: float) -> int:
        """Send one request (header and body in one sendall); return its request id."""
        self.sock.settimeout(timeout_s)
        request_id = self.next_request_id
        self.next_request_id = (request_id + 1) & 0xFFFFFFFF
        self.sock.sendall(ff.encode_request(method_id, request_id, body))
        return request_id

    def receive(self, request_id: int, timeout_s: float) -> tuple[int, memoryview]:
        """The (status, reply body) of request ``request_id``. The body is a view of this
        connection's buffer: valid until its next exchange, so parse it before checkin."""
        num_read = 0
        if self.spin_s:
            self.sock.settimeout(0.0)
            num_read = self._spin(min(self.spin_s, timeout_s))
        self.sock.settimeout(timeout_s)
        status, reply_id, reply_body = self._read_reply(num_read)
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
        while True:
            try:
                received = self.sock.recv_into(view)
            except BlockingIOError:
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


class FastMasterClient:
    """Blocking client of one master's fast path at ``host``:``port``. Thread-safe.

    ``reply_spin_s`` > 0: each call polls for its reply for up to that long before it blocks
    (lower latency for up to that much CPU per call; see ``_Connection._spin``).

    ``call`` raises the mapped kvstore error; it never returns a partial reply. Close it with
    ``close()`` (then calls raise ClosedError) or use it as a context manager.
    """

    def __init__(self, host: str, port: int, *, token: str | None = None,
                 timeout_s: float = 10.0, max_idle_connections: int = 16,
                 reply_spin_s: float = 0.0):
        self.host, self.port = host, port
        self.reply_spin_s = reply_spin_s
        self.timeout_s = timeout_s
        self._token = token
        self._max_idle = max_idle_connections
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """Invoke RPC ``method`` (e.g. ``"PutStart"``) with ``request``; return its reply."""
        return self.start(method, request, timeout_s=timeout_s).result()

    def start(self, method: str, request: Any, *,
              timeout_s: float | None = None) -> "PendingCall":
        """Send ``request`` now and return a PendingCall whose ``result()`` waits for the
        reply (same reply and errors as ``call``), so the caller can work while the master
        does. The caller must call ``result()`` once: until then the call holds a connection.

        Raises at once only what needs no reply: InvalidArgumentError (unknown method), the
        mapped RESOURCE_EXHAUSTED (request too large), ClosedError, or a failure to connect.
        """
        spec = _NAME_TO_METHOD.get(method)
        if spec is None:
            raise errors.InvalidArgumentError(f"unknown master method {method!r}")
        body = request.SerializeToString()
        if len(body) > ff.MAX_FRAME_BYTES:
            raise map_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"request of {len(body)} bytes exceeds {ff.MAX_FRAME_BYTES}",
                             method)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        return PendingCall(self, method, spec, body, deadline)

    def _checkout(self, deadline: float, method: str) -> _Connection:
        with self._lock:
            if self._closed:
                raise errors.ClosedError("this master client is closed")
            if self._idle:
                return self._idle.pop()
        try:
            return _Connection(self.host, self.port, self._token, _left_s(deadline),
                               self.reply_spin_s)
        except (socket.timeout, TimeoutError) as exc:
            raise map_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"connecting to {self.host}:{self.port} timed out", method) from exc
        except OSError as exc:
            raise map_status(grpc.StatusCode.UNAVAILABLE,
                             f"cannot reach {self.host}:{self.port}: {exc}", method) from exc

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _closed_or(self, error: errors.KVStoreError) -> errors.KVStoreError:
        return errors.ClosedError("this master client was closed") if self._closed else error

    def close(self) -> None:
        """Close every idle connection; connections in use close when their call ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> "FastMasterClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PendingCall:
    """One fast-path call whose request is sent (``FastMasterClient.start``) and whose reply
    is read by ``result()``. Not thread-safe: owned by the thread that started it."""

    __slots__ = ("_client", "_method", "_spec", "_body", "_deadline", "_attempt", "_conn",
                 "_request_id", "_send_error")

    def __init__(self, client: FastMasterClient, method: str, spec: _Method, body: bytes,
                 deadline: float):
        self._client, self._method, self._spec = client, method, spec
        self._body, self._deadline = body, deadline
        self._attempt = 0
        self._send()

    def _send(self) -> None:
        self._conn = self._client._checkout(self._deadline, self._method)
        self._send_error: OSError | None = None
        try:
            self._request_id = self._conn.send(self._spec.method_id, self._body,
                                               _left_s(self._deadline))
        except OSError as exc:
            # NOTE: kept for result(), which owns the retry rule for failed exchanges
            self._send_error = exc

    def result(self) -> Any:
        """The reply, or the mapped kvstore error (see the module docstring). Call once."""
        method, deadline = self._method, self._deadline
        while True:
            conn = self._conn
            try:
                if self._send_error is not None:
                    raise self._send_error
                status, reply_body = conn.receive(self._request_id, _left_s(deadline))
            except (socket.timeout, TimeoutError) as exc:
                conn.close()
                raise map_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 "no reply before the deadline", method) from exc
            except OSError as exc:
                conn.close()
                self._attempt += 1
                if self._attempt < self._spec.num_attempts and time.monotonic() < deadline:
                    self._send()
                    continue
                raise self._client._closed_or(map_status(
                    grpc.StatusCode.UNAVAILABLE, f"connection lost: {exc}", method)) from exc
            # NOTE: the body is a view of the connection's buffer: parse before checkin.
            if status == ff.OK:
                try:
                    reply = self._spec.reply_class.FromString(reply_body)
                finally:
                    self._client._checkin(conn)
                return reply
            message = str(reply_body, "utf-8", "replace")
            self._client._checkin(conn)
            code = ff.CODE_NUMBER_TO_STATUS.get(status, grpc.StatusCode.UNKNOWN)
            raise map_status(code, message, method)


def _left_s(deadline: float) -> float:
    """Seconds left before ``deadline``; a tiny positive floor, so a socket call still fails
    by timeout (not by blocking forever, which a timeout of 0 or None would mean)."""
    return max(deadline - time.monotonic(), 1e-3)
