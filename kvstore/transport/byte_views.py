"""Checks that turn a caller's buffer into the flat byte view every transport copies with."""

from __future__ import annotations

from kvstore._errors import InvalidArgumentError


def as_bytes_view(buffer: memoryview, length: int, *, writable: bool = False) -> memoryview:
    """``buffer`` as a flat, C-contiguous memoryview of format "B" and exactly ``length`` bytes.

    No copy is made. Raises InvalidArgumentError if the buffer is not C-contiguous, has a
    different byte length, or (``writable=True``) is read-only.
    """
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if not view.c_contiguous:
        raise InvalidArgumentError("transfer buffer must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes != length:
        raise InvalidArgumentError(
            f"transfer buffer holds {view.nbytes} bytes but the range is {length} bytes")
    if writable and view.readonly:
        raise InvalidArgumentError("destination buffer is read-only")
    return view
