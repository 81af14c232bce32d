"""The master's fast metadata path: wire format shared by the server
(``kvstore.master.fast_server``) and the client (``kvstore.rpc.fast_carrier``).

The fast path carries the SAME protobuf request/reply messages as the gRPC service
(``proto/kvstore/v1/master.proto``) over plain TCP, without HTTP/2: a Python gRPC round trip
costs ~0.5 ms here, a framed one a few tens of microseconds. All integers little-endian.

Handshake (client -> server, first bytes of the connection): the hello of ``kvstore._wire``
with magic "KVM1" and version 1. The server answers with one REPLY frame (request id 0): OK
carrying the master_id, or UNAUTHENTICATED / INVALID_ARGUMENT with a message, after which it
closes.

Request (client -> server), 10-byte header then the serialized request message::

    REQUEST body_len u32 | method_id u16 | request_id u32 | body

Reply (server -> client), 9-byte header then the serialized reply, or the error text::

    REPLY   body_len u32 | status u8 | request_id u32 | body

    method_id: position of the rpc in master.proto's ``service Master``, plus one
    (``kvstore.rpc.methods``).
    status: the gRPC status code number (0 OK; anything else: the body is the UTF-8 error
    message), so both paths map errors into kvstore's tree with one table. Replies come in
    request order.

Error handling: a body over ``MAX_FRAME_BYTES`` (the gRPC message cap) gets a
RESOURCE_EXHAUSTED reply and a close (its bytes cannot be skipped safely); an unknown method
id gets UNIMPLEMENTED and a body that does not parse INVALID_ARGUMENT, and the connection
stays usable (the frame boundary is known). A peer that closes mid-frame is dropped.
"""

from __future__ import annotations

import struct

import grpc

from kvstore._wire import HELLO, MAX_TOKEN_BYTES, encode_hello as _encode_hello  # noqa: F401

HELLO_MAGIC = b"KVM1"
PROTOCOL_VERSION = 1
#: Largest request or reply body: the gRPC message cap, so both paths take the same batches.
MAX_FRAME_BYTES = 256 * 1024 * 1024

REQUEST = struct.Struct("<IHI")
REPLY = struct.Struct("<IBI")

OK = grpc.StatusCode.OK.value[0]


def encode_hello(token: str | None) -> bytes:
    """The fast path's hello (InvalidArgumentError for a token over MAX_TOKEN_BYTES)."""
    return _encode_hello(HELLO_MAGIC, PROTOCOL_VERSION, token)


def encode_request(method_id: int, request_id: int, body: bytes) -> bytes:
    return REQUEST.pack(len(body), method_id, request_id & 0xFFFFFFFF) + body


def encode_reply(code: grpc.StatusCode, request_id: int, body: bytes) -> bytes:
    return REPLY.pack(len(body), code.value[0], request_id) + body


def encode_error(code: grpc.StatusCode, request_id: int, message: str) -> bytes:
    return encode_reply(code, request_id, message.encode("utf-8", "replace")[:4096])
