"""The single-key, single-replica tcp put with its commit in the write: PutStart -> one
WRITE_COMMIT (data and the daemon's commit in one message, ``transport/data_frames.py`` op
14) -> PutEnd (issue 15).

Why: the general flow (``writer._put_valid``) sends the WRITE, then a CLIENT_COMMIT frame on
a second pooled connection, then PutEnd, and reads the two answers: on the critical path a
second daemon request (a connection taken from the committer's pool, a frame built and
sent, a wake-up of another daemon thread competing for the same cores as the master's
PutEnd). Here the daemon commits the object right after its payload lands, on the same
connection and in the same reply: one daemon request per put instead of two (round trips on
the critical path stay three: PutStart, the daemon, PutEnd).

Guarantees, the same as the general flow's (docs/ARCHITECTURE.md, Client commit): the put
succeeds only once the replica's daemon answered that its table holds the object and the
master's PutEnd made it COMPLETE; the daemon commits only after the whole payload landed and
only with the put's write capability (``client_commits.apply_one``: the CLIENT_COMMIT
checks), so a write cut short never leaves a committed object; the commit reaches the daemon
before PutEnd is sent (never a COMPLETE object whose bytes have not landed). A failed
WRITE_COMMIT revokes the key (PutRevoke logs its removal on every client-commit node, so a
commit the daemon applied before the connection broke is removed again); a PutEnd refused
after the commits is the master's ``_client_committed`` wait, as in the general flow. Errors
are per key, as ``writer`` reports them.

When: ``applies`` (one key started with one replica, the master offered
``client_commit``, the replica reached through tcp in one unstriped piece, its daemon not
known to be older than op 14). A daemon older than op 14 answers BAD_FRAME to a
WRITE_COMMIT: ``FALLBACK`` then sends the caller back to the general flow (nothing was
written or committed there).
"""

from __future__ import annotations

from typing import Any, Callable

from kvstore._errors import KVStoreError
from kvstore.client.transfer import Transfers
from kvstore.rpc import MasterClient
from kvstore.transport.base import Target
from kvstore.transport.data_frames import Status
from kvstore.transport.tcp_conn import ReplyError

#: ``put_one``'s answer when the replica's daemon does not know WRITE_COMMIT.
FALLBACK = object()


def applies(transfers: Transfers, slots: Any, started: list[int]) -> bool:
    """Whether this PutStart's answer can take the write-commit flow."""
    if len(started) != 1 or len(slots) != 1 or transfers.committer is None \
            or not getattr(slots, "client_commit", False):
        return False
    targets = slots[started[0]]
    # NOTE: one replica only: the general flow writes several replicas in parallel (one
    # connection each) where these frames would go one after the other
    if len(targets) != 1:
        return False
    transport = transfers.transport_for(targets[0])
    return transport is not None and transport.name == "tcp" \
        and transport.takes_write_commit(targets[0])


def put_one(master: MasterClient, transfers: Transfers, settings: Any, key: str,
            target: Target, src: memoryview, checksum: int,
            revoke: Callable[[MasterClient, Any, list[str]], None]) -> KVStoreError | None | object:
    """Write and commit ``src`` at ``target`` in one WRITE_COMMIT, then PutEnd; return the
    key's result (None: stored), or ``FALLBACK``. Raises what PutEnd raises for the whole
    call (after ``revoke``: the writer's best-effort PutRevoke of the key)."""
    transport = transfers.transport_for(target)
    try:
        transport.write_commit(target, src, key, checksum,
                               timeout_s=settings.deadline.remaining_s())
    except ReplyError as exc:
        if exc.status == Status.BAD_FRAME:
            return FALLBACK
        return _failed(master, transfers, settings, key, exc, revoke)
    except KVStoreError as exc:
        return _failed(master, transfers, settings, key, exc, revoke)
    except BaseException:
        revoke(master, settings, [key])
        raise
    transfers.count_writes(transport.name, 1, src.nbytes)
    try:
        (ended,) = master.put_end([key], [checksum], client_id=settings.client_id,
                                  deadline=settings.deadline, client_committed=True)
    except BaseException:
        revoke(master, settings, [key])
        raise
    return ended


def _failed(master: MasterClient, transfers: Transfers, settings: Any, key: str,
            exc: KVStoreError, revoke: Callable) -> KVStoreError:
    """A replica's WRITE_COMMIT failed: count it, revoke the key, name it in the error."""
    transfers.count_writes("tcp", 0, 0, errors=1)
    revoke(master, settings, [key])
    exc.keys = exc.keys or [key]
    return exc
