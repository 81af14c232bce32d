"""The ``--tls-ca/--tls-cert/--tls-key`` flags, the same on every command that serves or calls
a master (``kvstore master``, ``daemon``, ``status``, ``bench``), mapped to one ``TLSConfig``.

A server turns TLS on with ``--tls-cert`` and ``--tls-key``; ``--tls-ca`` then requires client
certificates signed by that CA (mutual TLS). A client uses TLS when any of the three is
given: ``--tls-ca`` verifies the server (the system's trust store otherwise), ``--tls-cert``
and ``--tls-key`` are presented to a mutual-TLS server. A daemon is both: its data plane
serves with them and its link to the master calls with them (verifying the master with
``--tls-master-ca`` when given, a daemon-only flag).
"""

from __future__ import annotations

import click

from kvstore._errors import ConfigError
from kvstore._tls import TLSConfig

_HELP = {
    "server": ("PEM CA bundle: require client certificates it signed (mutual TLS); a "
               "daemon also verifies its master with it.",
               "PEM certificate chain: serve TLS (needs --tls-key).",
               "PEM private key of --tls-cert."),
    "client": ("PEM CA bundle that verifies the master's certificate (default: the "
               "system's); any --tls-* flag turns TLS on.",
               "PEM client certificate, for a mutual-TLS master (needs --tls-key).",
               "PEM private key of --tls-cert."),
}


def tls_options(role: str):
    """Decorator adding ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` (as ``tls_ca``,
    ``tls_cert``, ``tls_key``) with the help of ``role``: "server" or "client"."""
    ca_help, cert_help, key_help = _HELP[role]

    def decorate(command):
        for name, text in (("--tls-key", key_help), ("--tls-cert", cert_help),
                           ("--tls-ca", ca_help)):
            command = click.option(name, default=None, metavar="FILE", help=text)(command)
        return command

    return decorate


def tls_from_flags(tls_ca: str | None, tls_cert: str | None,
                   tls_key: str | None) -> TLSConfig | None:
    """The client's TLSConfig the flags name (None when none is given); click.BadParameter
    for an invalid combination or a missing file. (Servers map the flags 1:1 to their
    config's ``tls_*`` fields instead.)"""
    try:
        return TLSConfig.from_files(tls_ca, tls_cert, tls_key)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc
