"""Validation of keys before they reach the master: fail fast, with the offending key named."""

from __future__ import annotations

from typing import Sequence

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
