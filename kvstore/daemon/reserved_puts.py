"""WRITE_RESERVED (data-plane op 18): a writer's single tcp put into space it reserved, made
visible by this daemon, so that the put is two round trips on its critical path (the
writer's to this daemon, this daemon's PutEnd to the master) instead of three (PutStart,
WRITE_COMMIT, PutEnd; issue 15, 15u).

Flow, once the data plane checked the WRITE (the reservation's capability covers the range,
it has not expired, no committed range is overwritten: ``WriteGuard.check``) and received
the payload into the segment: (1) PutEnd naming the reservation, with the writer's
``client_id``, the key's offset, size and checksum and ``client_committed``, sent by this
daemon to its master (``MasterClient.put_end_reserved_committing``): the master checks the
range against the reservation (live, the writer's, inside, aligned, no overlap) and records
the key COMPLETE; (2) the commit into this node's table with the per-key capability
PutEnd returned (``client_commits.apply_one``: the CLIENT_COMMIT checks); (3) the reply.

Guarantees:
- Durable when acknowledged (issue 10): OK is sent only once the master recorded the key
  and this node's table holds it (or, where the master sent no capability, its own push,
  which PutEnd waited for, applied it), so a master restarted after a SIGKILL adopts it
  from this node's inventory.
- Confined (issue 14): the bytes land only inside the reservation's range (the WRITE
  check), and the master commits only a range inside the reservation it names, which is
  the writer's (``client_id``; the caller is this daemon, the cluster principal, which is
  the only principal reservations are granted to: tenants get none).
- No orphan: nothing is committed here before the master recorded the key, so a writer
  that dies at any point leaves no object the master does not know (the objection to a
  daemon-side commit under a reservation in docs/ARCHITECTURE.md, Reservations), and a
  master that refused it leaves nothing to remove.
Errors (replied, the connection stays usable; see ``data_frames``): RESERVATION_GONE (the
master no longer knows the reservation, nothing committed), PUT_REFUSED (the master refused
the key), CAPABILITY_REFUSED (this node's commit refused after the master recorded the key:
the writer removes it), INTERNAL (the master unreachable or timing out: the key may be
visible or not, as after any lost reply).

Thread-safe: each data-plane thread calls ``serve``; the master client is created once, on
first use, under a lock (a fast-path client: its carrier pools one connection per call in
flight, so concurrent writers' PutEnds do not wait for each other).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from kvstore._deadline import Deadline
from kvstore._errors import KeyNotFoundError, KVStoreError
from kvstore.daemon import client_commits
from kvstore.daemon.objects import ObjectTable
from kvstore.daemon.write_guard import WriteGuard
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Status

log = logging.getLogger("kvstore.daemon.dataplane")

_OK_REPLY = int(Status.OK)


class ReservedPuts:
    """The daemon's side of WRITE_RESERVED (see the module docstring).

    ``connect``: returns a ``MasterClient`` of this node's master (called once, lazily: a
    daemon that never serves a WRITE_RESERVED opens no second master connection);
    ``timeout_s``: the longest one PutEnd may take."""

    def __init__(self, objects: ObjectTable, guard: WriteGuard, connect: Callable[[], object],
                 *, timeout_s: float):
        self._objects = objects
        self._guard = guard
        self._connect = connect
        self._timeout_s = timeout_s
        self._master = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the master client, if one was opened. Idempotent."""
        with self._lock:
            master, self._master = self._master, None
        if master is not None:
            master.close()

    def serve(self, conn: socket.socket, segment_id: str, offset: int, length: int,
              tail: tuple[str, int, int, str], request_id: int, principal: str) -> None:
        """Make the landed bytes ``[offset, +length)`` of ``segment_id`` visible as the
        tail's key, then reply (OK or the refusal)."""
        key, checksum, reservation_id, client_id = tail
        status, message = self._commit(key, segment_id, offset, length, checksum,
                                       reservation_id, client_id, principal)
        if status == Status.OK:
            conn.sendall(data_frames.REPLY.pack(_OK_REPLY, 0, 0, request_id, 0))
            return
        log.warning("data plane: WRITE_RESERVED of %r refused: %s: %s", key, status.name,
                    message)
        conn.sendall(data_frames.encode_reply(status, request_id, 0, message))

    def _commit(self, key: str, segment_id: str, offset: int, length: int, checksum: int,
                reservation_id: int, client_id: str, principal: str) -> tuple[Status, str]:
        try:
            (ended,), caps = self._client().put_end_reserved_committing(
                reservation_id, [key], [offset], [length], [checksum], client_id=client_id,
                deadline=Deadline.after(self._timeout_s), client_committed=True)
        except KVStoreError as exc:
            return Status.INTERNAL, f"the master's PutEnd failed: {exc}"
        if isinstance(ended, KeyNotFoundError):
            return Status.RESERVATION_GONE, str(ended)
        if ended is not None:
            return Status.PUT_REFUSED, str(ended)
        if not caps or not caps[0]:
            # NOTE: no capability: the key existed already (a success, its range unused),
            # or the master committed it itself with its push, which PutEnd waited for
            return Status.OK, ""
        refused = client_commits.apply_one(self._objects, self._guard, key, segment_id,
                                           offset, length, checksum, caps[0], principal)
        if refused:
            return Status.CAPABILITY_REFUSED, f"commit refused: {refused[0][1]}"
        return Status.OK, ""

    def _client(self):
        master = self._master
        if master is not None:
            return master
        with self._lock:
            if self._master is None:
                self._master = self._connect()
            return self._master


__all__ = ["ReservedPuts"]
