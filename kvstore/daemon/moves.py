"""Tier moves in the daemon: the copies the master orders (``TierMove`` in a heartbeat reply)
between two of this node's backends (demotion and promotion), run off the heartbeat thread.

``copy_range`` copies one range; its source is only read, never changed, so a reader of the
source keeps valid bytes whatever happens; on an exception the destination may hold a
partial copy, which is harmless because the master switches the object's replica to the
destination only after the daemon reported the move done. A source with a view (DRAM) is
copied piece by piece into the destination's ``write_stream`` buffers (to SSD: each piece's
write overlaps the next piece's memcpy, several in flight); any other source is read with
its ``read_stream`` (read ahead) into the destination's view or ``write_from``.

``MoveRunner.submit`` queues one heartbeat's moves as a batch; one worker thread copies
them in order with ``copy_range`` and records each id as done or failed; ``take_results``
hands the ids to the next heartbeat (``restore`` puts them back when that heartbeat failed,
so an acknowledgement is never lost to a broken call). When a batch ends, ``on_batch_done``
is called (the link heartbeats early: the master frees the source only once it hears). A
move fails, leaving its source as it was, when a segment id is unknown, a range lies
outside its segment, or the copy raises. The daemon never decides what to move.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Mapping

from kvstore._errors import InvalidArgumentError
from kvstore.capability import MASTER_WRITER
from kvstore.daemon.backends import Backend
from kvstore.daemon.write_guard import CapabilityRefused, RangeCommitted, WriteGuard
from kvstore.rpc.results import TierMove

log = logging.getLogger("kvstore.daemon.moves")


def copy_range(src_backend: Backend, src_offset: int, dst_backend: Backend, dst_offset: int,
               length: int) -> None:
    """Copy [src_offset, +length) of ``src_backend`` to [dst_offset, +length) of
    ``dst_backend``.

    Raises InvalidArgumentError (nothing copied) when a range lies outside its backend or
    the two ranges overlap in the same backend; OSError (or the backend's own error) when
    the I/O fails, with the destination possibly partly written (see the module docstring).
    """
    if length < 0 or not src_backend.check_range(src_offset, length):
        raise InvalidArgumentError(f"source range [{src_offset}, +{length}) is outside "
                                   f"segment {src_backend.segment_id!r}")
    if not dst_backend.check_range(dst_offset, length):
        raise InvalidArgumentError(f"destination range [{dst_offset}, +{length}) is outside "
                                   f"segment {dst_backend.segment_id!r}")
    if src_backend is dst_backend and src_offset < dst_offset + length and \
            dst_offset < src_offset + length:
        raise InvalidArgumentError("source and destination ranges overlap")
    if length == 0:
        return
    done = 0
    src_view = src_backend.view(src_offset, length)
    if src_view is not None:
        def fill(piece: memoryview) -> None:
            nonlocal done
            piece[:] = src_view[done:done + len(piece)]
            done += len(piece)

        dst_backend.write_stream(dst_offset, length, fill)
        return
    dst_view = dst_backend.view(dst_offset, length)

    def drain(piece: memoryview) -> None:
        nonlocal done
        if dst_view is not None:
            dst_view[done:done + len(piece)] = piece
        else:
            dst_backend.write_from(dst_offset + done, piece)
        done += len(piece)

    src_backend.read_stream(src_offset, length, drain)


class MoveRunner:
    """Runs the master's tier moves on one worker thread. Thread-safe."""

    def __init__(self, segments: Mapping[str, object],
                 on_batch_done: Callable[[], None] = lambda: None,
                 guard: WriteGuard | None = None):
        self._segments = dict(segments)
        self._guard = guard    # checks each destination range like a WRITE (None: no check)
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
        if self._guard is not None:
            try:
                self._guard.check(move.dst_segment_id, move.dst_offset, move.length,
                                  move.dst_capability, MASTER_WRITER)
            except (CapabilityRefused, RangeCommitted) as exc:
                log.warning("move %d of %r refused: %s", move.move_id, move.key, exc)
                return False
        try:
            copy_range(src, move.src_offset, dst, move.dst_offset, move.length)
        except (ValueError, TypeError, OSError, BufferError) as exc:
            log.warning("move %d of %r failed: %s", move.move_id, move.key, exc)
            return False
        self.num_copied += 1
        self.bytes_copied += move.length
        return True
