"""The identity a CHECKED_READ carries (data_frames.Op.CHECKED_READ): which object the
client expects at the range it reads.

Layout (little-endian), sent in the request's capability field::

    key_len u16 | key (key_len bytes, UTF-8) | checksum u64 | read capability (the rest;
    empty where the node checks none)

``decode_identity`` raises ValueError for a blob that does not parse (the daemon answers
BAD_FRAME).
"""

from __future__ import annotations

import struct

_KEY_LENGTH = struct.Struct("<H")
_CHECKSUM = struct.Struct("<Q")


def encode_identity(key: str, checksum: int, capability: bytes = b"") -> bytes:
    """The identity blob of ``key``'s object (its checksum), with the READ's capability."""
    key_bytes = key.encode()
    return (_KEY_LENGTH.pack(len(key_bytes)) + key_bytes + _CHECKSUM.pack(checksum)
            + capability)


def decode_identity(blob: bytes) -> tuple[str, int, bytes]:
    """(key, checksum, read capability) of an identity blob; ValueError if malformed."""
    if len(blob) < _KEY_LENGTH.size:
        raise ValueError("identity shorter than its key length")
    (key_len,) = _KEY_LENGTH.unpack_from(blob)
    end = _KEY_LENGTH.size + key_len
    if len(blob) < end + _CHECKSUM.size:
        raise ValueError(f"identity of {len(blob)} bytes too short for a key of {key_len}")
    try:
        key = blob[_KEY_LENGTH.size:end].decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"identity key is not UTF-8: {exc}") from None
    (checksum,) = _CHECKSUM.unpack_from(blob, end)
    return key, checksum, blob[end + _CHECKSUM.size:]
