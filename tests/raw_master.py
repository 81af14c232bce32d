"""Raw protobuf calls to a real master, for the tests that check the wire itself (whole-request
validation, reply shapes, both carriers answering alike).

``RawMaster`` sends a request message by method name through kvstore.rpc's own carriers and
call policy (``MasterClient.call``), so these tests exercise the same code clients run; only
the typed verbs above it are skipped.
"""

from __future__ import annotations

from typing import Any

from kvstore._deadline import Deadline
from kvstore.rpc import GrpcCarrier, MasterClient
from kvstore.rpc.fast_carrier import FastCarrier
from kvstore.rpc.methods import METHODS


class RawMaster:
    """``call(name, request)`` -> reply message, over gRPC or the fast path."""

    def __init__(self, client: MasterClient):
        self.client = client
        self.address = client.address

    @classmethod
    def over_grpc(cls, address: str, *, token: str | None = None,
                  timeout_s: float = 10.0) -> "RawMaster":
        return cls(MasterClient(GrpcCarrier(address, token=token), rpc_timeout_s=timeout_s))

    @classmethod
    def over_fast(cls, host: str, port: int, *, token: str | None = None,
                  timeout_s: float = 10.0, reply_spin_s: float = 0.0) -> "RawMaster":
        carrier = FastCarrier(host, port, token=token, reply_spin_s=reply_spin_s)
        return cls(MasterClient(carrier, rpc_timeout_s=timeout_s))

    def start(self, name: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """Send now; ``result()`` of the returned call gives the reply (MasterClient.start)."""
        deadline = Deadline.after(timeout_s) if timeout_s is not None else None
        return self.client.start(METHODS[name], request, deadline)

    def call(self, name: str, request: Any, *, timeout_s: float | None = None) -> Any:
        return self.start(name, request, timeout_s=timeout_s).result()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "RawMaster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
