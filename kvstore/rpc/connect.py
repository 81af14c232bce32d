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
from kvstore._errors import ConfigError, InvalidArgumentError, MasterUnavailableError
from kvstore._tls import TLSConfig
from kvstore.rpc.client import MasterClient
from kvstore.rpc.fast_carrier import FastCarrier
from kvstore.rpc.grpc_carrier import GrpcCarrier
from kvstore.rpc.results import MasterStats

#: How often a client of an etcd cluster reads the leader key (``kvstore.ha.carrier``).
CLIENT_WATCH_S = 0.5
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
    if "," in address or address.startswith("etcd://"):
        return _connect_cluster(address, token=token, rpc_timeout_s=rpc_timeout_s,
                                metadata=metadata, reply_spin_s=reply_spin_s, deadline=deadline,
                                tls=tls)
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
                watch_s: float | None = None, tls: TLSConfig | None = None) -> MasterClient:
    """A MasterClient over gRPC, without a discovery call: what daemons and tools use.
    ``address`` may name a cluster (``kvstore.ha.cluster.MasterSpec``): the client then
    follows its leader (``watch_s``: also poll the leader key that often)."""
    if "," in address or address.startswith("etcd://"):
        from kvstore.ha.carrier import FailoverCarrier
        from kvstore.ha.cluster import MasterSpec
        carrier = FailoverCarrier(MasterSpec.parse(address),
                                  lambda info: GrpcCarrier(info.grpc_address, token=token, tls=tls),
                                  watch_s=watch_s)
        return MasterClient(carrier, rpc_timeout_s=rpc_timeout_s)
    return MasterClient(GrpcCarrier(address, token=token, tls=tls), rpc_timeout_s=rpc_timeout_s)


def _connect_cluster(address: str, *, token, rpc_timeout_s, metadata, reply_spin_s,
                     deadline, tls) -> tuple[MasterClient, MasterStats]:
    """``connect_master`` for a cluster spec: a client that follows the leader, on the
    fast path the leader publishes (etcd) or offers (plain lists: one gRPC Stats each time
    it moves to another master), per ``metadata``."""
    from kvstore.ha.carrier import FailoverCarrier
    from kvstore.ha.cluster import MasterSpec

    def open_carrier(info):
        if metadata == "grpc":
            return GrpcCarrier(info.grpc_address, token=token, tls=tls)
        fast_address = info.fast_address
        if fast_address is None and not info.epoch:      # a plain address: ask it
            with MasterClient(GrpcCarrier(info.grpc_address, token=token, tls=tls),
                              rpc_timeout_s=rpc_timeout_s) as probe:
                fast_port = probe.stats(deadline=deadline).fast_port
            host = info.grpc_address.rsplit(":", 1)[0]
            fast_address = f"{host}:{fast_port}" if fast_port else None
        if fast_address is None:
            if metadata == "fast":
                raise MasterUnavailableError(f"metadata='fast' but master {info.grpc_address} "
                                             "offers no fast path")
            return GrpcCarrier(info.grpc_address, token=token, tls=tls)
        host, port = fast_address.rsplit(":", 1)
        return FastCarrier(host.strip("[]"), int(port), token=token, tls=tls,
                           reply_spin_s=reply_spin_s)

    try:
        spec = MasterSpec.parse(address)
    except ConfigError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    # NOTE: clients poll the leader key too (CLIENT_WATCH_S), so a call waiting on a paused
    # leader moves on when a new one is elected, not when its RPC timeout ends.
    client = MasterClient(FailoverCarrier(spec, open_carrier,
                                          watch_s=CLIENT_WATCH_S),
                          rpc_timeout_s=rpc_timeout_s)
    try:
        return client, client.stats(deadline=deadline)
    except BaseException:
        client.close()
        raise
