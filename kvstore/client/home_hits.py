"""The master's view of home reads: the keys a client's home reads served are reported to
the master afterwards, off the caller's path, as one TouchKeys per batch (no lease).

Why: a home read (client/home_reads.py) skips the master, but the master's hit count, its
eviction recency (a key read often must not look cold) and its promotion on hit (an SSD
object read is moved up) all come from GetReplicas. The report makes the master see each
served key as if the get had asked it (a hit, the LRU mark, promotion), only later and
without a lease (a remove right after never finds the key "leased"), off the get's latency. Batched like ``leases.LeaseReleaser`` (one
thread, ``COALESCE_S``); a report that fails is dropped (the cost: that read's recency).
``flush`` sends what is queued and waits: ``KVStore`` calls it before its own puts and
``stats()``, so a client's evictions and figures see its reads in order.
"""

from __future__ import annotations

import logging
import threading

from kvstore._deadline import Deadline
from kvstore._errors import KVStoreError
from kvstore.client.leases import RELEASE_TIMEOUT_S, LeaseReleaser

log = logging.getLogger("kvstore.client.home_hits")

#: Most keys one report carries (well under the master's max_batch default).
MAX_REPORT_KEYS = 4096


class HitReporter(LeaseReleaser):
    """Batches served keys to ``master.touch_keys`` (see the module docstring)."""

    def __init__(self, master):
        super().__init__(master)
        self.num_reported = 0

    def report(self, keys: list[str]) -> None:
        """Queue ``keys`` (served by home reads). Never blocks on the master."""
        if not keys:
            return
        with self._cond:
            if self._closed:
                return
            first = not self._ids
            self._ids.extend(keys)
            if self._thread is None:
                self._thread = self._start()
            if first:
                self._cond.notify()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True, name="kvstore-home-hits")
        thread.start()
        return thread

    def _send(self, keys: list[str]) -> None:
        for start in range(0, len(keys), MAX_REPORT_KEYS):
            chunk = keys[start:start + MAX_REPORT_KEYS]
            try:
                self._master.touch_keys(chunk, deadline=Deadline.after(RELEASE_TIMEOUT_S))
                self.num_reported += len(chunk)
                self.num_calls += 1
            except KVStoreError as exc:
                log.debug("reporting %d home reads failed: %s", len(chunk), exc)
            except Exception:  # noqa: BLE001 - the thread must never die
                log.exception("reporting home reads failed unexpectedly")
