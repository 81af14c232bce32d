"""What a daemon publishes about its NIXL agent (``NodeInfo.nixl_metadata``), and its parser.

NIXL's own agent metadata (the blob ``add_remote_agent`` loads: agent name, UCX worker
address, registered memory and remote keys) says nothing about which of the daemon's segments
lies at which address, so the daemon wraps it: a 4-byte big-endian header length, a JSON
header ``{"v": 1, "agent": NAME, "segments": {SEGMENT_ID: [ADDRESS, SIZE, MEM_TYPE,
DEVICE_ID]}, "batched_checks": true}``, then NIXL's blob. Empty bytes mean "no NIXL on this
node". ``batched_checks`` (absent: false; a daemon older than it omits it, and older clients
ignore it) says the node's data plane serves CHECK_WRITES (op 7, ``check_batch``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from kvstore._errors import KVStoreError

VERSION = 1
_HEADER_LENGTH = struct.Struct(">I")
_MAX_HEADER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class RemoteSegment:
    """One registered segment of a node, as that node's process addresses it."""

    address: int
    size_bytes: int
    mem_type: str       # "DRAM" or "VRAM"
    device_id: int


@dataclass(frozen=True, slots=True)
class NodeNixlInfo:
    """A node's NIXL agent: its name, its registered segments, NIXL's metadata blob."""

    agent_name: str
    segments: dict[str, RemoteSegment]
    agent_metadata: bytes
    batched_checks: bool = False    # the data plane serves CHECK_WRITES (one per batch)


def pack(info: NodeNixlInfo) -> bytes:
    """The bytes a daemon registers as ``nixl_metadata``."""
    header = json.dumps({
        "v": VERSION, "agent": info.agent_name,
        "segments": {sid: [s.address, s.size_bytes, s.mem_type, s.device_id]
                     for sid, s in info.segments.items()},
        **({"batched_checks": True} if info.batched_checks else {}),
    }).encode()
    return _HEADER_LENGTH.pack(len(header)) + header + info.agent_metadata


def unpack(data: bytes, node_id: str) -> NodeNixlInfo | None:
    """Parse ``nixl_metadata``; None for empty bytes (the node offers no NIXL).

    Raises KVStoreError naming the node for bytes that are not what ``pack`` makes (an
    unknown version included): a client never guesses where a segment lies.
    """
    if not data:
        return None
    try:
        (length,) = _HEADER_LENGTH.unpack_from(data)
        if length > _MAX_HEADER_BYTES or _HEADER_LENGTH.size + length > len(data):
            raise ValueError(f"header of {length} bytes in {len(data)}")
        header = json.loads(data[_HEADER_LENGTH.size:_HEADER_LENGTH.size + length])
        if header.get("v") != VERSION:
            raise ValueError(f"version {header.get('v')!r}, expected {VERSION}")
        segments = {str(sid): RemoteSegment(int(a), int(n), str(m), int(d))
                    for sid, (a, n, m, d) in header["segments"].items()}
        return NodeNixlInfo(str(header["agent"]), segments,
                            bytes(data[_HEADER_LENGTH.size + length:]),
                            header.get("batched_checks") is True)
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise KVStoreError(f"node {node_id}: malformed NIXL metadata: {exc}") from exc
