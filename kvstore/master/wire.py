"""The fast path's hot reads in wire form: requests decoded without protobuf messages, and a
reply that is already bytes.

``parse_request(body)`` (C++, csrc/master/keybatch.cpp) decodes an ExistsRequest's or
GetReplicasRequest's body into a ``KeyBatch``: every key's bytes in one buffer with its str
hash, and the scalar fields (``epoch``, ``lease_ttl_ms``, ``client_host_id``, ``shm_reads``)
as attributes, so it reads like the request message (``batch.keys`` is the batch itself, a
sequence of str). ``KeyIndex.get_many`` takes one as it is (GetReplicas' handler runs
unchanged); Exists answers one through ``KeyIndex.contains_batch``, whose reply is the
ExistsResponse's bytes (``WireReply``).

NOTE: why: in a 1,024-key Exists the master spent more time making Python objects (the
parsed message, a str per key, a bool per key in the reply message) than looking the keys
up; a KeyBatch makes a str only for a key that is missing (bench/RESULTS.md, "Master fast
path in wire form").

Guarantees: a request ``parse_request`` does not take (None: a non-ASCII key or host id, a
group, a malformed body) is parsed by protobuf as before, so every request gets the answer
(or the error) it got before; the replies are byte-identical to the protobuf ones.
Only the fast path uses this: gRPC hands the service parsed messages.
"""

from __future__ import annotations

from kvstore.master._keyindex import KeyBatch, parse_request

__all__ = ["KeyBatch", "WireReply", "parse_request", "varint", "WIRE_METHODS"]

#: The RPCs the fast path decodes with ``parse_request``.
WIRE_METHODS = frozenset({"Exists", "GetReplicas"})

_EPOCH_TAG = bytes([120 << 3 & 0x7F | 0x80, 120 << 3 >> 7])   # field 120, varint


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint: the master's one encoder of them (``replies``
    and the tests use it too)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class WireReply:
    """A reply message in wire form: ``payload`` (every field but the epoch) and ``epoch``
    (field 120 of every reply, set by the invoker in an HA cluster; 0: absent), read like a
    message by ``SerializeToString``."""

    __slots__ = ("payload", "epoch")

    def __init__(self, payload: bytes):
        self.payload = payload
        self.epoch = 0

    def SerializeToString(self) -> bytes:  # noqa: N802 (the protobuf message's name)
        if not self.epoch:
            return self.payload
        return self.payload + _EPOCH_TAG + varint(self.epoch)
