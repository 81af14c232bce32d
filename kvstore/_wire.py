"""Wire helpers shared by kvstore's two framed TCP protocols: the master's fast metadata path
(``kvstore.rpc.fast_frames``) and the daemons' data plane (``kvstore.transport.data_frames``).

Both open a connection with the same hello, then frame requests their own way::

    HELLO   magic (4 bytes, names the protocol) | version u16 | token_len u16 (<= 1024) | token

The server reads it with ``read_hello`` and compares the token with ``tokens_equal`` (constant
time; a server without a token accepts any, an empty one included), then answers in its own
reply format. Integers are little-endian. ``recv_exact_into``/``recv_exact`` read exactly a
length (``PeerClosedError`` if the peer closes first) and ``sendmsg_all`` sends a header and
a payload in as few system calls as the kernel allows, copying neither (over TLS: one
``sendall`` per buffer, the encryption being the copy).
"""

from __future__ import annotations

import hmac
import socket
import ssl
import struct
from typing import Callable

from kvstore._errors import InvalidArgumentError

HELLO = struct.Struct("<4sHH")
MAX_TOKEN_BYTES = 1024


class PeerClosedError(ConnectionError):
    """The peer closed the connection in the middle of a frame."""


class BadHello(Exception):
    """The first bytes of a connection are not this protocol's hello (wrong magic or
    version, or a token length over MAX_TOKEN_BYTES); the server answers and closes."""


def encode_hello(magic: bytes, version: int, token: str | None) -> bytes:
    """The hello a client sends first. Raises InvalidArgumentError for a token over
    MAX_TOKEN_BYTES in UTF-8."""
    token_bytes = (token or "").encode()
    if len(token_bytes) > MAX_TOKEN_BYTES:
        raise InvalidArgumentError(f"token longer than {MAX_TOKEN_BYTES} bytes")
    return HELLO.pack(magic, version, len(token_bytes)) + token_bytes


def read_hello(read_exact: Callable[[int], bytes], magic: bytes, version: int) -> bytes:
    """Read one hello through ``read_exact(num_bytes)`` and return the token it carries.

    Raises BadHello (naming what was wrong) or whatever ``read_exact`` raises when the peer
    closes (PeerClosedError).
    """
    got_magic, got_version, token_len = HELLO.unpack(read_exact(HELLO.size))
    if got_magic != magic or got_version != version:
        raise BadHello(f"bad hello (magic {got_magic!r}, version {got_version})")
    if token_len > MAX_TOKEN_BYTES:
        raise BadHello(f"token length {token_len} over {MAX_TOKEN_BYTES}")
    return read_exact(token_len) if token_len else b""


def tokens_equal(expected: str | None, given: bytes) -> bool:
    """Constant-time token check; with no expected token, anything is accepted."""
    if not expected:
        return True
    return hmac.compare_digest(expected.encode(), given)


def data_plane_token(cluster_token: str) -> str:
    """The token a tenant's client presents to the daemons' data planes: an HMAC of the
    cluster token, so the master can hand it to tenants (Stats ``data_token``) without
    handing them the cluster token, which would let them register nodes or act as the
    cluster. Daemons accept it beside their own token."""
    return hmac.new(cluster_token.encode(), b"kvstore data plane v1", "sha256").hexdigest()


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` entirely (in place: a payload lands in its destination
    with no intermediate copy); raise PeerClosedError if the peer closes first."""
    total = len(view)
    received = 0
    while received < total:
        num_bytes = sock.recv_into(view[received:], total - received)
        if num_bytes == 0:
            raise PeerClosedError(f"peer closed after {received} of {total} bytes")
        received += num_bytes


def recv_exact(sock: socket.socket, num_bytes: int) -> bytes:
    """Receive exactly ``num_bytes`` (small headers only) or raise PeerClosedError."""
    buffer = bytearray(num_bytes)
    recv_exact_into(sock, memoryview(buffer))
    return bytes(buffer)


def sendmsg_all(sock: socket.socket, buffers: list) -> None:
    """Send every buffer, in order, with as few ``sendmsg`` calls as the kernel allows
    (a small header and a large payload go in one system call, neither copied)."""
    views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
    if isinstance(sock, ssl.SSLSocket):
        # NOTE: TLS has no sendmsg: each buffer is encrypted into its own records anyway
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
