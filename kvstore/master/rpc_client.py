"""A thin client of the master's gRPC API, shared by the daemon and the KVStore client.

It adds what every call needs and nothing else: the auth token as metadata, a deadline, and
the mapping of gRPC status codes into kvstore's error tree (done once, here). Requests and
replies are the generated protobuf messages of ``kvstore.v1.master_pb2``.
"""

from __future__ import annotations

from typing import Any

import grpc

from kvstore import _errors as errors
from kvstore.v1 import master_pb2_grpc

# Larger than the default 4 MiB: a batch of max-size keys, or an inventory, can exceed it.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),
    # NOTE: gRPC's default reconnect backoff grows to 120 s; a daemon must notice a restarted
    # master within seconds to re-register its inventory, so cap it.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

_CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.KVStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.KeyNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.CapacityError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: errors.MasterUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.MasterUnavailableError,
}


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty when there is none)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def map_status(code: grpc.StatusCode, details: str, method: str) -> errors.KVStoreError:
    """The kvstore error for a failed master call (gRPC or fast path: one table)."""
    error_class = _CODE_TO_ERROR.get(code, errors.KVStoreError)
    return error_class(f"master {method}: {code.name}: {details}")


def map_rpc_error(exc: grpc.RpcError, method: str) -> errors.KVStoreError:
    """Translate a gRPC failure into the kvstore error a caller should see."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return map_status(code, details, method)


class MasterClient:
    """Blocking client of one master. Thread-safe (a gRPC channel is).

    ``call`` raises the kvstore error mapped from the gRPC status; it never returns a partial
    reply. Close it with ``close()`` or use it as a context manager.
    """

    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 10.0):
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = auth_metadata(token)
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = master_pb2_grpc.MasterStub(self._channel)

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """Invoke RPC ``method`` (e.g. ``"PutStart"``) with ``request``; return its reply."""
        rpc = getattr(self._stub, method)
        try:
            return rpc(request, metadata=self._metadata,
                       timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, method) from exc

    def start(self, method: str, request: Any, *,
              timeout_s: float | None = None) -> "_PendingRpc":
        """Send ``request`` now; ``result()`` of the returned object waits for the reply,
        with the same reply and errors as ``call`` (the FastMasterClient contract)."""
        future = getattr(self._stub, method).future(
            request, metadata=self._metadata,
            timeout=self.timeout_s if timeout_s is None else timeout_s)
        return _PendingRpc(future, method)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MasterClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _PendingRpc:
    """A gRPC call in flight (``MasterClient.start``)."""

    __slots__ = ("_future", "_method")

    def __init__(self, future: Any, method: str):
        self._future, self._method = future, method

    def result(self) -> Any:
        try:
            return self._future.result()
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self._method) from exc


class AsyncMasterClient:
    """asyncio client of one master (grpc.aio); same contract as MasterClient.

    Create and use it inside one running event loop.
    """

    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 10.0):
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = auth_metadata(token)
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = master_pb2_grpc.MasterStub(self._channel)

    async def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        rpc = getattr(self._stub, method)
        try:
            return await rpc(request, metadata=self._metadata,
                             timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, method) from exc

    async def close(self) -> None:
        await self._channel.close()
