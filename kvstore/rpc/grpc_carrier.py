"""``GrpcCarrier``: master calls over the public gRPC API (``service Master``).

The token travels as call metadata ``authorization: Bearer <token>``; failures come back as
gRPC statuses, mapped by ``kvstore.rpc.errors.status_error`` (UNAVAILABLE as
ConnectionLostError). With ``tls`` the channel is a TLS channel (``TLSConfig``); a handshake
that fails (gRPC reports it as UNAVAILABLE, naming the handshake) is AuthenticationError. The channel reconnects by itself, with its backoff capped (see
CHANNEL_OPTIONS).
"""

from __future__ import annotations

from typing import Any

import grpc

from kvstore._errors import AuthenticationError, ClosedError
from kvstore._tls import TLSConfig, probe_refusal, speaks_tls
from kvstore.rpc.carrier import Carrier
from kvstore.rpc.errors import status_error
from kvstore.rpc.fast_frames import MAX_FRAME_BYTES
from kvstore.rpc.methods import Method
from kvstore.v1 import master_pb2_grpc

CHANNEL_OPTIONS = [
    # Larger than the default 4 MiB: a batch of max-size keys, or an inventory, can exceed it.
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.enable_http_proxy", 0),
    # NOTE: gRPC's default reconnect backoff grows to 120 s; a daemon must notice a restarted
    # master within seconds to re-register its inventory, so cap it.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty when there is none)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


#: What gRPC's UNAVAILABLE details say when the TLS handshake, not the network, failed.
_HANDSHAKE_MARKS = ("handshake", "ssl", "tls", "certificate")


def _rpc_error(exc: grpc.RpcError, method: str, address: str, tls: TLSConfig | None):
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    refused = False
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if (tls is None and code == grpc.StatusCode.UNAVAILABLE
            and "socket closed" in (details or "").lower() and port.isdigit()
            and speaks_tls(host, int(port))):
        error = AuthenticationError(f"master {method}: {address} serves TLS and this client "
                                    "does not: connect with tls=TLSConfig(...) (--tls-ca, "
                                    "--tls-cert, --tls-key)")
        error.code = code
        return error
    if tls is not None and code == grpc.StatusCode.UNAVAILABLE:
        refused = any(mark in (details or "").lower() for mark in _HANDSHAKE_MARKS)
        if not refused:   # "Socket closed": a refusal after the handshake, or a dead master
            refusal = probe_refusal(host, int(port), tls) if port.isdigit() else None
            if refusal is not None:
                refused = True
                details = f"{details}; the server's answer to a TLS handshake: {refusal}"
    if refused:
        # NOTE: retrying cannot help a refused certificate: say so, as AuthenticationError
        error = AuthenticationError(
            f"master {method}: TLS handshake with {address} failed: {details} (a wrong CA, "
            "a missing or refused client certificate, or a master without TLS?)")
        error.code = code
        return error
    return status_error(code, details, method)


class GrpcCarrier(Carrier):
    """Calls the master at ``address`` ("host:port") over one gRPC channel."""

    name = "grpc"

    def __init__(self, address: str, *, token: str | None = None, tls: TLSConfig | None = None):
        self.address = address
        self._metadata = auth_metadata(token)
        self._tls = tls
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, tls.grpc_channel_credentials(),
                                                options=CHANNEL_OPTIONS
                                                + tls.grpc_channel_options())
        self._stub = master_pb2_grpc.MasterStub(self._channel)
        self._closed = False

    def start(self, method: Method, request: Any, timeout_s: float) -> "_PendingRpc":
        if self._closed:
            raise ClosedError("this master client is closed")
        future = getattr(self._stub, method.name).future(
            request, metadata=self._metadata, timeout=timeout_s)
        return _PendingRpc(future, method.name, self)

    def close(self) -> None:
        self._closed = True
        self._channel.close()


class _PendingRpc:
    __slots__ = ("_future", "_method", "_carrier")

    def __init__(self, future: Any, method: str, carrier: GrpcCarrier):
        self._future, self._method, self._carrier = future, method, carrier

    def result(self) -> Any:
        try:
            return self._future.result()
        except grpc.RpcError as exc:
            carrier = self._carrier
            raise _rpc_error(exc, self._method, carrier.address, carrier._tls) from exc
