"""One client connection to a daemon's data plane, and the per-node pool that reuses them.

A ``Connection`` speaks the frames of ``kvstore.transport.frames``: it performs the
handshake when opened, then sends requests and reads replies. It knows nothing about retries,
striping or batches (that is ``tcp.TcpTransport``). OS errors are mapped into kvstore's error
tree here, once, by ``map_os_error``.

Resource handling: a connection whose stream state is uncertain (an OS error, a timeout, a
refused WRITE after which the server closes) is closed, never returned to the pool.
"""

from __future__ import annotations

import collections
import socket
import ssl
import threading

from kvstore._deadline import Deadline
from kvstore._errors import (
    AuthenticationError, ClosedError, TransferError, TransferTimeoutError,
)
from kvstore._tls import TLSConfig, handshake_error, wrap_client
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status


class ReplyError(TransferError):
    """The daemon answered a request with an error status (the range was refused)."""

    def __init__(self, message: str, status: Status):
        super().__init__(message)
        self.status = status


def split_address(data_addr: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port); TransferError when malformed."""
    host, _, port = data_addr.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise TransferError(f"tcp: malformed data-plane address {data_addr!r}")
    return host, int(port)


def map_os_error(exc: BaseException, node_id: str, what: str) -> TransferError:
    """The kvstore error for an OS/socket failure while doing ``what`` with ``node_id``."""
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransferTimeoutError(f"tcp {node_id}: {what}: deadline exceeded")
    return TransferError(f"tcp {node_id}: {what}: {exc}")


def timeout_left_s(deadline: Deadline, node_id: str) -> float:
    """Seconds left for one socket operation with ``node_id``; TransferTimeoutError naming
    the node once ``deadline`` has passed."""
    remaining = deadline.remaining_s()
    if remaining <= 0:
        raise TransferTimeoutError(f"tcp {node_id}: deadline exceeded")
    return remaining


class Connection:
    """An open, authenticated data-plane connection. Not thread-safe: one user at a time."""

    def __init__(self, data_addr: str, *, token: str | None, deadline: Deadline, node_id: str,
                 tls: tuple[ssl.SSLContext, TLSConfig] | None = None):
        host, port = split_address(data_addr)
        self.data_addr = data_addr
        self.node_id = node_id
        self.sock = socket.create_connection((host, port),
                                             timeout=timeout_left_s(deadline, node_id))
        self._next_request_id = 0
        self._reply_header = bytearray(data_frames.REPLY.size)
        try:
            data_frames.configure_socket(self.sock)
            if tls is not None:
                self.sock = wrap_client(self.sock, tls[0], host, tls[1], f"tcp {data_addr}")
            self.sock.sendall(data_frames.encode_hello(token))
            status, message, _ = self.read_reply()
        except ssl.SSLError as exc:
            # NOTE: under TLS 1.3 a refused client certificate shows here, after the
            # client's side of the handshake, as the server's alert
            self.sock.close()
            raise handshake_error(exc, f"tcp {data_addr}") from exc
        except BaseException:
            self.sock.close()
            raise
        if status == Status.AUTH_FAILED:
            self.sock.close()
            raise AuthenticationError(f"tcp {data_addr}: data plane refused the connection: "
                                      f"{message}")
        if status != Status.OK:
            self.sock.close()
            raise TransferError(f"tcp {data_addr}: handshake refused: {status.name} {message}")
        self.node_id = message

    def send_request(self, op: Op, segment_id: bytes, offset: int, length: int,
                     payload: memoryview | None = None, capability: bytes = b"") -> None:
        """Send one request (with its capability when given one: a WRITE's or a READ's; and
        a WRITE's payload) in as few syscalls as possible."""
        self._next_request_id += 1
        header = data_frames.encode_request(op, segment_id, self._next_request_id, offset,
                                            length, capability)
        if payload is None or len(payload) == 0:
            self.sock.sendall(header)
        else:
            data_frames.sendmsg_all(self.sock, [header, payload])

    def send_write_commit(self, segment_id: bytes, offset: int, payload: memoryview,
                          capability: bytes, key: bytes, checksum: int) -> None:
        """Send one WRITE_COMMIT (``data_frames.encode_write_commit``) and its payload."""
        self._next_request_id += 1
        head = data_frames.encode_write_commit(segment_id, self._next_request_id, offset,
                                               len(payload), capability, key, checksum)
        data_frames.sendmsg_all(self.sock, [head, payload] if len(payload) else [head])

    def send_write_reserved(self, segment_id: bytes, offset: int, payload: memoryview,
                            capability: bytes, key: bytes, checksum: int,
                            reservation_id: int, client_id: bytes) -> None:
        """Send one WRITE_RESERVED (``data_frames.encode_write_reserved``) and its payload."""
        self._next_request_id += 1
        head = data_frames.encode_write_reserved(segment_id, self._next_request_id, offset,
                                                 len(payload), capability, key, checksum,
                                                 reservation_id, client_id)
        data_frames.sendmsg_all(self.sock, [head, payload] if len(payload) else [head])

    def read_reply(self) -> tuple[Status, str, int]:
        """Read one reply header and message: (status, message, payload length)."""
        header = data_frames.recv_exact(self.sock, data_frames.REPLY.size)
        status_code, _, msg_len, _, length = data_frames.REPLY.unpack(header)
        message = data_frames.recv_exact(self.sock, msg_len).decode(errors="replace") if msg_len else ""
        try:
            status = Status(status_code)
        except ValueError:
            raise TransferError(f"tcp {self.data_addr}: reply with unknown status "
                                f"{status_code}") from None
        return status, message, length

    def read_only_reply(self, payload: memoryview) -> tuple[Status, str, int]:
        """Read the reply to the one request outstanding on this connection: (status,
        message, payload length), with a READ's payload of exactly ``len(payload)`` bytes
        received into ``payload`` (pass an empty writable view for a WRITE).

        NOTE: header and payload arrive in one ``recvmsg_into`` (one system call where
        ``read_reply`` plus ``recv_exact_into`` take two or more). That may read past the
        header, so it is only safe when nothing can follow this reply: one request
        outstanding. An error reply's message lands in ``payload`` first (its contents are
        unspecified after a failed read) and is copied out from there. TLS sockets (no
        ``recvmsg_into``) take the two-step path.
        """
        if isinstance(self.sock, ssl.SSLSocket):
            status, message, length = self.read_reply()
            if status == Status.OK and length == len(payload) and length:
                data_frames.recv_exact_into(self.sock, payload)
            return status, message, length
        header = memoryview(self._reply_header)
        header_size = len(header)
        received = 0
        while received < header_size:
            num_bytes = self.sock.recvmsg_into([header[received:], payload])[0]
            if num_bytes == 0:
                raise data_frames.PeerClosedError(f"peer closed after {received} bytes "
                                                  "of a reply header")
            received += num_bytes
        status_code, _, msg_len, _, length = data_frames.REPLY.unpack(header)
        in_payload = received - header_size
        if not status_code and not msg_len and length == len(payload):
            # NOTE: the usual reply, checked on ints: building a Status costs ~0.5 us
            if in_payload < length:
                data_frames.recv_exact_into(self.sock, payload[in_payload:])
            return Status.OK, "", length
        try:
            status = Status(status_code)
        except ValueError:
            raise TransferError(f"tcp {self.data_addr}: reply with unknown status "
                                f"{status_code}") from None
        # not the payload asked for: what came past the header is the message
        early = bytes(payload[:min(in_payload, msg_len)])
        rest = data_frames.recv_exact(self.sock, msg_len - len(early)) \
            if msg_len > len(early) else b""
        return status, (early + rest).decode(errors="replace"), length

    def set_deadline(self, deadline: Deadline) -> None:
        self.sock.settimeout(timeout_left_s(deadline, self.node_id))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ConnectionPool:
    """Idle connections per data address, up to ``max_idle_per_node`` each. Thread-safe.
    With ``tls`` every new connection is a TLS connection (one context for all)."""

    def __init__(self, *, token: str | None, max_idle_per_node: int,
                 tls: TLSConfig | None = None):
        self.token = token
        self._tls = (tls.client_context(), tls) if tls is not None else None
        self.max_idle_per_node = max_idle_per_node
        self._lock = threading.Lock()
        self._addr_to_idle: dict[str, collections.deque[Connection]] = {}
        self._closed = False

    def acquire(self, data_addr: str, node_id: str, deadline: Deadline) -> tuple[Connection, bool]:
        """An idle or new connection to ``data_addr``, checked to lead to ``node_id``.

        Returns (connection, reused). Raises TransferError, ClosedError after
        ``close``, AuthenticationError on a refused token.
        """
        with self._lock:
            if self._closed:
                raise ClosedError(f"tcp {node_id}: transport is closed")
            idle = self._addr_to_idle.get(data_addr)
            if idle and (not node_id or idle[-1].node_id == node_id):
                return idle.pop(), True
            stale = self._addr_to_idle.pop(data_addr, None) if idle else None
        for conn in stale or ():
            conn.close()  # they lead to another node than the one now at this address
        try:
            conn = Connection(data_addr, token=self.token, deadline=deadline, node_id=node_id,
                              tls=self._tls)
        except OSError as exc:
            raise map_os_error(exc, node_id, f"connect {data_addr}") from exc
        if node_id and conn.node_id != node_id:
            conn.close()
            self.discard_idle(data_addr)
            raise TransferError(f"tcp {node_id}: {data_addr} is served by node "
                                f"{conn.node_id!r} now (did the daemon restart?)")
        return conn, False

    def release(self, conn: Connection) -> None:
        """Return a healthy connection for reuse (closed instead if the pool is full)."""
        with self._lock:
            if not self._closed:
                idle = self._addr_to_idle.get(conn.data_addr)
                if idle is None:
                    idle = self._addr_to_idle[conn.data_addr] = collections.deque()
                if len(idle) < self.max_idle_per_node:
                    idle.append(conn)
                    return
        conn.close()

    def discard_idle(self, data_addr: str) -> None:
        with self._lock:
            idle = self._addr_to_idle.pop(data_addr, None)
        for conn in idle or ():
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            addrs = list(self._addr_to_idle)
        for data_addr in addrs:
            self.discard_idle(data_addr)
