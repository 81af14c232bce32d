"""Time sources for the master.

The master reads time only through a clock object passed to its constructor, so lease,
eviction, pending-timeout and liveness tests advance a ``ManualClock`` instead of sleeping.
"""

from __future__ import annotations

import threading
import time


class MonotonicClock:
    """The real clock: ``time.monotonic()`` in seconds."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to. Thread-safe.

    ``advance`` never goes backwards: a negative step raises ``kvstore.ConfigError``.
    """

    def __init__(self, start_s: float = 1000.0):
        self._now_s = float(start_s)
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self._now_s

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds``; return the new time."""
        if seconds < 0:
            from kvstore._errors import ConfigError
            raise ConfigError(f"a clock cannot go backwards (advance by {seconds})")
        with self._lock:
            self._now_s += seconds
            return self._now_s
