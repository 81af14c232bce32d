"""``signals_held``: hold SIGINT (and others) over a stretch that an interruption would leave
half done, and deliver them once it is over."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def signals_held(*signums: int, block_in_children: bool = False):
    """Record ``signums`` (default SIGINT) instead of acting on them inside the block, then
    restore their handlers and raise the first one recorded. Signals this process ignores
    stay ignored.

    With ``block_in_children`` the calling thread also blocks them, so processes spawned in
    the block start with them blocked until they set their own handling (multiprocessing
    workers that ignore SIGINT); never for servers that must answer SIGTERM. The handlers,
    not the mask, are what protects this process: a signal sent to it is delivered to any
    thread that does not block it (tqdm's monitor, gRPC's), and Python runs the handler in
    the main thread whatever its mask."""
    signums = signums or (signal.SIGINT,)
    pending: list[int] = []
    previous = {}
    for signum in signums:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda num, frame: pending.append(num))
    if block_in_children:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signums))
    try:
        yield
    finally:
        if block_in_children:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signums))
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])
