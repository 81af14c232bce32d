"""Waiting on what other processes do (their heartbeats, their tables), where no clock of
the test's own can be advanced, and the client figures the cache tests look at."""

from __future__ import annotations

import time


def wait_for(predicate, what: str, timeout_s: float = 30.0):
    """``predicate()``'s first truthy value, polled every 50 ms; fails the test naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def master_hits(store) -> int:
    """How many key hits the master counted for ``store``'s cluster so far."""
    return store.stats()["master"]["hits"]
