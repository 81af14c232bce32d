"""Validation of a call's arguments before they reach the master: keys (the offending key
named), ``near_node`` ids, and lists that must run parallel to the keys. Each check raises
InvalidArgumentError and nothing is sent."""

from __future__ import annotations

from typing import Any, Sequence

from kvstore._errors import InvalidArgumentError

MAX_KEY_BYTES = 1024


def check_key(key: object) -> str:
    """Return ``key`` if it is a non-empty str of at most 1 KiB in UTF-8.

    Raises InvalidArgumentError otherwise (wrong type, empty, too long, not encodable).
    """
    if type(key) is not str:
        if not isinstance(key, str):
            raise InvalidArgumentError(f"key must be str, got {type(key).__name__}")
    if not key:
        raise InvalidArgumentError("key must not be empty")
    # NOTE: a str of <= 256 characters is at most 1 KiB in UTF-8; only longer ones are encoded.
    if len(key) > MAX_KEY_BYTES // 4:
        try:
            num_bytes = len(key.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(f"key is not valid UTF-8: {key[:64]!r}...") from exc
        if num_bytes > MAX_KEY_BYTES:
            raise InvalidArgumentError(
                f"key is {num_bytes} bytes in UTF-8, more than {MAX_KEY_BYTES}: {key[:64]!r}...")
    elif not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(f"key is not valid UTF-8: {key!r}") from exc
    return key


def check_keys(keys: Sequence[str]) -> list[str]:
    """Validate a batch's key list as a whole (it must be a list/tuple of keys).

    Raises InvalidArgumentError for a non-sequence or for a str passed where a list belongs;
    single bad keys are the caller's per-item concern (see ``check_key``).
    """
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)):
        raise InvalidArgumentError(
            f"keys must be a list or tuple of str, got {type(keys).__name__}")
    return list(keys)


def check_node_id(node_id: Any) -> str:
    """``near_node`` as the wire's node id ("" for None); InvalidArgumentError otherwise."""
    if node_id is None:
        return ""
    if not isinstance(node_id, str) or not node_id or len(node_id) > 256:
        raise InvalidArgumentError(f"near_node must be a node id (a non-empty str of at most "
                                   f"256 characters) or None, got {node_id!r}")
    return node_id


def check_lengths(keys: Sequence[Any], others: Sequence[Any], what: str) -> None:
    """InvalidArgumentError unless ``others`` (named ``what``) is a list or tuple with one
    entry per key."""
    if not isinstance(others, (list, tuple)):
        raise InvalidArgumentError(f"{what} must be a list or tuple, got {type(others).__name__}")
    if len(others) != len(keys):
        raise InvalidArgumentError(f"{len(keys)} keys but {len(others)} {what}")
