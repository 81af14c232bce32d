"""The body and reply of CHECK_WRITES (data-plane op 7): every write check of one NIXL batch to
one node in one request, answered by one reply.

The request is a data-plane REQUEST header (``data_frames``) with op CHECK_WRITES, flags 0,
seg_len 0, ``offset`` = the number of ranges and ``length`` = the body's size (at most
``MAX_BODY_BYTES``), then the body: per range, in order::

    RANGE   seg_len u8 (1..255) | cap_len u16 | offset u64 | length u64 |
            segment_id (seg_len bytes, UTF-8) | capability (cap_len bytes; 0: none)

The daemon runs on each range the checks a CHECK_WRITE (op 6) gets and answers one REPLY with
status OK and a payload of ``length`` bytes listing the refused ranges only (none: every
range allowed), in order::

    REFUSAL index u32 | status u8 | msg_len u16 (<= data_frames.MAX_MESSAGE_BYTES) |
            message (msg_len bytes, UTF-8)

A body that does not parse (a count or size that disagrees with the header, a seg_len of 0)
gets BAD_FRAME and a close, like any malformed frame. A daemon advertises that it serves op 7
in its NIXL metadata (``nixl_meta.NodeNixlInfo.batched_checks``); to a node that does not
(an older daemon, which would answer op 7 with BAD_FRAME) clients send one CHECK_WRITE per
range as before. Pure functions; ``ValueError`` for bytes that do not parse.
"""

from __future__ import annotations

import struct
from typing import Iterator, Sequence

from kvstore.transport.data_frames import MAX_MESSAGE_BYTES, MAX_SEGMENT_ID_BYTES, Status

RANGE = struct.Struct("<BHQQ")
REFUSAL = struct.Struct("<IBH")
#: largest body a daemon reads (a client splits a bigger batch into several requests)
MAX_BODY_BYTES = 1 << 20
#: most ranges in one request
MAX_RANGES = 4096


def encode_ranges(ranges: Sequence[tuple[bytes, int, int, bytes]]) -> list[tuple[int, bytes]]:
    """``(count, body)`` of the requests carrying ``(segment_id, offset, length, capability)``
    ranges, in order: one request unless the ranges exceed ``MAX_RANGES`` or
    ``MAX_BODY_BYTES``. ValueError for a segment id of 0 or more than 255 bytes or a
    capability over 65535 bytes."""
    requests: list[tuple[int, bytes]] = []
    parts: list[bytes] = []
    size = 0
    for segment_id, offset, length, capability in ranges:
        if not 0 < len(segment_id) <= MAX_SEGMENT_ID_BYTES or len(capability) > 0xFFFF:
            raise ValueError(f"segment id of {len(segment_id)} bytes, capability of "
                             f"{len(capability)}")
        entry = RANGE.pack(len(segment_id), len(capability), offset, length) + segment_id + \
            capability
        if parts and (len(parts) == MAX_RANGES or size + len(entry) > MAX_BODY_BYTES):
            requests.append((len(parts), b"".join(parts)))
            parts, size = [], 0
        parts.append(entry)
        size += len(entry)
    if parts:
        requests.append((len(parts), b"".join(parts)))
    return requests


def decode_ranges(body: bytes) -> Iterator[tuple[bytes, int, int, bytes]]:
    """The ``(segment_id, offset, length, capability)`` ranges of a body, in order; ValueError
    for a truncated entry or a seg_len of 0."""
    view = memoryview(body)
    position = 0
    while position < len(view):
        if position + RANGE.size > len(view):
            raise ValueError(f"truncated range header at byte {position}")
        seg_len, cap_len, offset, length = RANGE.unpack_from(view, position)
        position += RANGE.size
        if seg_len == 0:
            raise ValueError(f"range at byte {position - RANGE.size} has no segment id")
        end = position + seg_len + cap_len
        if end > len(view):
            raise ValueError(f"truncated range at byte {position - RANGE.size}")
        yield (bytes(view[position:position + seg_len]), offset, length,
               bytes(view[position + seg_len:end]))
        position = end


def encode_refusals(refusals: Sequence[tuple[int, Status, str]]) -> bytes:
    """The reply payload listing ``(index, status, message)`` of the refused ranges."""
    parts = []
    for index, status, message in refusals:
        text = message.encode()[:MAX_MESSAGE_BYTES]
        parts.append(REFUSAL.pack(index, status, len(text)) + text)
    return b"".join(parts)


def decode_refusals(payload: bytes, count: int) -> dict[int, tuple[Status, str]]:
    """index -> (status, message) of the refused ranges; ValueError for a payload that does
    not parse or names a range outside ``[0, count)`` or an unknown status."""
    view = memoryview(payload)
    refused: dict[int, tuple[Status, str]] = {}
    position = 0
    while position < len(view):
        if position + REFUSAL.size > len(view):
            raise ValueError(f"truncated refusal at byte {position}")
        index, status, msg_len = REFUSAL.unpack_from(view, position)
        position += REFUSAL.size
        if index >= count or position + msg_len > len(view):
            raise ValueError(f"refusal of range {index} of {count} (message of {msg_len} "
                             f"bytes at byte {position})")
        refused[index] = (Status(status), bytes(view[position:position + msg_len]).decode(
            errors="replace"))
        position += msg_len
    return refused
