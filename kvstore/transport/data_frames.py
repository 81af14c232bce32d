"""The data-plane wire format: how a client reads and writes byte ranges of a daemon's segments.

One TCP connection carries one handshake, then any number of request/reply exchanges, in
order (a client may pipeline: send several requests before reading their replies). All
integers are little-endian.

Handshake (client -> server, once, first bytes of the connection): the hello of
``kvstore._wire`` with magic "KVS1" and version 1. The server answers with one REPLY:
status OK and, as its message, the daemon's node_id (so a client notices it reached a
different daemon than the one it meant), or status AUTH_FAILED / BAD_FRAME, after which it
closes.

Request (client -> server), 26-byte header, then the segment id, then the capability
(when flagged), then for WRITE the payload::

    REQUEST magic "KQ" | op u8 | flags u8 | seg_len u16 (1..255) | request_id u32 |
            offset u64 | length u64
            segment_id (seg_len bytes, UTF-8) |
            [cap_len u16 | capability (cap_len bytes)]  (FLAG_CAPABILITY only) |
            payload (length bytes; WRITE only, never CHECK_WRITE)

    flags: FLAG_CAPABILITY (1): a capability (``kvstore/capability.py``) follows the
    segment id: a write capability on a WRITE or CHECK_WRITE, a read capability on a READ; other bits 0. A
    daemon whose master gave it a capability secret refuses a WRITE without a valid one
    (CAPABILITY_REFUSED) and one over a range committed after its capability was issued
    (RANGE_COMMITTED), before a byte of the payload lands; one whose master also issues read
    capabilities for it refuses a READ without a valid one (CAPABILITY_REFUSED). NOTE: a
    daemon older than read capabilities answers a flagged READ with BAD_FRAME; clients only
    get read capabilities for daemons that asked for them.

    op: READ (1) returns ``length`` bytes of the segment from ``offset``; WRITE (2) stores the
    payload there; PING (3) carries no range (offset = length = 0 and seg_len = 0);
    COMMIT (4, sent by the master: durable commit) carries no segment id (seg_len = 0),
    ``offset`` is the change sequence the body follows and the payload (``length`` bytes, at
    most ``MAX_COMMIT_BYTES``) is a serialized ``kvstore.v1.HeartbeatResponse`` change set
    for the node's object table; the reply's ``length`` is the sequence the table holds
    after applying it (no payload), sent only once the change is durable on the node.
    CLIENT_COMMIT (5, sent by a writer: durable commit's client-parallel path) carries no
    segment id, offset 0, and a ``kvstore.v1.ClientCommit`` body of ``length`` bytes (at
    most ``MAX_COMMIT_BYTES``); the reply (OK, sent once the accepted entries are durable)
    has a payload of ``length`` bytes: one ``index<TAB>reason`` line per refused entry.
    CHECK_WRITE (6, sent by the nixl transport before a one-sided NIXL WRITE) is a WRITE
    without its payload: the daemon runs every check a WRITE gets (segment, range,
    capability, committed ranges) and answers OK or the refusal; the connection stays
    usable either way (no payload follows). See docs/ARCHITECTURE.md, Write capabilities.
    CHECK_WRITES (7) is every CHECK_WRITE of one batch in one request (no segment id,
    ``offset`` = the number of ranges, a body of ``length`` bytes), answered by one reply
    listing the refused ranges; body and reply in ``check_batch``.
    WRITE_COMMIT (14, a writer's single tcp put) is a WRITE and its CLIENT_COMMIT in one
    message: flagged with its write capability, whose segment id and capability are
    followed by ``key_len u16 | checksum u64 | key (key_len bytes, UTF-8)``, then the
    payload. The daemon runs every WRITE check before a byte lands, receives the payload,
    then commits the object (key, the range, checksum, raw codec) exactly as a
    CLIENT_COMMIT entry with that capability, and replies OK only once it is in its table;
    a refused commit is answered CAPABILITY_REFUSED (the payload was read: the connection
    stays usable), a refused write like a WRITE's (then a close). A daemon older than op 14
    answers BAD_FRAME before reading the payload and closes.
    WRITE_RESERVED (18, a writer's single tcp put into space it reserved) is a
    WRITE_COMMIT whose capability is the reservation's (its whole range) and whose key is
    followed by ``reservation_id u64 | client_id_len u16 | client_id (UTF-8)``
    (``WRITE_RESERVED_TAIL``), then the payload. The daemon runs every WRITE check before a
    byte lands, receives the payload, then makes the put visible itself: PutEnd naming the
    reservation to its master on the writer's behalf, then its own commit with the per-key
    capability that PutEnd returned (daemon/reserved_puts.py); it replies OK only once both
    hold. Refusals after the payload (the connection stays usable): RESERVATION_GONE (the
    master no longer knows the reservation: expired, reclaimed, or another master's;
    nothing was committed, the writer puts the key through PutStart), PUT_REFUSED (the
    master refused the key, the message says why), CAPABILITY_REFUSED (the daemon's own
    commit refused), INTERNAL (the master could not be reached: the key may or may not be
    visible). A daemon older than op 18 answers BAD_FRAME before reading the payload and
    closes.

    CHECKED_READ (8, a location read: a client reads a key again from the location it
    cached, without asking the master) is a READ whose capability field (FLAG_CAPABILITY
    set) carries the object's identity, ``checked_read.encode_identity``: the key, its
    checksum and the READ's read capability (may be empty). The daemon serves it like a
    READ only while its object table holds that key in that segment with that checksum
    over a range containing the one read, and it holds a location lease; else it answers
    LOCATION_OFF or LOCATION_STALE and the connection stays usable.
    docs/ARCHITECTURE.md, Location cache.

    KEYED_READ (17, a home read: a client's first get of a key, sent to the key's home
    node without asking the master) names a key, not a range: no segment id (seg_len 0),
    ``offset`` = the most object bytes the client accepts, ``length`` = the key's length;
    then the keyed-read capability (FLAG_CAPABILITY; may be absent where the node checks
    no reads), then the key (UTF-8, the stored key: a tenant's with its prefix). The daemon
    serves it from its own object table while it holds the location lease; the reply's
    ``length`` is 8 + the object's size and its payload the object's checksum (u64) then
    its bytes. Refusals: LOCATION_OFF (no lease), KEY_NOT_HERE (not in the table, or not
    raw), TOO_LARGE, CAPABILITY_REFUSED; the connection stays usable. With FLAG_LOCATE
    (4) set, an object over the limit is answered LOCATED instead of TOO_LARGE: the reply's
    payload is ``LOCATION`` (checksum u64 | offset u64 | size u64) then the segment id, and
    the client reads the range itself (striped CHECKED_READs carrying the keyed-read
    capability in their identity, which such a daemon accepts for keys under the
    capability's prefix). A daemon older than FLAG_LOCATE ignores it (TOO_LARGE).
    docs/ARCHITECTURE.md, Home reads.

Reply (server -> client), 16-byte header, then the message, then for a READ that succeeded the
payload::

    REPLY   status u8 | flags u8 (0) | msg_len u16 (<= 4096) | request_id u32 | length u64
            message (msg_len bytes, UTF-8; the error text, empty on success) |
            payload (length bytes)

Error handling: every (offset, length) is checked against its segment before a byte moves. A
READ that names an unknown segment or a range past its end gets an error reply and the
connection stays usable. A WRITE that is refused gets an error reply and then the server
closes the connection, because the payload that follows can no longer be trusted to be
``length`` bytes long. A malformed header (bad magic, unknown op, seg_len out of 1..255, or
not 0 for PING) gets a BAD_FRAME reply and a close; a segment id the daemon does not have
(whatever its bytes) gets NO_SEGMENT. Lengths are capped only by the segment (the server
never allocates for a payload: it goes straight into the mapped segment).
"""

from __future__ import annotations

import enum
import socket
import struct

from kvstore._wire import (  # noqa: F401 - re-exported: the data plane's I/O helpers
    HELLO, MAX_TOKEN_BYTES, PeerClosedError, encode_hello as _encode_hello, recv_exact,
    recv_exact_into, sendmsg_all,
)

HELLO_MAGIC = b"KVS1"
REQUEST_MAGIC = b"KQ"
PROTOCOL_VERSION = 1

MAX_SEGMENT_ID_BYTES = 255
#: Largest COMMIT body (a full resync of a big table; the master's gRPC cap too).
MAX_COMMIT_BYTES = 256 << 20
MAX_MESSAGE_BYTES = 4096

REQUEST = struct.Struct("<2sBBHIQQ")
CAPABILITY_LENGTH = struct.Struct("<H")
FLAG_CAPABILITY = 1
#: On a COMMIT: the body ends with the master's MAC (``capability.commit_mac``).
FLAG_SIGNED = 2
#: On a KEYED_READ: answer an object over the limit with its location (Status.LOCATED).
FLAG_LOCATE = 4
#: A LOCATED reply's payload before the segment id: checksum, offset, size.
LOCATION = struct.Struct("<QQQ")
#: What follows a WRITE_COMMIT's capability: key_len u16 | checksum u64, then the key.
WRITE_COMMIT_TAIL = struct.Struct("<HQ")
#: What follows a WRITE_RESERVED's key: reservation_id u64 | client_id_len u16, then the id.
WRITE_RESERVED_TAIL = struct.Struct("<QH")
MAX_CLIENT_ID_BYTES = 256
MAX_KEY_BYTES = 4096
REPLY = struct.Struct("<BBHIQ")

# NOTE: loopback and LAN sockets move bulk bytes fastest with large kernel buffers; 4 MiB is
# what the transfer benchmark settled on (bigger did not help on loopback).
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


class Op(enum.IntEnum):
    READ = 1
    WRITE = 2
    PING = 3
    COMMIT = 4
    CLIENT_COMMIT = 5
    CHECK_WRITE = 6
    CHECK_WRITES = 7
    CHECKED_READ = 8
    WRITE_COMMIT = 14
    KEYED_READ = 17
    WRITE_RESERVED = 18


class Status(enum.IntEnum):
    OK = 0
    BAD_FRAME = 1       # malformed header; the server closes the connection
    AUTH_FAILED = 2     # missing or wrong token; the server closes the connection
    NO_SEGMENT = 3      # the daemon has no segment with this id
    OUT_OF_RANGE = 4    # offset + length runs past the end of the segment
    INTERNAL = 5        # the server failed (e.g. an I/O error on a file segment)
    CAPABILITY_REFUSED = 6  # WRITE (or checked READ) without a valid capability for this range
    RANGE_COMMITTED = 7     # WRITE over an object committed after its capability was issued
    # CHECKED_READ refusals (transport/checked_read.py). NOTE: numbered apart from the
    # statuses above, which other changes extend one by one
    LOCATION_OFF = 32       # the node serves no location reads now (no location lease)
    LOCATION_STALE = 33     # the node does not hold that object at that range
    # KEYED_READ refusals (transport/keyed_read.py)
    KEY_NOT_HERE = 42       # this node's table holds no readable object under that key
    TOO_LARGE = 43          # the object is larger than the request's limit
    # WRITE_RESERVED refusals (daemon/reserved_puts.py)
    RESERVATION_GONE = 44   # the master no longer knows the reservation: nothing committed
    PUT_REFUSED = 45        # the master refused the key (outside, unaligned, overlapping)
    # NOTE: not a refusal: a KEYED_READ with FLAG_LOCATE of an object over its limit; the
    # payload is where the object lies (LOCATION, then the segment id)
    LOCATED = 46


def encode_hello(token: str | None) -> bytes:
    """The data plane's hello (InvalidArgumentError for a token over MAX_TOKEN_BYTES)."""
    return _encode_hello(HELLO_MAGIC, PROTOCOL_VERSION, token)


def encode_request(op: Op, segment_id: bytes, request_id: int, offset: int, length: int,
                   capability: bytes = b"") -> bytes:
    """Header plus segment id (plus the capability, when given one) of one request;
    the WRITE payload is sent after it."""
    if capability:
        return REQUEST.pack(REQUEST_MAGIC, op, FLAG_CAPABILITY, len(segment_id),
                            request_id & 0xFFFFFFFF, offset, length) + segment_id + \
            CAPABILITY_LENGTH.pack(len(capability)) + capability
    return REQUEST.pack(REQUEST_MAGIC, op, 0, len(segment_id), request_id & 0xFFFFFFFF,
                        offset, length) + segment_id


def encode_write_commit(segment_id: bytes, request_id: int, offset: int, length: int,
                        capability: bytes, key: bytes, checksum: int) -> bytes:
    """Everything of a WRITE_COMMIT before its payload (``length`` bytes, sent after it).
    ValueError for a key over MAX_KEY_BYTES or a capability over 65,535 bytes."""
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}")
    return encode_request(Op.WRITE_COMMIT, segment_id, request_id, offset, length,
                          capability) + WRITE_COMMIT_TAIL.pack(len(key), checksum) + key


def encode_write_reserved(segment_id: bytes, request_id: int, offset: int, length: int,
                          capability: bytes, key: bytes, checksum: int, reservation_id: int,
                          client_id: bytes) -> bytes:
    """Everything of a WRITE_RESERVED before its payload (``length`` bytes, sent after it).
    ValueError for a key over MAX_KEY_BYTES or a client id over MAX_CLIENT_ID_BYTES."""
    if len(client_id) > MAX_CLIENT_ID_BYTES:
        raise ValueError(f"client id of {len(client_id)} bytes exceeds {MAX_CLIENT_ID_BYTES}")
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key)} bytes exceeds {MAX_KEY_BYTES}")
    return encode_request(Op.WRITE_RESERVED, segment_id, request_id, offset, length,
                          capability) + WRITE_COMMIT_TAIL.pack(len(key), checksum) + key + \
        WRITE_RESERVED_TAIL.pack(reservation_id, len(client_id)) + client_id


def encode_commit(request_id: int, base_seq: int, body_len: int, signed: bool) -> bytes:
    """Header of a COMMIT push whose body (``body_len`` bytes, MAC included) follows."""
    return REQUEST.pack(REQUEST_MAGIC, Op.COMMIT, FLAG_SIGNED if signed else 0, 0,
                        request_id & 0xFFFFFFFF, base_seq, body_len)


def encode_client_commit(request_id: int, body_len: int) -> bytes:
    """Header of a CLIENT_COMMIT (a writer commits its replicas: a ``kvstore.v1.ClientCommit``
    body of ``body_len`` bytes follows). The reply's ``length`` is the size of a payload
    listing the refused entries, one ``index<TAB>reason`` line each (0: all committed)."""
    return REQUEST.pack(REQUEST_MAGIC, Op.CLIENT_COMMIT, 0, 0, request_id & 0xFFFFFFFF, 0,
                        body_len)


def encode_reply(status: Status, request_id: int, length: int = 0, message: str = "") -> bytes:
    message_bytes = message.encode()[:MAX_MESSAGE_BYTES]
    return REPLY.pack(status, 0, len(message_bytes), request_id, length) + message_bytes


def configure_socket(sock: socket.socket) -> None:
    """Options every data-plane socket gets: no Nagle delay, large kernel buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
