"""``GrpcCarrier``: master calls over the public gRPC API (``service Master``).

The token travels as call metadata ``authorization: Bearer <token>``; failures come back as
gRPC statuses, mapped by ``kvstore.rpc.errors.status_error`` (UNAVAILABLE as
ConnectionLostError). The channel reconnects by itself, with its backoff capped (see
CHANNEL_OPTIONS).
"""

from __future__ import annotations

from typing import Any

import grpc

from kvstore._errors import ClosedError
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


def _rpc_error(exc: grpc.RpcError, method: str):
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return status_error(code, details, method)


class GrpcCarrier(Carrier):
    """Calls the master at ``address`` ("host:port") over one gRPC channel."""

    name = "grpc"

    def __init__(self, address: str, *, token: str | None = None):
        self.address = address
        self._metadata = auth_metadata(token)
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = master_pb2_grpc.MasterStub(self._channel)
        self._closed = False

    def start(self, method: Method, request: Any, timeout_s: float) -> "_PendingRpc":
        if self._closed:
            raise ClosedError("this master client is closed")
        future = getattr(self._stub, method.name).future(
            request, metadata=self._metadata, timeout=timeout_s)
        return _PendingRpc(future, method.name)

    def close(self) -> None:
        self._closed = True
        self._channel.close()


class _PendingRpc:
    __slots__ = ("_future", "_method")

    def __init__(self, future: Any, method: str):
        self._future, self._method = future, method

    def result(self) -> Any:
        try:
            return self._future.result()
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self._method) from exc
