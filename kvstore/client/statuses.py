"""Map the master's per-item statuses (``ItemStatus``) into kvstore errors, in one place."""

from __future__ import annotations

from typing import Any

from kvstore._errors import CapacityError, InvalidArgumentError, KeyNotFoundError, KVStoreError
from kvstore.v1 import master_pb2

OK = master_pb2.ITEM_OK
ALREADY_EXISTS = master_pb2.ITEM_ALREADY_EXISTS
NOT_FOUND = master_pb2.ITEM_NOT_FOUND
PENDING = master_pb2.ITEM_PENDING

_STATUS_TO_ERROR: dict[int, tuple[type[KVStoreError], str]] = {
    master_pb2.ITEM_ALREADY_EXISTS: (KVStoreError, "already exists"),
    master_pb2.ITEM_NOT_FOUND: (KeyNotFoundError, "not found"),
    master_pb2.ITEM_NO_SPACE: (CapacityError, "no space left, even after eviction"),
    master_pb2.ITEM_INVALID: (InvalidArgumentError, "invalid"),
    master_pb2.ITEM_LEASED: (KVStoreError, "is leased by a reader (pass force=True)"),
    master_pb2.ITEM_PINNED: (KVStoreError, "is hard-pinned (pass force=True)"),
    # NOTE: a pending object is not readable yet: to a reader it does not exist.
    master_pb2.ITEM_PENDING: (KeyNotFoundError, "is still being written"),
}


def item_error(reply: Any, i: int, key: str, action: str) -> KVStoreError:
    """The error for item ``i`` (key ``key``) of a batch ``reply`` whose status is not OK."""
    status = reply.statuses[i]
    error_class, text = _STATUS_TO_ERROR.get(status, (KVStoreError, f"status {status}"))
    message = reply.error_messages[i] if i < len(reply.error_messages) else ""
    detail = f": {message}" if message else ""
    return error_class(f"{action} {key!r}: {text}{detail}", keys=[key])


def check_lengths(reply: Any, fields: tuple[str, ...], expected: int, action: str) -> None:
    """``check_length`` for each of ``fields``."""
    for field in fields:
        if len(getattr(reply, field)) != expected:
            check_length(reply, field, expected, action)


def check_length(reply: Any, field: str, expected: int, action: str) -> None:
    """Raise KVStoreError unless the reply's ``field`` has one entry per requested key."""
    actual = len(getattr(reply, field))
    if actual != expected:
        raise KVStoreError(f"malformed master reply to {action}: {actual} {field} "
                           f"for {expected} keys")
