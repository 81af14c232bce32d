"""The single-key tcp put into reserved space, made visible by its daemon: one WRITE_RESERVED
(data-plane op 18) and nothing else on the put's path, so a put is two round trips on its
critical path (this client's to the daemon, the daemon's PutEnd to the master) instead of
three (PutStart, WRITE_COMMIT, PutEnd; issue 15, 15u). The daemon's side and its
guarantees: ``kvstore/daemon/reserved_puts.py``.

When (``applies``): a put of one key that ``reservations.put_reserved`` placed in this
client's reservation, whose segment the tcp transport reaches in one unstriped piece, on a
daemon not known to be older than op 18.

Outcome per key (``put_one``): None (stored, durable: the daemon answered only once the
master recorded it and its table held it); ``AGAIN`` (nothing was committed anywhere: the
reservation is gone or its capability expired, or the write was refused before a byte
landed; the caller forgets the grant and puts the key through PutStart); ``FALLBACK`` (the
daemon is older than op 18: nothing was written; the caller takes the reserved WRITE +
PutEnd flow); or the key's error: InvalidArgumentError for a range the master refused
(outside the reservation, unaligned, overlapping: a bug here, never a stored object
changed), the transport's error for a lost connection or an unreachable master (the key
may be visible or not, as after any lost reply); a commit the daemon refused after the
master recorded the key is that error too, and the key is removed again (best effort).
"""

from __future__ import annotations

from kvstore._errors import InvalidArgumentError, KVStoreError
from kvstore.transport.base import Target
from kvstore.transport.data_frames import Status
from kvstore.transport.tcp_conn import ReplyError

#: ``put_one``'s answer when nothing was committed and the key should go through PutStart.
AGAIN = object()
#: ``put_one``'s answer when the daemon does not know WRITE_RESERVED (nothing written).
FALLBACK = object()

# refusals before a byte landed or by the master without a commit: nothing stored anywhere
_NOTHING_COMMITTED = frozenset((Status.RESERVATION_GONE, Status.RANGE_COMMITTED))


def applies(transport, target: Target, count: int) -> bool:
    """Whether a reserved put of ``count`` keys, the first at ``target``, takes this flow."""
    return (count == 1 and transport is not None and transport.name == "tcp"
            and transport.takes_write_reserved(target))


def put_one(master, transfers, settings, reservation_id: int, key: str, target: Target,
            src: memoryview, digest: int) -> KVStoreError | None | object:
    """Write ``src`` at ``target`` and have its daemon make it visible as ``key``; return
    the key's outcome (see the module docstring)."""
    transport = transfers.transport_for(target)
    try:
        transport.write_reserved(target, src, key, digest, reservation_id,
                                 settings.client_id, timeout_s=settings.deadline.remaining_s())
    except ReplyError as exc:
        status = exc.status
        if status == Status.BAD_FRAME:
            return FALLBACK
        committed_refusal = str(exc).find("commit refused") >= 0
        if status in _NOTHING_COMMITTED or (status == Status.CAPABILITY_REFUSED
                                            and not committed_refusal):
            return AGAIN
        transfers.count_writes("tcp", 0, 0, errors=1)
        if status == Status.PUT_REFUSED:
            return InvalidArgumentError(f"put of {key!r} into reserved space refused: {exc}",
                                        keys=[key])
        if committed_refusal:
            _remove(master, key)
        exc.keys = exc.keys or [key]
        return exc
    except KVStoreError as exc:
        transfers.count_writes("tcp", 0, 0, errors=1)
        exc.keys = exc.keys or [key]
        return exc
    transfers.count_writes("tcp", 1, src.nbytes)
    return None


def _remove(master, key: str) -> None:
    """The master recorded ``key`` but its daemon refused the commit: remove it again."""
    try:
        master.remove([key], force=True)
    except KVStoreError:
        pass    # NOTE: best effort, as writer._remove: the daemon never confirmed it


__all__ = ["AGAIN", "FALLBACK", "applies", "put_one"]
