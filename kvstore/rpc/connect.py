"""``connect_master``: a MasterClient on the best path the master offers.

Discovery: one Stats over gRPC (the public API every master serves) checks that the master
answers and accepts the token, and says whether it serves the framed fast path
(``fast_port``) and how many keys one request may carry (``max_batch``). With ``metadata``
"auto" (the default) or "fast" the client then moves to the fast path on the master's host
and checks it with a second Stats; the gRPC channel is closed, so a client keeps one
carrier open, not two. "grpc" stays on gRPC.
"""

from __future__ import annotations

from kvstore._deadline import Deadline
from kvstore._errors import InvalidArgumentError, MasterUnavailableError
from kvstore._tls import TLSConfig
from kvstore.rpc.client import MasterClient
from kvstore.rpc.fast_carrier import FastCarrier
from kvstore.rpc.grpc_carrier import GrpcCarrier
from kvstore.rpc.results import MasterStats

#: ``metadata=`` values: how master calls travel.
METADATA_PATHS = ("auto", "grpc", "fast")


def connect_master(address: str, *, token: str | None = None, rpc_timeout_s: float = 10.0,
                   metadata: str = "auto", reply_spin_s: float = 0.0,
                   deadline: Deadline | None = None,
                   tls: TLSConfig | None = None) -> tuple[MasterClient, MasterStats]:
    """A MasterClient of the master at ``address`` ("host:port") and its Stats; with
    ``tls``, both paths are TLS connections.

    Raises InvalidArgumentError (unknown ``metadata``), AuthenticationError (token refused,
    TLS handshake refused),
    MasterUnavailableError (unreachable; or ``metadata="fast"`` and the master offers no
    fast path). Nothing is left open when it raises.
    """
    if metadata not in METADATA_PATHS:
        raise InvalidArgumentError(f"metadata must be one of {METADATA_PATHS}, got {metadata!r}")
    client = MasterClient(GrpcCarrier(address, token=token, tls=tls),
                          rpc_timeout_s=rpc_timeout_s)
    try:
        stats = client.stats(deadline=deadline)
        if metadata == "grpc" or (metadata == "auto" and not stats.fast_port):
            return client, stats
        if not stats.fast_port:
            raise MasterUnavailableError(
                f"metadata='fast' but the master at {address} offers no fast path "
                "(started with --no-fast-rpc?)")
    except BaseException:
        client.close()
        raise
    client.close()
    host = address.rsplit(":", 1)[0].strip("[]")
    fast = MasterClient(FastCarrier(host, stats.fast_port, token=token, tls=tls,
                                    reply_spin_s=reply_spin_s), rpc_timeout_s=rpc_timeout_s)
    try:
        stats = fast.stats(deadline=deadline)   # reachable, and our token is accepted there
    except BaseException:
        fast.close()
        raise
    return fast, stats


def grpc_client(address: str, *, token: str | None = None, rpc_timeout_s: float = 10.0,
                tls: TLSConfig | None = None) -> MasterClient:
    """A MasterClient over gRPC, without a discovery call: what daemons and tools use."""
    return MasterClient(GrpcCarrier(address, token=token, tls=tls),
                        rpc_timeout_s=rpc_timeout_s)
