"""Asynchronous saves for the vLLM connector's worker side (``kvstore.engine.vllm``).

The engine's step only hands a request's save over (``submit``); one background thread
gathers the request's full blocks from the paged cache and writes them to the store, in the
order submitted. vLLM keeps the pages allocated until the request is reported done: the
scheduler side's ``request_finished`` returned True for every request that has a save, and
``finished`` names a request once the engine has finished it AND all its saves are over.

Guarantees:
- ``submit`` never blocks on the store (only on ``max_pending`` saves already queued, the
  back-pressure bound) and never raises for a store failure.
- ``finished(finished_req_ids)`` returns each submitted request exactly once: after the
  engine named it in some call (vLLM's ``finished_req_ids``) and its saves all ended, ok or
  failed. Requests never submitted are never returned (vLLM freed their pages at once).
- A failed save (a store error, a put refused for space, an exception while gathering) is
  reported to ``on_saved`` (an exception as a None result, and logged); it never raises into
  the engine's step. Its blocks are simply not stored, so
  a consumer finds a shorter prefix and recomputes the rest. Nothing half-written is listed:
  the store publishes an object only when its put completed.
- ``wait_for(request_ids)`` returns once those requests' saves ended (vLLM is about to reuse
  a preempted request's pages). ``close(timeout_s)`` waits for every submitted save, then
  stops the thread; later ``submit`` calls raise ClosedError.

Thread safety: ``submit``, ``finished`` and ``close`` are called from the engine's worker
thread; the stats are updated under a lock by the save thread and read by anyone.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

from kvstore._errors import ClosedError, InvalidArgumentError

log = logging.getLogger(__name__)

_STOP = object()


@dataclasses.dataclass
class SaveJob:
    """One request's save: its prompt ``token_ids`` and the pages ``block_ids`` holding them;
    ``ready``: None, or an event (``synchronize()``) the save thread waits on before reading
    the pages (a GPU cache: the step's forward may still be writing them)."""

    request_id: str
    token_ids: list[int]
    block_ids: list[int]
    ready: Any = None


class AsyncSaver:
    """Runs ``save(job) -> SaveResult`` on one background thread (see the module docstring).

    ``save``: the function that moves one job's bytes (the worker's ``PagedKVConnector.
    save_blocks`` on its own staging buffer). ``on_saved(result, seconds)``: called on the
    save thread after each save (``result`` None when it raised). ``max_pending``: saves queued or running
    before ``submit`` waits (each holds its request's pages, so this bounds how many pages
    an engine cannot reuse yet).
    """

    def __init__(self, save: Callable[[SaveJob], Any], *,
                 on_saved: Callable[[Any, float], None] | None = None, max_pending: int = 64,
                 clock: Callable[[], float] = time.perf_counter):
        if max_pending < 1:
            raise InvalidArgumentError(f"max_pending must be >= 1, got {max_pending}")
        self._save = save
        self._on_saved = on_saved or (lambda result, seconds: None)
        self._clock = clock
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Condition()
        self._num_running: collections.Counter[str] = collections.Counter()  # id -> saves not ended
        self._submitted: set[str] = set()      # ids with a save, not yet returned by finished()
        self._engine_done: set[str] = set()    # ids the engine finished, among _submitted
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvstore-vllm-saver", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        """Queue one request's save; returns at once unless ``max_pending`` are queued."""
        if self._closed:
            raise ClosedError("the connector's saver is closed")
        with self._lock:
            self._num_running[job.request_id] += 1
            self._submitted.add(job.request_id)
        self._jobs.put(job)

    def finished(self, finished_req_ids: set[str] | None) -> set[str]:
        """Requests whose pages may be freed now: finished by the engine (in this call or an
        earlier one) and with every save ended. Each is returned once."""
        with self._lock:
            self._engine_done |= set(finished_req_ids or ()) & self._submitted
            done = {r for r in self._engine_done if not self._num_running[r]}
            self._engine_done -= done
            self._submitted -= done
            for request_id in done:
                del self._num_running[request_id]
        return done

    def wait_for(self, request_ids: set[str], timeout_s: float = 60.0) -> bool:
        """Block until every save of ``request_ids`` ended; True unless ``timeout_s`` ran out."""
        with self._lock:
            return self._lock.wait_for(
                lambda: not any(self._num_running[r] for r in request_ids), timeout_s)

    def num_pending(self) -> int:
        """Saves queued or running."""
        with self._lock:
            return sum(self._num_running.values())

    def close(self, timeout_s: float = 60.0) -> bool:
        """Wait (up to ``timeout_s``) for every submitted save, then stop the thread. True when
        all ended in time. Idempotent."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            start_s = self._clock()
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                result = self._save(job)
            except Exception:  # noqa: BLE001
                # NOTE: a save never takes the engine down: the blocks are just not stored
                # and a consumer recomputes them.
                log.exception("kvstore: saving request %s failed", job.request_id)
                result = None
            try:
                self._on_saved(result, self._clock() - start_s)
            finally:
                with self._lock:
                    self._num_running[job.request_id] -= 1
                    self._lock.notify_all()
