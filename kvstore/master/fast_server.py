"""The master's fast metadata server: every Master RPC over framed TCP
(``kvstore.rpc.fast_frames``, the format its clients speak).

Same handlers, same lock, same validation and same metrics (labelled ``transport="fast"``)
as the gRPC path: each request runs through ``invoker.make_invoker``, so the two paths can
only differ in framing. gRPC stays the public, complete API; this is an optimization.

Threading and resource handling: ``kvstore._tcpserver.ThreadedTcpServer`` (one thread per
connection with blocking sockets, TCP_NODELAY here; measured fastest for small
request/reply). Calls are serialized by the service lock anyway.

TLS (``tls``): see ``kvstore._tcpserver``; a plain-text client gets UNAUTHENTICATED
("this master requires TLS") and a close.

Error handling: a connection that fails the handshake (bad magic or version, wrong token)
gets an error frame and is closed; an oversized body gets RESOURCE_EXHAUSTED and a close; a
truncated frame ends the connection; an unknown method id (UNIMPLEMENTED) or a body that is
not the method's request message (INVALID_ARGUMENT) gets an error frame and the connection
stays usable. Nothing a peer sends stops the server or affects another connection.
"""

from __future__ import annotations

import logging
import socket

import grpc
from google.protobuf.message import DecodeError

from kvstore._tcpserver import ThreadedTcpServer
from kvstore._tls import TLSConfig
from kvstore._wire import BadHello, PeerClosedError, read_hello
from kvstore.master.auth import Authenticator
from kvstore.master.invoker import make_invoker
from kvstore.master.service import MasterService
from kvstore.master.validation import Rejected
from kvstore.master.wire import WIRE_METHODS, parse_request
from kvstore.rpc import fast_frames as ff
from kvstore.rpc.methods import METHODS

log = logging.getLogger("kvstore.master.fast_server")

_READ_BUFFER_BYTES = 256 * 1024


class _CloseAfter(Exception):
    """Send ``frame`` and end the connection (the peer's framing can no longer be trusted)."""

    def __init__(self, frame: bytes, reason: str):
        super().__init__(reason)
        self.frame = frame


class FastRpcServer(ThreadedTcpServer):
    """Serves ``service`` on exactly ``host``:``port`` (0 = pick a free port)."""

    def __init__(self, service: MasterService, clock, metrics, *, host: str, port: int = 0,
                 authenticator: Authenticator | None = None, tls: TLSConfig | None = None,
                 max_connections: int = 1024, handshake_timeout_s: float = 10.0):
        super().__init__(host=host, port=port, max_connections=max_connections,
                         name="kvstore-master-fast", log=log,
                         ssl_context=tls.server_context() if tls is not None else None,
                         handshake_timeout_s=handshake_timeout_s)
        self._authenticator = authenticator or Authenticator(None)
        self._master_id = service.state.master_id
        self._handshake_timeout_s = handshake_timeout_s
        # method id -> (request class, invoke, invoke of a wire.KeyBatch or None); built once
        # so a request costs two lookups
        self._id_to_call = {
            method.method_id: (method.request_class,
                               make_invoker(service, name, clock, metrics, "fast"),
                               self._wire_invoker(service, name, clock, metrics))
            for name, method in METHODS.items()}
        self.port = 0

    @staticmethod
    def _wire_invoker(service: MasterService, name: str, clock, metrics):
        """The invoker of a request that ``wire.parse_request`` decoded (None: every request
        of ``name`` is parsed by protobuf); its handler may answer in wire form."""
        if name not in WIRE_METHODS:
            return None
        handler = service.exists_wire if name == "Exists" else service.get_replicas_wire
        return make_invoker(service, name, clock, metrics, "fast", handler=handler)

    def start(self) -> int:
        """Bind, listen and start accepting; return the bound port. Raises OSError."""
        self.port = self.bind_and_listen()[1]
        return self.port

    def plaintext_refusal(self) -> bytes:
        return ff.encode_error(grpc.StatusCode.UNAUTHENTICATED, 0,
                               "this master requires TLS: connect with tls=TLSConfig(...) "
                               "(--tls-ca/--tls-cert/--tls-key)")

    def handle_connection(self, conn: socket.socket, peer: tuple) -> None:
        reader = None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._handshake_timeout_s)
            reader = conn.makefile("rb", buffering=_READ_BUFFER_BYTES)
            caller = self._handshake(conn, reader)
            conn.settimeout(None)
            while self._serve_one(conn, reader, caller):
                pass
        except _CloseAfter as exc:
            log.warning("fast path: closing %s: %s", peer, exc)
            try:
                conn.settimeout(1.0)
                conn.sendall(exc.frame)
            except OSError:
                pass
        except OSError as exc:  # a peer that vanished (or a stop()) is routine
            log.debug("fast path: connection from %s ended: %s", peer, exc)
        finally:
            if reader is not None:  # it holds the descriptor open until closed too
                reader.close()

    def _handshake(self, conn: socket.socket, reader):
        """Read the hello; return the principal of its token (every request of this
        connection is that principal's)."""
        def read_exact(num_bytes: int) -> bytes:
            data = reader.read(num_bytes)
            if len(data) < num_bytes:
                raise PeerClosedError("closed during the handshake")
            return data

        try:
            token = read_hello(read_exact, ff.HELLO_MAGIC, ff.PROTOCOL_VERSION)
        except BadHello as exc:
            raise _CloseAfter(ff.encode_error(grpc.StatusCode.INVALID_ARGUMENT, 0, str(exc)),
                              "bad hello") from exc
        caller = self._authenticator.principal(token)
        if caller is None:
            raise _CloseAfter(ff.encode_error(grpc.StatusCode.UNAUTHENTICATED, 0,
                                              "missing or wrong token"), "wrong token")
        conn.sendall(ff.encode_reply(grpc.StatusCode.OK, 0, self._master_id.encode()))
        return caller

    def _serve_one(self, conn: socket.socket, reader, caller) -> bool:
        """Serve one request; False on a clean close between requests."""
        header = reader.read(ff.REQUEST.size)
        if not header:
            return False
        if len(header) < ff.REQUEST.size:
            raise ConnectionError("closed inside a request header")
        body_len, method_id, request_id = ff.REQUEST.unpack(header)
        if body_len > ff.MAX_FRAME_BYTES:
            raise _CloseAfter(ff.encode_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED, request_id,
                f"request of {body_len} bytes exceeds the maximum of {ff.MAX_FRAME_BYTES}"),
                f"oversized request ({body_len} bytes)")
        body = reader.read(body_len)
        if len(body) < body_len:
            raise ConnectionError("closed inside a request body")
        call = self._id_to_call.get(method_id)
        if call is None:
            conn.sendall(ff.encode_error(grpc.StatusCode.UNIMPLEMENTED, request_id,
                                         f"unknown method id {method_id}"))
            return True
        request_class, invoke, wire_invoke = call
        # NOTE: Exists and GetReplicas are decoded without protobuf (``wire``); a body it does
        # not take (None) is parsed by protobuf, which gives the same request or the error
        request = parse_request(body) if wire_invoke is not None else None
        if request is not None:
            invoke = wire_invoke
        else:
            try:
                request = request_class.FromString(body)
            except DecodeError as exc:
                conn.sendall(ff.encode_error(grpc.StatusCode.INVALID_ARGUMENT, request_id,
                                             f"request does not parse: {exc}"))
                return True
        try:
            frame = ff.encode_reply(grpc.StatusCode.OK, request_id,
                                    invoke(request, caller).SerializeToString())
        except Rejected as exc:
            frame = ff.encode_error(exc.code, request_id, exc.message)
        conn.sendall(frame)
        return True
