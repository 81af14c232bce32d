"""The daemon's drain of its commit ring (``kvstore/commit_ring.py``; durable commit for
same-host puts, issue 10).

Guarantee: every intact record is applied with exactly the checks of a CLIENT_COMMIT
(``client_commits.apply``: capability MAC, range, key, expiry, claim, removed-keys memory);
an entry that fails one is dropped and counted (``num_refused``, logged), a torn record is
dropped and counted (``num_torn``); neither is ever applied. When drained: before the
object table applies a change set (a heartbeat's, a resync, a COMMIT push: ``ObjectTable``
calls ``drain`` first) and before it builds a registration inventory, before a WRITE is
checked for RANGE_COMMITTED (the data plane's ``before_write_check``), and every
``DRAIN_INTERVAL_S`` on a thread of its own, so a ring never fills under a steady put rate.
While the table registers the ring is left alone (its records would be refused); the
registration drains it just before it starts (``MasterLink``).

Thread-safe (the ring's drain is serialized).
"""

from __future__ import annotations

import logging
import threading

from kvstore.commit_ring import RingReader
from kvstore.daemon import client_commits

log = logging.getLogger("kvstore.daemon.ring")

#: How often the drain thread looks at the ring. NOTE: a look is under a microsecond (32
#: positions compared as bytes); 20 ms keeps a 1 MiB region far from full at any put rate
#: measured here (~25 KiB per 128-key batch) and costs the host ~50 wake-ups a second.
DRAIN_INTERVAL_S = 0.02


class RingDrain:
    """Applies ``ring``'s records to ``objects`` through ``guard``'s checks."""

    def __init__(self, ring: RingReader, objects, guard):
        self.ring = ring
        self._objects = objects
        self._guard = guard
        self.num_refused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drain(self) -> int:
        """Apply every published record now (unless the table is registering); return how
        many records were applied."""
        if self._objects.registering or not self.ring.pending():
            return 0
        torn = self.ring.num_torn
        applied = self.ring.drain(self._apply)
        if self.ring.num_torn != torn:
            log.warning("commit ring: %d torn records dropped (%d in all); never applied",
                        self.ring.num_torn - torn, self.ring.num_torn)
        return applied

    def _apply(self, writer: str, body: bytes) -> None:
        try:
            refused = client_commits.apply(self._objects, self._guard, body, writer)
        except ValueError as exc:
            self.num_refused += 1
            log.warning("commit ring: record from %r does not parse, dropped: %s", writer, exc)
            return
        if refused:
            self.num_refused += len(refused)
            log.warning("commit ring: %d entries from %r refused, first: %s", len(refused),
                        writer, refused[0][1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="kvstore-daemon-ring-drain")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL_S):
            try:
                self.drain()
            except Exception:  # noqa: BLE001 - the drain thread must never die
                log.exception("commit ring drain failed")

    def stop(self) -> None:
        """Stop the thread (idempotent; the ring stays open until the daemon closes it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
