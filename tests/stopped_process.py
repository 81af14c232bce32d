"""Stopping a server process with SIGSTOP so that it really runs no more code.

``os.kill(pid, SIGSTOP)`` returns once the signal is queued, not once the process stopped:
the kernel hands the stop to one of its threads, and until that thread is scheduled the
others keep running. A data-plane thread woken by a push in that window still applies it and
answers (seen: a daemon confirmed a master's COMMIT 0.9 ms after ``os.kill`` returned, so a
put the test expected to fail was, correctly, durable and acknowledged; issue 10). Tests
that need a silent process use ``stop_process`` or ``stopped``, which return only once every
thread of the process is in the stopped state (``T`` in ``/proc/PID/task/*/stat``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

#: How long ``stop_process`` waits for every thread to stop before failing the test.
STOP_TIMEOUT_S = 10.0


def thread_states(pid: int) -> str:
    """One state letter per thread of ``pid`` (``/proc/PID/task/*/stat``: R running, S/D
    sleeping, T stopped, t traced, Z zombie); empty if the process is gone."""
    states = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return ""
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                # NOTE: the command name (field 2) may hold spaces and parentheses
                states.append(stat.read().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue     # a thread that exited meanwhile
    return "".join(states)


def stop_process(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads is stopped, so it answers
    nothing until SIGCONT. AssertionError naming the threads' states if that takes longer
    than ``timeout_s`` or the process is gone (it cannot be what the test expects)."""
    os.kill(pid, signal.SIGSTOP)
    deadline_s = time.monotonic() + timeout_s
    while True:
        states = thread_states(pid)
        # NOTE: an exited thread (Z, X) runs nothing either; a process with no other is gone
        alive = "".join(state for state in states if state not in "ZX")
        assert alive, f"process {pid} is gone (thread states {states!r})"
        if all(state in "Tt" for state in alive):
            return
        assert time.monotonic() < deadline_s, \
            f"process {pid} did not stop within {timeout_s:g}s (thread states {states!r})"
        time.sleep(0.001)   # NOTE: the stop completes as soon as its threads are scheduled


@contextlib.contextmanager
def stopped(pid: int):
    """``stop_process(pid)`` for the ``with`` block; SIGCONT however it ends."""
    try:
        stop_process(pid)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
