"""Reading a data-plane request's parts from a connection's buffered reader (the daemon's
side of ``kvstore.transport.data_frames``): exact reads that raise PeerClosedError when the
peer closes early, and BadFrame, which ends the connection after a BAD_FRAME reply."""

from __future__ import annotations

from kvstore.transport import data_frames


class BadFrame(Exception):
    """The peer sent something that is not a valid frame; reply BAD_FRAME and close."""


def read_exact(reader, num_bytes: int) -> bytes:
    """Exactly ``num_bytes`` from the connection's buffered reader, or PeerClosedError."""
    data = reader.read(num_bytes)
    if len(data) < num_bytes:
        raise data_frames.PeerClosedError(f"peer closed after {len(data)} of {num_bytes} "
                                          "bytes")
    return data


def read_into(reader, view: memoryview) -> None:
    """Fill ``view`` from the reader (what it holds, then straight from the socket), or
    PeerClosedError."""
    received = reader.readinto(view)
    if received < len(view):
        raise data_frames.PeerClosedError(f"peer closed after {received} of {len(view)} "
                                          "bytes")
