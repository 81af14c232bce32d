"""The seam below the metadata client: a ``Carrier`` takes one request message of one
``Method`` to the master and brings its reply back. Two implementations: ``GrpcCarrier``
(the public gRPC API) and ``FastCarrier`` (the same messages over the master's framed-TCP
fast path). Neither retries or knows about deadlines longer than one call: that is the call
policy's job (``kvstore.rpc.client``), the same for both.

Contract of ``start(method, request, timeout_s)``: the request is sent (or its sending
failed) when it returns; the returned ``PendingReply``'s ``result()`` waits at most
``timeout_s`` for the reply and returns the reply message, or raises the kvstore error of
``kvstore.rpc.errors.status_error`` (``ConnectionLostError`` when the connection failed
before a reply). ``result()`` must be called exactly once. Carriers are thread-safe.
"""

from __future__ import annotations

import abc
from typing import Any, Protocol

from kvstore.rpc.methods import Method


class PendingReply(Protocol):
    def result(self) -> Any:
        """The reply message, or raise the mapped error (see the module docstring)."""


class Carrier(abc.ABC):
    """Takes requests to one master. ``name`` is "grpc" or "fast"."""

    name: str = "abstract"
    address: str = ""

    @abc.abstractmethod
    def start(self, method: Method, request: Any, timeout_s: float) -> PendingReply:
        """Send ``request`` now; see the module docstring."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent; calls after it raise ClosedError."""
