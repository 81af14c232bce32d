"""Every failure of a master call mapped into kvstore's error tree, here and only here.

Two levels: a whole call fails with a gRPC status (``status_error``: the same table for the
gRPC carrier and the fast path, whose error frames carry the gRPC code number), or one item
of a batch fails with an ``ItemStatus`` (``item_error``), which names its key.

``ConnectionLostError`` (a MasterUnavailableError) marks a call whose connection failed
before any reply was read, or that the master answered UNAVAILABLE (or CANCELLED: it
stopped mid-call): the one case in which
the call policy (``kvstore.rpc.client``) retries an idempotent call.
"""

from __future__ import annotations

import grpc

from kvstore._errors import (
    AuthenticationError, CapacityError, InvalidArgumentError, KeyNotFoundError, KVStoreError,
    MasterUnavailableError, TransferError,
)
from kvstore.v1 import master_pb2 as pb


class ConnectionLostError(MasterUnavailableError):
    """The master could not be reached, or the connection broke before its reply: the call
    may or may not have run there."""


#: How a master's UNAVAILABLE text starts when it refused a call without running it (a
#: standby, a leader taking over or one that stepped down: ``kvstore.ha.leadership``).
NOT_SERVING = "NOT_SERVING"


class NotServingError(ConnectionLostError):
    """The master answered that it did not run the call (it is not the serving leader):
    sending it again, to the same or another master, is safe for every method."""


_CODE_TO_ERROR: dict[grpc.StatusCode, type[KVStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: KeyNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: ConnectionLostError,
    # NOTE: this client never cancels a call it waits for (a cancelled future raises
    # FutureCancelledError, not a status): CANCELLED comes from a master that stopped while
    # the call was in flight (a leader stepping down), so the call may or may not have run
    grpc.StatusCode.CANCELLED: ConnectionLostError,
    grpc.StatusCode.DEADLINE_EXCEEDED: MasterUnavailableError,
}
CODE_NUMBER_TO_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def status_error(code: grpc.StatusCode, details: str, method: str) -> KVStoreError:
    """The kvstore error for a master call that failed whole with gRPC status ``code``.
    Its ``code`` attribute keeps the status (e.g. ALREADY_EXISTS for a registration)."""
    error_class = _CODE_TO_ERROR.get(code, KVStoreError)
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(NOT_SERVING):
        error_class = NotServingError
    error = error_class(f"master {method}: {code.name}: {details}")
    error.code = code
    return error


_STATUS_TO_ERROR: dict[int, tuple[type[KVStoreError], str]] = {
    pb.ITEM_ALREADY_EXISTS: (KVStoreError, "already exists"),
    pb.ITEM_NOT_FOUND: (KeyNotFoundError, "not found"),
    pb.ITEM_NO_SPACE: (CapacityError, "no space left, even after eviction"),
    pb.ITEM_INVALID: (InvalidArgumentError, "invalid"),
    pb.ITEM_LEASED: (KVStoreError, "is leased by a reader (pass force=True)"),
    pb.ITEM_PINNED: (KVStoreError, "is hard-pinned (pass force=True)"),
    # NOTE: a pending object is not readable yet: to a reader it does not exist.
    pb.ITEM_PENDING: (KeyNotFoundError, "is still being written"),
    # NOTE: a replica's daemon did not confirm it knows the commit: like a failed write, the
    # put is not done (the object was dropped); retrying it is safe (content-addressed keys)
    pb.ITEM_UNCOMMITTED: (TransferError, "not acknowledged by a replica's daemon; retry"),
}


def item_error(status: int, key: str, action: str, message: str = "") -> KVStoreError:
    """The error of one batch item whose ``ItemStatus`` is not OK; it names ``key``."""
    error_class, text = _STATUS_TO_ERROR.get(status, (KVStoreError, f"status {status}"))
    detail = f": {message}" if message else ""
    return error_class(f"{action} {key!r}: {text}{detail}", keys=[key])


def malformed(method: str, problem: str) -> KVStoreError:
    """A reply that does not fit its request: a client never guesses where bytes live."""
    return KVStoreError(f"malformed master reply to {method}: {problem}")
