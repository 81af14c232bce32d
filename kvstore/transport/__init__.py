"""Transports move byte ranges between caller buffers and daemons' segments.

``make_transports`` builds the list a client tries in order; ``local_host_id`` says which
machine this is (a transport that maps shared memory needs the same one). The modules behind
each transport are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

from kvstore._errors import InvalidArgumentError
from kvstore.transport.base import Target, Transport
from kvstore.transport.hostid import local_host_id

#: kinds accepted by make_transports, in the order "auto" tries them
TRANSPORT_KINDS = ("auto", "shm", "tcp")


def make_transports(kind: str = "auto", *, token: str | None = None) -> list[Transport]:
    """The transports a client should try for ``kind``, best first.

    "auto": [shm, tcp] (shm serves same-host DRAM replicas, tcp everything else); "shm": only
    shared memory (same-host DRAM replicas only); "tcp": only the data-plane server. ``token``
    authenticates to the daemons' data planes. Raises InvalidArgumentError for any other kind,
    listing the accepted ones. The caller owns the transports and closes them.
    """
    if kind not in TRANSPORT_KINDS:
        raise InvalidArgumentError(
            f"unknown transport {kind!r}; expected one of: {', '.join(TRANSPORT_KINDS)}")
    from kvstore.transport.shm import ShmTransport
    from kvstore.transport.tcp import TcpTransport

    if kind == "shm":
        return [ShmTransport()]
    if kind == "tcp":
        return [TcpTransport(token=token)]
    return [ShmTransport(), TcpTransport(token=token)]


__all__ = ["TRANSPORT_KINDS", "Target", "Transport", "local_host_id", "make_transports"]
