"""KEYED_READ (op 17, ``data_frames``): a client's read of a key by name from one daemon's
own object table (a home read, docs/ARCHITECTURE.md, Home reads); the client side.

``read_keyed`` pipelines a batch of KEYED_READs on one connection (all the batch's
requests of one node, sent at once up to ``PIPELINE_DEPTH`` / ``REQUEST_WINDOW_BYTES``) and receives each object's
bytes into the destination ``allocate`` gives for its size, so a batch of first gets costs
one round trip per node. Each reply carries the object's checksum (from the daemon's
table) before its bytes; the caller verifies the bytes against it. Refusals come back per
item as ``ReplyError`` (status LOCATION_OFF, KEY_NOT_HERE, TOO_LARGE, CAPABILITY_REFUSED;
the connection stays usable); a broken connection fails the items not answered yet. With
``locate`` an object over its item's limit comes back as a ``Located`` (where the daemon's
table lists it), for the caller to read striped (client/home_reads.py).
"""

from __future__ import annotations

import struct
from typing import Callable, NamedTuple, Sequence

from kvstore._errors import TransferError
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status
from kvstore.transport.tcp_conn import Connection, ReplyError

#: The checksum before a served KEYED_READ's bytes.
CHECKSUM = struct.Struct("<Q")
MAX_KEY_BYTES = data_frames.MAX_KEY_BYTES
#: A request's limit meaning "any size" (a get that allocates its destination).
ANY_SIZE = (1 << 64) - 1
#: Requests sent before their replies are read: up to this many, within
#: ``REQUEST_WINDOW_BYTES``. NOTE: the daemon stops reading requests while a reply blocks
#: its send, so what the client sends ahead must fit the daemon's receive buffer whatever
#: the replies' sizes; the kernel caps the 4 MiB asked for at net.core.rmem_max (208 KiB
#: by default, doubled), so 128 KiB: ~850 requests of short keys, a batch of 1,024 keys
#: in two round trips, not 16 as with 64 requests.
PIPELINE_DEPTH = 4096
REQUEST_WINDOW_BYTES = 128 << 10
# NOTE: one recv takes a reply's header, checksum and the first bytes of its payload (then
# copied once); the rest lands straight in the destination
_RECV_BYTES = 16384


class Located(NamedTuple):
    """A LOCATED answer: the object's range in the daemon's table and its checksum."""

    segment_id: str
    offset: int
    size_bytes: int
    checksum: int


def encode_keyed_read(request_id: int, key: bytes, capability: bytes, max_bytes: int,
                      locate: bool = False) -> bytes:
    """One KEYED_READ request (``locate``: flagged FLAG_LOCATE). ValueError for a key
    over MAX_KEY_BYTES or empty."""
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key)} bytes outside 1..{MAX_KEY_BYTES}")
    flags = data_frames.FLAG_LOCATE if locate else 0
    if capability:
        return data_frames.REQUEST.pack(
            data_frames.REQUEST_MAGIC, Op.KEYED_READ, flags | data_frames.FLAG_CAPABILITY,
            0, request_id & 0xFFFFFFFF, max_bytes, len(key)) + \
            data_frames.CAPABILITY_LENGTH.pack(len(capability)) + capability + key
    return data_frames.REQUEST.pack(data_frames.REQUEST_MAGIC, Op.KEYED_READ, flags, 0,
                                    request_id & 0xFFFFFFFF, max_bytes, len(key)) + key


class _Replies:
    """Buffered reads of replies from one socket (what one recv brings past a reply is
    kept for the next)."""

    def __init__(self, sock):
        self._sock = sock
        self._buffer = bytearray(_RECV_BYTES)
        self._start = self._end = 0

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):
            kept = self._end - self._start
            self._buffer[:kept] = self._buffer[self._start:self._end]
            self._start, self._end = 0, kept
        num_bytes = self._sock.recv_into(memoryview(self._buffer)[self._end:])
        if num_bytes == 0:
            raise data_frames.PeerClosedError("peer closed in a KEYED_READ reply")
        self._end += num_bytes

    def read(self, size: int) -> bytes:
        while self._end - self._start < size:
            self._fill()
        start = self._start
        self._start += size
        return bytes(self._buffer[start:start + size])

    def read_into(self, view: memoryview) -> None:
        held = min(self._end - self._start, len(view))
        view[:held] = self._buffer[self._start:self._start + held]
        self._start += held
        if held < len(view):
            data_frames.recv_exact_into(self._sock, view[held:])


def read_keyed(conn: Connection, items: Sequence[tuple[bytes, bytes, int]],
               allocate: Callable[[int, int], memoryview | None], *,
               locate: bool = False) -> list:
    """Send ``items`` (key, keyed-read capability, most bytes accepted) as KEYED_READs on
    ``conn`` (its deadline set by the caller) and receive each served object's bytes into
    ``allocate(index, size)``; returns per item its checksum (int), a ``Located`` (only
    with ``locate``: an object over the item's limit) or a ReplyError.

    ``allocate`` returning None: the bytes are read and dropped (then a ReplyError with
    status TOO_LARGE is the item's result). Raises OSError / TransferError when the
    connection breaks (items not answered yet have no result: the caller retries them
    elsewhere), so the connection must then be closed.
    """
    replies = _Replies(conn.sock)
    results: list = [None] * len(items)
    sent = 0
    for index in range(len(items)):
        if sent <= index:
            batch, batch_bytes = [], 0
            while (sent < len(items) and sent < index + PIPELINE_DEPTH
                   and batch_bytes < REQUEST_WINDOW_BYTES):
                key, capability, max_bytes = items[sent]
                conn._next_request_id += 1
                batch.append(encode_keyed_read(conn._next_request_id, key, capability,
                                               max_bytes, locate))
                batch_bytes += len(batch[-1])
                sent += 1
            conn.sock.sendall(b"".join(batch))
        status_code, _, msg_len, _, length = data_frames.REPLY.unpack(
            replies.read(data_frames.REPLY.size))
        message = replies.read(msg_len).decode(errors="replace") if msg_len else ""
        if status_code == Status.LOCATED and locate:
            if not data_frames.LOCATION.size < length <= data_frames.LOCATION.size + \
                    data_frames.MAX_SEGMENT_ID_BYTES:
                raise TransferError(f"tcp {conn.node_id}: LOCATED reply of {length} bytes")
            checksum, offset, size = data_frames.LOCATION.unpack(
                replies.read(data_frames.LOCATION.size))
            segment_id = replies.read(length - data_frames.LOCATION.size)
            results[index] = Located(segment_id.decode(errors="replace"), offset, size,
                                     checksum)
            continue
        if status_code != Status.OK:
            try:
                status = Status(status_code)
            except ValueError:
                raise TransferError(f"tcp {conn.node_id}: reply with unknown status "
                                    f"{status_code}") from None
            results[index] = ReplyError(f"tcp {conn.node_id}: keyed read of "
                                        f"{items[index][0]!r} refused: {status.name}: "
                                        f"{message}", status)
            continue
        if length < CHECKSUM.size:
            raise TransferError(f"tcp {conn.node_id}: keyed read reply of {length} bytes")
        (checksum,) = CHECKSUM.unpack(replies.read(CHECKSUM.size))
        size = length - CHECKSUM.size
        dst = allocate(index, size)
        if dst is None:
            dst = memoryview(bytearray(size))
            results[index] = ReplyError(f"tcp {conn.node_id}: keyed read of "
                                        f"{items[index][0]!r}: {size} bytes do not fit",
                                        Status.TOO_LARGE)
            replies.read_into(dst)
            continue
        replies.read_into(dst)
        results[index] = checksum
    return results
