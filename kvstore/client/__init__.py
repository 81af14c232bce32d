"""The client engines import: ``KVStore``, built by ``connect`` (a running cluster) or
``local`` (master and daemon inside this process).

Modules: ``store`` (the public class), ``writer``/``reader`` (the put and get flows of one
batch, over the typed metadata API of ``kvstore.rpc``), ``transfer`` (replica routing over
transports, fallback, verification, stats), ``values`` (zero-copy views of values and
outputs), ``key_checks`` (key validation), ``checksum``, ``config``, ``embedded``
(``local``).
"""

from __future__ import annotations

from typing import Any

from kvstore._errors import InvalidArgumentError
from kvstore.client.config import make_config
from kvstore.client.embedded import local
from kvstore.client.store import KVStore

__all__ = ["KVStore", "connect", "local"]


def connect(address: str, token: str | None = None, transport: str = "auto",
            **options: Any) -> KVStore:
    """A KVStore client of the cluster whose master listens on ``address`` ("host:port"),
    or of the leader of an etcd cluster (``"etcd://HOST:PORT/CLUSTER"``: followed across
    failovers, docs/OPERATIONS.md, Master HA; ``"host:port,host:port"`` without etcd).

    ``token`` falls back to the KVSTORE_TOKEN environment variable. ``transport``: "auto"
    (shm for replicas on this host, tcp otherwise), "shm" (same-host replicas only) or "tcp".
    ``options`` are ClientConfig fields (timeout_s, lease_ttl_s, verify, rpc_timeout_s,
    metadata, tls). ``tls``: a ``kvstore.TLSConfig``; every connection to the master and to
    daemons' data planes is then TLS (shm is not a network path: docs/ARCHITECTURE.md, TLS). ``metadata``: how master calls travel: "auto" (default; the master's framed
    fast path when its Stats advertises one, gRPC otherwise), "grpc", or "fast" (raises
    MasterUnavailableError if the master offers no fast path). Both carry the same messages
    and give the same results and errors.

    Checks the master answers before returning. Raises InvalidArgumentError (bad argument or
    unknown option), AuthenticationError (token or TLS handshake refused),
    MasterUnavailableError.
    """
    if not isinstance(address, str) or not address:
        raise InvalidArgumentError(f"address must be a non-empty 'host:port' str, got {address!r}")
    store = KVStore(address, make_config(token, transport, options))
    try:
        store._connect_master()
    except BaseException:
        store.close()
        raise
    return store

