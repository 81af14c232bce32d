"""Transports move byte ranges between caller buffers and daemons' segments.

``make_transports`` builds the list a client tries in order; ``local_host_id`` says which
machine this is (a transport that maps shared memory needs the same one). The modules behind
each transport are imported on first use, so importing this package stays cheap (NIXL is
imported only when a node publishes a NIXL agent, or when "nixl" is asked for).
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Mapping

from kvstore._errors import InvalidArgumentError
from kvstore.transport.base import Target, Transport
from kvstore.transport.hostid import local_host_id

#: kinds accepted by make_transports, in the order "auto" tries them
TRANSPORT_KINDS = ("auto", "shm", "nixl", "tcp")


def make_transports(kind: str = "auto", *, token: str | None = None,
                    nodes: Callable[[], Mapping[str, bytes]] | None = None,
                    tls=None, shm_copy_threads: int = 1) -> list[Transport]:
    """The transports a client should try for ``kind``, best first.

    "auto": [shm, nixl, tcp] (shm serves same-host DRAM replicas, nixl the DRAM of nodes that
    publish a NIXL agent, tcp everything else; nixl only where NIXL is installed and
    ``nodes`` is given); "shm": only shared memory (same-host DRAM replicas only); "nixl": only
    NIXL (raises ConfigError now if NIXL cannot be imported); "tcp": only the data-plane
    server. ``token`` authenticates to the daemons' data planes, over TLS when ``tls`` (a
    ``kvstore.TLSConfig``) is given (shm is unaffected: see docs/ARCHITECTURE.md, TLS);
    ``nodes`` returns
    ``{node_id: nixl_metadata}`` of the registered nodes (the client's ListNodes);
    ``shm_copy_threads`` (1 or 2) the threads shm's large copies use (``ShmTransport``). Raises
    InvalidArgumentError for any other kind, listing the accepted ones. The caller owns the
    transports and closes them.
    """
    if kind not in TRANSPORT_KINDS:
        raise InvalidArgumentError(
            f"unknown transport {kind!r}; expected one of: {', '.join(TRANSPORT_KINDS)}")
    from kvstore.transport.shm import ShmTransport
    from kvstore.transport.tcp import TcpTransport

    if kind == "shm":
        return [ShmTransport(copy_threads=shm_copy_threads)]
    if kind == "tcp":
        return [TcpTransport(token=token, tls=tls)]
    if kind == "nixl":
        from kvstore.transport.nixl import NixlTransport
        from kvstore.transport.nixl_lib import load_nixl
        load_nixl()
        return [NixlTransport(nodes=nodes, token=token, tls=tls)]
    if nodes is not None and nixl_installed():
        from kvstore.transport.nixl import NixlTransport
        return [ShmTransport(copy_threads=shm_copy_threads), NixlTransport(nodes=nodes, token=token, tls=tls),
                TcpTransport(token=token, tls=tls)]
    return [ShmTransport(copy_threads=shm_copy_threads), TcpTransport(token=token, tls=tls)]


def nixl_installed() -> bool:
    """True if a NIXL flavour module is installed (cheap: finds it, imports nothing)."""
    return any(importlib.util.find_spec(name) is not None for name in ("nixl_cu13", "nixl_cu12"))


__all__ = ["TRANSPORT_KINDS", "Target", "Transport", "local_host_id", "make_transports",
           "nixl_installed"]
