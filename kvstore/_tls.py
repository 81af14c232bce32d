"""``TLSConfig``: the certificates of one process, for every kvstore connection it makes or
serves: gRPC (the master's public API), the framed metadata fast path and the data plane.

One dataclass serves both sides:

- A server (``kvstore master``/``kvstore daemon`` ``--tls-cert/--tls-key``) presents ``cert``
  (a PEM chain) and ``key``; with ``ca`` (``--tls-ca``) it also requires every client to
  present a certificate signed by that CA (mutual TLS), and refuses any other at the
  handshake.
- A client (``kvstore.connect(..., tls=TLSConfig(...))``, a daemon towards its master,
  ``kvstore status``, ``kvstore bench``) verifies the server's certificate against ``ca``
  (the system's trust store when None) and its name (the host dialled, or ``server_name``);
  it presents ``cert``/``key`` when given (needed by a mutual-TLS server).

TLS 1.2 is the oldest version offered or accepted. The token, when there is one, is still
checked inside the TLS connection: TLS says who the peer is, the token what it may do.

Framed servers (``kvstore._tcpserver``) peek at a connection's first byte: a TLS handshake
starts with record type 22 (``TLS_HANDSHAKE_BYTE``); anything else is a plain-text client,
answered in plain text with its protocol's error frame ("this server requires TLS") and
closed, so a client without TLS gets a clear error rather than a reset.

Errors: ConfigError (construction) for a cert without its key or the reverse, or a file that
does not exist; ConfigError from the ``*_context``/``*_credentials`` methods for files that
are not valid PEM. ``handshake_error`` maps a failed handshake into AuthenticationError.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from kvstore._errors import AuthenticationError, ConfigError

#: First byte of every TLS connection (a handshake record, RFC 8446 section 5.1).
TLS_HANDSHAKE_BYTE = 0x16


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """PEM file paths of one side of a TLS connection (see the module docstring).

    ``ca``: CA bundle that verifies the peer (server: mutual TLS on; client: trust root,
    None for the system's). ``cert``/``key``: this side's certificate chain and private key
    (a server needs them; a client only for mutual TLS). ``server_name``: client only, the
    name the server's certificate must carry when it differs from the host dialled.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS needs both a certificate and its key (--tls-cert and "
                              "--tls-key), or neither")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"TLS {name} file {path!r} does not exist")
        if self.server_name is not None and not self.server_name:
            raise ConfigError("server_name must not be empty (omit it to use the host)")

    @classmethod
    def from_files(cls, ca: str | None, cert: str | None,
                   key: str | None) -> "TLSConfig | None":
        """The config of these files; None when none is given (plain text). Raises
        ConfigError as the constructor does."""
        if ca is None and cert is None and key is None:
            return None
        return cls(ca=ca, cert=cert, key=key)

    @property
    def mutual(self) -> bool:
        """A server with this config requires client certificates."""
        return self.ca is not None

    def require_server_side(self) -> None:
        """Raise ConfigError unless this config can serve (it has a cert and key)."""
        if self.cert is None:
            raise ConfigError("a TLS server needs --tls-cert and --tls-key (--tls-ca alone "
                              "only verifies peers)")

    # ---- framed TCP (fast path, data plane) ------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """The SSLContext of a framed server (mutual TLS when ``ca`` is set)."""
        self.require_server_side()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.ca is not None:
                context.load_verify_locations(cafile=self.ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the TLS certificates: {exc}") from exc
        return context

    def client_context(self) -> ssl.SSLContext:
        """The SSLContext of a framed client: verifies the server's chain and name."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.ca is not None:
                context.load_verify_locations(cafile=self.ca)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if self.cert is not None:
                context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load the TLS certificates: {exc}") from exc
        return context

    # ---- gRPC ------------------------------------------------------------------------------

    def grpc_server_credentials(self):
        """``grpc.ServerCredentials`` of the master's gRPC port."""
        import grpc

        self.require_server_side()
        ca = _read(self.ca) if self.ca is not None else None
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))],
                                           root_certificates=ca,
                                           require_client_auth=ca is not None)

    def grpc_channel_credentials(self):
        """``grpc.ChannelCredentials`` of a client channel."""
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca) if self.ca is not None else None,
            private_key=_read(self.key) if self.key is not None else None,
            certificate_chain=_read(self.cert) if self.cert is not None else None)

    def grpc_channel_options(self) -> list[tuple[str, str]]:
        """Channel options that go with the credentials (the expected server name)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS file {path!r}: {exc}") from exc


def handshake_error(exc: BaseException, where: str) -> AuthenticationError:
    """The error of a TLS handshake with ``where`` that failed with ``exc``: the peer's
    certificate did not verify, it refused ours (or our lack of one), or it does not speak
    TLS at all."""
    reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
    return AuthenticationError(
        f"TLS handshake with {where} failed: {reason} (a wrong CA, a missing or refused "
        "client certificate, or a server without TLS?)")


def wrap_client(sock, context: ssl.SSLContext, host: str, tls: TLSConfig, where: str):
    """``sock`` (connected, blocking, with its timeout set) after a client handshake.

    Raises AuthenticationError (``handshake_error``) for a refused handshake, and lets
    timeouts and other OSErrors through; ``sock`` is closed when it raises.
    """
    try:
        return context.wrap_socket(sock, server_hostname=tls.server_name or host)
    except ssl.SSLError as exc:
        sock.close()
        raise handshake_error(exc, where) from exc
    except BaseException:
        sock.close()
        raise


def probe_refusal(host: str, port: int, tls: TLSConfig, timeout_s: float = 2.0) -> str | None:
    """Why a TLS server at ``host``:``port`` refuses this client, or None if it does not (or
    cannot be reached at all, or says nothing within ``timeout_s``).

    NOTE: why a probe: under TLS 1.3 a server checks the client's certificate after the
    client has finished its side of the handshake, and gRPC then reports only "Socket
    closed". A handshake of our own and one read tell: the server's alert ("unknown ca"), or
    a close right after the handshake (gRPC's server sends no alert; one that accepts us
    sends its HTTP/2 settings at once, a framed one waits for our hello).
    """
    import socket

    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    try:
        with tls.client_context().wrap_socket(sock, server_hostname=tls.server_name
                                              or host) as secured:
            if secured.recv(1) == b"":
                return ("it closed the connection right after the handshake: it refused this "
                        "client's certificate, or its lack of one")
    except ssl.SSLError as exc:
        return str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
                   or exc)
    except ConnectionResetError:
        return "it reset the connection right after the handshake"
    except (OSError, ConfigError):
        return None
    finally:
        sock.close()
    return None


def speaks_tls(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether the server at ``host``:``port`` answers a TLS handshake (without verifying
    it): how a plain-text client tells "this master requires TLS" from a dead master."""
    import socket

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            with context.wrap_socket(sock):
                return True
    except ssl.SSLError as exc:
        # NOTE: an alert is a TLS answer; a plain-text server's bytes are not a record
        return "ALERT" in str(getattr(exc, "reason", "") or "").upper()
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes a server only to this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False    # a name: it may resolve to any interface


def exposure_warning(host: str, *, token: str | None, tls: TLSConfig | None) -> str | None:
    """The warning a server bound on ``host`` prints at start when anyone on the network
    can use it (a non-loopback address with neither a token nor TLS); None otherwise."""
    if is_loopback(host) or token or tls is not None:
        return None
    return (f"binding {host}, not a loopback address, with neither --token nor --tls-cert: "
            "anyone who can reach this port can read and write the cluster's data")
