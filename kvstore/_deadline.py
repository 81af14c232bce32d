"""``Deadline``: the one way kvstore counts down the time a call has left.

Every public call has a deadline (``timeout_s``, per call or from the config); the master
calls and the transfers it makes share it. A ``Deadline`` is an absolute instant on the
monotonic clock, so a call's parts never add their timeouts up. Callers raise their own error
when it has passed (``expired``): the metadata client MasterUnavailableError, a transport
TransferTimeoutError naming its node, so every error still says what ran out of time.
"""

from __future__ import annotations

import time

#: Smallest timeout handed to a socket or an RPC: 0 or None would mean "block for ever" to
#: them, so a deadline that is (nearly) up still fails by timeout, never by hanging.
MIN_TIMEOUT_S = 1e-3


class Deadline:
    """An instant ``at_s`` on ``time.monotonic()``. Immutable; cheap to pass around."""

    __slots__ = ("at_s",)

    def __init__(self, at_s: float):
        self.at_s = at_s

    @classmethod
    def after(cls, timeout_s: float) -> "Deadline":
        """The deadline ``timeout_s`` seconds from now."""
        return cls(time.monotonic() + timeout_s)

    def remaining_s(self) -> float:
        """Seconds left (0 or negative once passed)."""
        return self.at_s - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.at_s

    def timeout_s(self, cap_s: float | None = None) -> float:
        """What is left, at most ``cap_s``, and at least ``MIN_TIMEOUT_S``: the timeout to
        give one socket operation or RPC of a call bounded by this deadline."""
        left_s = self.at_s - time.monotonic()
        if cap_s is not None and cap_s < left_s:
            left_s = cap_s
        return left_s if left_s > MIN_TIMEOUT_S else MIN_TIMEOUT_S

    def __repr__(self) -> str:
        return f"Deadline(in {self.remaining_s():.3f} s)"
