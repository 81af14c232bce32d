"""Request validation shared by every master RPC.

Whole-call problems (a batch over the limit, parallel arrays of different lengths, an unknown
node id, a bad enum value) raise ``Rejected`` with the gRPC status the service answers.
Per-item problems (one bad key or size inside a batch) are reported by ``key_problem`` and
become ITEM_INVALID with a message, so one bad item never fails the batch.
"""

from __future__ import annotations

import grpc

from kvstore.master.config import MAX_KEY_BYTES

#: Longest node, segment or client id, and data address, in characters.
MAX_ID_CHARS = 256


class Rejected(Exception):
    """A request the master refuses whole; never leaves the master process (the service
    turns it into the gRPC status ``code`` with ``message`` as details)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, message)


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid key, or None when it is (non-empty, <= 1 KiB of UTF-8)."""
    if not key:
        return "key must not be empty"
    # NOTE: UTF-8 needs at most 4 bytes a character, so short keys skip the encode.
    if len(key) * 4 > MAX_KEY_BYTES and len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"key is longer than {MAX_KEY_BYTES} bytes of UTF-8"
    return None


def check_batch(num_items: int, max_batch: int, what: str = "keys") -> None:
    if num_items > max_batch:
        raise invalid(f"batch of {num_items} {what} exceeds the maximum of {max_batch}")


def check_parallel(name_to_len: dict[str, int], *, optional: tuple[str, ...] = ()) -> None:
    """All arrays named in ``name_to_len`` have one length; ``optional`` ones may be empty."""
    lengths = {n: v for n, v in name_to_len.items() if not (n in optional and v == 0)}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{n}={v}" for n, v in name_to_len.items())
        raise invalid(f"parallel arrays differ in length ({described})")


def check_keys_strict(keys) -> None:
    """For calls with no per-item status (exists, match_prefix): any bad key fails the call."""
    for i, key in enumerate(keys):
        problem = key_problem(key)
        if problem is not None:
            raise invalid(f"keys[{i}]: {problem}")


def check_id(value: str, what: str, *, allow_empty: bool = False) -> None:
    if not value and not allow_empty:
        raise invalid(f"{what} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise invalid(f"{what} is longer than {MAX_ID_CHARS} characters")
