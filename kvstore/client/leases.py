"""Ending read leases when the reads are done: a get hands its lease id here, and one
background thread sends the ids to the master in batches (ReleaseLeases).

Why off the caller's path: the get's bytes are already in the caller's hands; waiting for a
release round trip would add a master call to every get. Ids handed in while a release is in
flight go in the next one, so under load one call carries many ids. A release that fails
(master unreachable, store closing) is dropped: the lease TTL still ends those leases, which
is the bound for readers that crash as well.
"""

from __future__ import annotations

import logging
import threading

from kvstore._deadline import Deadline
from kvstore._errors import KVStoreError

log = logging.getLogger("kvstore.client.leases")

#: Deadline of one ReleaseLeases call (seconds); a late release only costs TTL time.
RELEASE_TIMEOUT_S = 2.0
#: How long ids gather after the first one before the thread sends them. NOTE: a loop of
#: single gets then costs one release call per window instead of one per get (each call is a
#: master round trip and a wake-up that competes with the next get).
COALESCE_S = 0.005


class LeaseReleaser:
    """Batches lease ids to ``master.release_leases``; the thread starts at the first id."""

    def __init__(self, master):
        self._master = master
        self._cond = threading.Condition()
        self._ids: list[int] = []
        self._closed = False
        self._sending = 0           # release calls in flight (the thread's or a flush's)
        self._thread: threading.Thread | None = None
        self.num_calls = 0
        self.num_released = 0

    def release(self, lease_id: int) -> None:
        """Queue ``lease_id`` (0: nothing). Never blocks on the master."""
        if not lease_id:
            return
        with self._cond:
            if self._closed:
                return
            self._ids.append(lease_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="kvstore-lease-release")
                self._thread.start()
            if len(self._ids) == 1:     # the first of a window wakes the thread
                self._cond.notify()

    def flush(self) -> None:
        """Release every id handed in so far before returning (best effort, as the thread
        does): the queued ids are sent now, and a release already in flight is waited for.
        Called before this store's own removes, so a get just returned never makes the same
        client's remove find its key "leased by a reader"."""
        with self._cond:
            ids = self._take()
        self._send_taken(ids)
        with self._cond:
            self._cond.wait_for(lambda: not self._sending, timeout=RELEASE_TIMEOUT_S)

    def close(self) -> None:
        """Send what is queued (best effort) and stop the thread. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=RELEASE_TIMEOUT_S + 1)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ids and not self._closed:
                    self._cond.wait()
                if not self._closed:
                    self._cond.wait(COALESCE_S)   # let more ids gather (close wakes it)
                ids = self._take()
                closed = self._closed
            self._send_taken(ids)
            if closed:
                return

    def _take(self) -> list[int]:
        """The queued ids, counted as in flight until ``_send_taken`` (under ``_cond``)."""
        ids, self._ids = self._ids, []
        if ids:
            self._sending += 1
        return ids

    def _send_taken(self, ids: list[int]) -> None:
        """Send ids from ``_take`` (outside ``_cond``), then wake whoever waits for them."""
        if not ids:
            return
        try:
            self._send(ids)
        finally:
            with self._cond:
                self._sending -= 1
                self._cond.notify_all()

    def _send(self, ids: list[int]) -> None:
        try:
            self.num_released += self._master.release_leases(
                ids, deadline=Deadline.after(RELEASE_TIMEOUT_S))
            self.num_calls += 1
        except KVStoreError as exc:
            log.debug("releasing %d leases failed (their TTL ends them): %s", len(ids), exc)
        except Exception:  # noqa: BLE001 - the thread must never die
            log.exception("releasing leases failed unexpectedly")
