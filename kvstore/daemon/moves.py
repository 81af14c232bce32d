"""Copies between this node's tier backends: the daemon's half of demotion and promotion.

``copy_range`` is the one entry point; the code that receives TierMove orders in heartbeat
replies calls it once per order and reports the move id done (or failed) in its next beat.

Guarantees: the source range is only read, never changed, so a reader of the source keeps
valid bytes whatever happens; on an exception the destination range may hold a partial
copy, which is harmless because the master switches the object's replica to the destination
only after the daemon reported the move done. Bytes go through a view when the source or
the destination is directly addressable memory (DRAM: one copy), else through a bounce
buffer of ``CHUNK_BYTES`` (SSD <-> HBM).
"""

from __future__ import annotations

from kvstore._errors import InvalidArgumentError
from kvstore.daemon.backends import Backend

CHUNK_BYTES = 8 << 20


def copy_range(src_backend: Backend, src_offset: int, dst_backend: Backend, dst_offset: int,
               length: int) -> None:
    """Copy [src_offset, +length) of ``src_backend`` to [dst_offset, +length) of
    ``dst_backend``.

    Raises InvalidArgumentError (nothing copied) when a range lies outside its backend or
    the two ranges overlap in the same backend; OSError (or the backend's own error) when
    the I/O fails, with the destination possibly partly written (see the module docstring).
    """
    if length < 0 or not src_backend.check_range(src_offset, length):
        raise InvalidArgumentError(f"source range [{src_offset}, +{length}) is outside "
                                   f"segment {src_backend.segment_id!r}")
    if not dst_backend.check_range(dst_offset, length):
        raise InvalidArgumentError(f"destination range [{dst_offset}, +{length}) is outside "
                                   f"segment {dst_backend.segment_id!r}")
    if src_backend is dst_backend and src_offset < dst_offset + length and \
            dst_offset < src_offset + length:
        raise InvalidArgumentError("source and destination ranges overlap")
    if length == 0:
        return
    src_view = src_backend.view(src_offset, length)
    if src_view is not None:
        dst_backend.write_from(dst_offset, src_view)
        return
    dst_view = dst_backend.view(dst_offset, length)
    if dst_view is not None:
        src_backend.read_into(src_offset, dst_view)
        return
    bounce = memoryview(bytearray(min(CHUNK_BYTES, length)))
    for start in range(0, length, CHUNK_BYTES):
        chunk = bounce[:min(CHUNK_BYTES, length - start)]
        src_backend.read_into(src_offset + start, chunk)
        dst_backend.write_from(dst_offset + start, chunk)
