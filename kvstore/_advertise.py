"""The host a master or daemon publishes for others to reach it (``--advertise-host``).

A server binds ``--host``; what it publishes (the master: its addresses in etcd; a daemon:
its data-plane address to the master, which hands it to every client) must be one that
other hosts can connect to. A wildcard bind (0.0.0.0, ::) is not: it names no host.

Rule (``advertised_host``): ``--advertise-host`` when given; else the bind host unless it
is a wildcard; else the address the machine's hostname resolves to (``socket.gethostname``
through ``getaddrinfo``, IPv4 first for 0.0.0.0), and the caller logs which one it chose.
A hostname that does not resolve raises ConfigError naming it; one that resolves to a
loopback address (Debian's /etc/hosts maps it to 127.0.1.1) is used but ``loopback_warning``
says that other hosts cannot reach it.
"""

from __future__ import annotations

import ipaddress
import socket

from kvstore._errors import ConfigError

WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def check_advertise_host(host: str | None) -> None:
    """ConfigError for an advertise host that no other host could use."""
    if host is None:
        return
    if host in WILDCARDS or any(c in host for c in " /,[]") or (
            ":" in host and not _is_ipv6(host)):
        raise ConfigError(f"--advertise-host must be a reachable host name or address "
                          "(no wildcard, no port, no brackets; an IPv6 address as is), "
                          f"got {host!r}")


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def advertised_host(bind_host: str, advertise_host: str | None, *,
                    hostname=socket.gethostname) -> tuple[str, str]:
    """(host to publish, how it was chosen: for the log)."""
    if advertise_host:
        return advertise_host, "--advertise-host"
    if bind_host not in WILDCARDS:
        return bind_host, "the bind host"
    name = hostname()
    family = socket.AF_INET if bind_host == "0.0.0.0" else socket.AF_UNSPEC
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"bound to {bind_host}, so the address to publish is that of this "
                          f"machine's hostname {name!r}, which does not resolve ({exc}); "
                          "pass --advertise-host") from exc
    # NOTE: IPv4 first: a '::' bind on a dual-stack host accepts both, and v4 is what
    # most peers can reach
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0], f"hostname {name!r} resolved (bound to the wildcard {bind_host})"


def loopback_warning(host: str) -> str | None:
    """A warning when ``host`` is a loopback address (other hosts cannot reach it)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return None
    return (f"publishing the loopback address {host}: only this machine can reach it; "
            "pass --advertise-host with an address other hosts can use")
