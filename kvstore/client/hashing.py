"""The checksums of one put's values, computed off the put's critical path.

Why: a put needs its values' checksums only for PutEnd. Hashed in the calling thread while
PutStart is out (the writer's order before this module), a batch whose hash outlasts the
master's round trip (16 x 1 MiB: ~0.4-3 ms of XXH3 here against a ~0.2-0.5 ms PutStart)
delays the write checks and the transfer by the difference. Large values are therefore
hashed on a background thread from the moment PutStart is sent, while this thread waits for
the master, asks the daemons' write checks and moves the bytes (NIXL's post, the shm copy
and the socket sends release the GIL, and so does XXH3 for large buffers); ``result`` joins
before PutEnd.

When: the batch holds at least ``BACKGROUND_MIN_BYTES`` of values of at least
``BACKGROUND_MIN_VALUE_BYTES`` each. NOTE: smaller values stay in the calling thread: XXH3
keeps the GIL on short buffers, and two threads passing the GIL per 64 KiB value took 18x
the single thread's time (measured 2026-12-02 at load 17). Only one background hash runs per
process at a time; a put finding the thread busy hashes in its own thread, so concurrent
putters never queue behind each other. A forked child starts its own thread.

Guarantee: ``result`` returns the checksums of the bytes the values held while they were
hashed, in order, or raises what the hash raised; the writer always calls ``wait`` (or
``result``) before the put returns, so no thread reads a caller's buffer after the call.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

#: a batch hashes in the background from this many bytes of large values on
BACKGROUND_MIN_BYTES = 4 * 1024 * 1024
#: values shorter than this are always hashed in the calling thread
BACKGROUND_MIN_VALUE_BYTES = 1024 * 1024

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_busy = False


class Checksums:
    """The checksums of a batch's values: ``result()`` waits for them."""

    __slots__ = ("_sums", "_future")

    def __init__(self, sums: list[int] | None, future: Future | None):
        self._sums, self._future = sums, future

    @property
    def background(self) -> bool:
        return self._future is not None

    def result(self) -> list[int]:
        """The checksums, in the values' order; raises what hashing raised."""
        if self._sums is None:
            self._sums = self._future.result()
        return self._sums

    def wait(self) -> None:
        """Wait until no thread reads the values any more (errors are left to ``result``)."""
        if self._future is not None:
            self._future.exception()


def start(sources: Sequence[memoryview], hash_one: Callable[[memoryview], int], *,
          min_bytes: int = BACKGROUND_MIN_BYTES) -> Checksums:
    """Hash ``sources`` with ``hash_one``: on the background thread when the batch holds at
    least ``min_bytes`` of large values (see the module) and the thread is free, else now in
    this thread."""
    global _executor, _busy
    large = sum(src.nbytes for src in sources if src.nbytes >= BACKGROUND_MIN_VALUE_BYTES)
    if large and large >= min_bytes:
        with _lock:
            if not _busy:
                _busy = True
                if _executor is None:
                    _executor = ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="kvstore-hash")
                return Checksums(None, _executor.submit(_hash_all, sources, hash_one))
    return Checksums([hash_one(src) for src in sources], None)


def _forget_thread_in_child() -> None:
    """After fork: the child has no hash thread (an executor inherited from the parent would
    queue work that never runs), so it starts its own on first use."""
    global _executor, _busy
    _executor, _busy = None, False


os.register_at_fork(after_in_child=_forget_thread_in_child)


def _hash_all(sources: Sequence[memoryview], hash_one: Callable[[memoryview], int]) -> list[int]:
    global _busy
    try:
        return [hash_one(src) for src in sources]
    finally:
        with _lock:
            _busy = False
