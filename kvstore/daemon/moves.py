"""Tier moves in the daemon: the copies the master orders (``TierMove`` in a heartbeat reply)
between two of this node's segments, run off the heartbeat thread.

Rule: ``MoveRunner.submit`` queues one heartbeat's moves as a batch; one worker thread copies
them in order with ``copy_range`` and records each id as done or failed; ``take_results``
hands the ids to the next heartbeat (``restore`` puts them back when that heartbeat failed,
so an acknowledgement is never lost to a broken call). When a batch ends, ``on_batch_done``
is called (the link heartbeats early: the master frees the source only once it hears).

A move fails, leaving both ranges as they were, when a segment id is unknown, a range lies
outside its segment, or the copy raises. The daemon never decides what to move: the master
allocated the destination and switches the object only after the acknowledgement.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Mapping

from kvstore.rpc.results import TierMove

log = logging.getLogger("kvstore.daemon.moves")

#: Largest piece copied at once: bounds how long one copy holds the GIL.
COPY_CHUNK_BYTES = 8 << 20


def copy_range(src_backend, src_offset: int, dst_backend, dst_offset: int,
               length: int) -> None:
    """Copy ``length`` bytes from ``src_offset`` of ``src_backend`` to ``dst_offset`` of
    ``dst_backend`` (segments with a ``view``: ``MappedSegment``: shm or a mapped file).

    Raises ValueError when a range lies outside its segment, TypeError for a segment that
    has no mapped view (e.g. HBM) and OSError from the mapping; nothing is copied then.
    """
    if not (src_backend.check_range(src_offset, length)
            and dst_backend.check_range(dst_offset, length)):
        raise ValueError(f"range [{src_offset}, +{length}) of {src_backend.segment_id} or "
                         f"[{dst_offset}, +{length}) of {dst_backend.segment_id} is outside "
                         "its segment")
    src_view = getattr(src_backend, "view", None)
    dst_view = getattr(dst_backend, "view", None)
    if src_view is None or dst_view is None:
        raise TypeError(f"cannot copy between {type(src_backend).__name__} and "
                        f"{type(dst_backend).__name__}: no mapped view")
    for start in range(0, length, COPY_CHUNK_BYTES):
        n = min(COPY_CHUNK_BYTES, length - start)
        dst_view[dst_offset + start:dst_offset + start + n] = \
            src_view[src_offset + start:src_offset + start + n]


class MoveRunner:
    """Runs the master's tier moves on one worker thread. Thread-safe."""

    def __init__(self, segments: Mapping[str, object],
                 on_batch_done: Callable[[], None] = lambda: None):
        self._segments = dict(segments)
        self._on_batch_done = on_batch_done
        self._queue: queue.Queue[list[TierMove] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._done: list[int] = []
        self._failed: list[int] = []
        self.num_copied = 0
        self.bytes_copied = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="kvstore-daemon-moves")
        self._thread.start()

    def submit(self, moves: list[TierMove]) -> None:
        """Queue one heartbeat's moves (copied in order, after earlier batches)."""
        if moves:
            self._queue.put(list(moves))

    def take_results(self) -> tuple[list[int], list[int]]:
        """The ids copied and failed since the last call (to send in a heartbeat)."""
        with self._lock:
            done, failed = self._done, self._failed
            self._done, self._failed = [], []
        return done, failed

    def restore(self, done: list[int], failed: list[int]) -> None:
        """Put back results whose heartbeat failed: the next heartbeat sends them."""
        with self._lock:
            self._done[:0] = done
            self._failed[:0] = failed

    def discard_results(self) -> None:
        """Forget results a new registration cannot know (the master forgot the moves)."""
        self.take_results()

    def stop(self) -> None:
        """Finish the current move, drop the queued ones; idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            for move in batch:
                ok = self._copy(move)
                with self._lock:
                    (self._done if ok else self._failed).append(move.move_id)
            try:
                self._on_batch_done()
            except Exception:  # noqa: BLE001 - the worker must never die
                log.exception("move batch callback failed")

    def _copy(self, move: TierMove) -> bool:
        src = self._segments.get(move.src_segment_id)
        dst = self._segments.get(move.dst_segment_id)
        if src is None or dst is None or src is dst:
            log.warning("move %d of %r: bad segments %s -> %s", move.move_id, move.key,
                        move.src_segment_id, move.dst_segment_id)
            return False
        try:
            copy_range(src, move.src_offset, dst, move.dst_offset, move.length)
        except (ValueError, TypeError, OSError, BufferError) as exc:
            log.warning("move %d of %r failed: %s", move.move_id, move.key, exc)
            return False
        self.num_copied += 1
        self.bytes_copied += move.length
        return True
