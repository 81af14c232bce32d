"""``FastMasterClient``: the client of the master's framed-TCP metadata path (``fastframes``).

Same contract as ``rpc_client.MasterClient``: ``call(method, request, timeout_s=)`` returns
the reply message or raises the kvstore error mapped from the status, with the same table
(``rpc_client.map_status``). Used by ``KVStore`` when the master advertises a fast port.

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
_READ_BUFFER_BYTES = 256 * 1024


class _Connection:
    """One handshaken socket. Not thread-safe: owned by one call at a time."""

    def __init__(self, host: str, port: int, token: str | None, timeout_s: float):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.reader = None
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.reader = self.sock.makefile("rb", buffering=_READ_BUFFER_BYTES)
            self.sock.sendall(ff.encode_hello(token))
            status, _, body = self._read_reply()
        except BaseException:
            self.close()
            raise
        if status != ff.OK:
            self.close()
            raise map_status(ff.CODE_NUMBER_TO_STATUS.get(status, grpc.StatusCode.UNKNOWN),
                             body.decode("utf-8", "replace"), "handshake")
        self.next_request_id = 1

    def round_trip(self, method_id: int, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        self.sock.settimeout(timeout_s)
        request_id = self.next_request_id
        self.next_request_id = (request_id + 1) & 0xFFFFFFFF
        self.sock.sendall(ff.encode_request(method_id, request_id, body))
        status, reply_id, reply_body = self._read_reply()
        if reply_id != request_id:
            raise ConnectionError(f"reply to request {reply_id}, expected {request_id}")
        return status, reply_body

    def _read_reply(self) -> tuple[int, int, bytes]:
        header = self.reader.read(ff.REPLY.size)
        if len(header) < ff.REPLY.size:
            raise ConnectionError("master closed the fast-path connection")
        body_len, status, request_id = ff.REPLY.unpack(header)
        if body_len > ff.MAX_FRAME_BYTES:
            raise ConnectionError(f"reply of {body_len} bytes exceeds {ff.MAX_FRAME_BYTES}")
        body = self.reader.read(body_len)
        if len(body) < body_len:
            raise ConnectionError("master closed the connection inside a reply")
        return status, request_id, body

    def close(self) -> None:
        # NOTE: the reader holds a reference to the socket; the descriptor is released only
        # once both are closed.
        if self.reader is not None:
            self.reader.close()
        self.sock.close()


class FastMasterClient:
    """Blocking client of one master's fast path at ``host``:``port``. Thread-safe.

    ``call`` raises the mapped kvstore error; it never returns a partial reply. Close it with
    ``close()`` (then calls raise ClosedError) or use it as a context manager.
    """

    def __init__(self, host: str, port: int, *, token: str | None = None,
                 timeout_s: float = 10.0, max_idle_connections: int = 16):
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self._token = token
        self._max_idle = max_idle_connections
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """Invoke RPC ``method`` (e.g. ``"PutStart"``) with ``request``; return its reply."""
        method_id = ff.METHOD_TO_ID.get(method)
        if method_id is None:
            raise errors.InvalidArgumentError(f"unknown master method {method!r}")
        body = request.SerializeToString()
        if len(body) > ff.MAX_FRAME_BYTES:
            raise map_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"request of {len(body)} bytes exceeds {ff.MAX_FRAME_BYTES}",
                             method)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        num_attempts = 2 if method in RETRYABLE_METHODS else 1
        for attempt in range(num_attempts):
            conn = self._checkout(deadline, method)
            try:
                status, reply_body = conn.round_trip(method_id, body, _left_s(deadline))
            except (socket.timeout, TimeoutError) as exc:
                conn.close()
                raise map_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 "no reply before the deadline", method) from exc
            except OSError as exc:
                conn.close()
                if attempt + 1 < num_attempts and time.monotonic() < deadline:
                    continue
                raise self._closed_or(map_status(grpc.StatusCode.UNAVAILABLE,
                                                 f"connection lost: {exc}", method)) from exc
            self._checkin(conn)
            if status == ff.OK:
                return getattr(pb, f"{method}Response").FromString(reply_body)
            code = ff.CODE_NUMBER_TO_STATUS.get(status, grpc.StatusCode.UNKNOWN)
            raise map_status(code, reply_body.decode("utf-8", "replace"), method)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _checkout(self, deadline: float, method: str) -> _Connection:
        with self._lock:
            if self._closed:
                raise errors.ClosedError("this master client is closed")
            if self._idle:
                return self._idle.pop()
        try:
            return _Connection(self.host, self.port, self._token, _left_s(deadline))
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


def _left_s(deadline: float) -> float:
    """Seconds left before ``deadline``; a tiny positive floor, so a socket call still fails
    by timeout (not by blocking forever, which a timeout of 0 or None would mean)."""
    return max(deadline - time.monotonic(), 1e-3)
