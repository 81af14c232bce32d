"""In-place transfers of KV blocks: a save gathers each block straight into the range the
store reserved for it (``kvstore.client.reserve``), a load scatters each block straight from
where it is stored (``kvstore.client.leased_views``), verifying it as it reads. Shared by
both connectors (``connector.PagedKVConnector``, ``hf_connector.DynamicCacheConnector``),
which pass the copy kernel as a callback.

NOTE: why: a gather into staging rows followed by a put, or a get into staging rows followed
by a scatter, moves every byte twice; these move it once.

Pipelined (``Worker``): a long request's keys go in chunks (``pipeline_chunks``; up to
``2 * EDGE_KEYS`` keys one chunk, inline); the copy of one chunk runs on the connector's
worker thread while this thread makes the next chunk's PutStart (or GetReplicas) and the
previous chunk's commit. NOTE: why: the RPCs of a save (PutStart, PutEnd and the durable
commit) leave the copy idle, and the kernels release the GIL, so the RPCs' Python can run
beside the copy; but each chunk costs its own RPCs, so only chunks large enough to pay for
them are split off (see EDGE_KEYS).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Sequence

from kvstore._errors import InvalidArgumentError, KeyNotFoundError
from kvstore.client.leased_views import lease_views
from kvstore.client.reserve import reserve_puts
from kvstore.client.store import KVStore
from kvstore.engine.results import block_arrived, num_leading_arrived
from kvstore.ops.rows import RowAddresses

#: Keys per reservation of an in-place save (well below the master's max_batch, 65,536 by
#: default: a reservation may hold no more).
RESERVE_BATCH = 512
#: Keys per lease of an in-place load (the same bound, for the same reason).
LEASE_BATCH = 4096
#: Keys of a pipeline's first and last chunk: their RPCs (PutStart, GetReplicas; the last
#: commit) overlap no copy. NOTE: not small: every chunk adds a reservation and a commit
#: (or a lease), ~1 ms of client CPU each on this 2-core machine under load, which cost
#: more than the overlap hid at 2,048 tokens (128 keys: chunks of 16/48/48/16 took +4 ms
#: of CPU and a longer best wall time than one chunk, bench/RESULTS.md "Engine pipeline
#: (15e)"); so requests up to 2 * EDGE_KEYS keys go in one chunk, inline.
EDGE_KEYS = 128
#: Keys of the chunks in between: enough that a chunk's copy hides the RPCs beside it.
MIDDLE_KEYS = RESERVE_BATCH
#: Threads of one in-place copy (the fused gather + hash, the verified scatter), whatever
#: torch's intra-op count is. NOTE: why two: a row's XXH3 is sequential, so one thread
#: hashes and copies at one core's pace (the gather + hash was ~55% of a 2,048-token save,
#: bench/RESULTS.md "Engine pipeline (15e)"); two threads split the rows and draw on a
#: second core's share of the memory bandwidth. Not torch's count: engines and the
#: benchmarks often pin torch to one thread for their compute, which the copy need not
#: follow; a copy holds its threads for a few ms only.
COPY_THREADS = 2


def check_copy_threads(copy_threads: int | None) -> int | None:
    """A connector's ``copy_threads``, checked: an int >= 1 (capped at the machine's CPU
    count) or None (torch's intra-op count). InvalidArgumentError else."""
    if copy_threads is None:
        return None
    if isinstance(copy_threads, bool) or not isinstance(copy_threads, int) or copy_threads < 1:
        raise InvalidArgumentError(f"copy_threads must be None or an int >= 1, got "
                                   f"{copy_threads!r}")
    return min(copy_threads, os.cpu_count() or 1)


def can_reserve(store: Any) -> bool:
    """True for a store ``put_in_place`` can use: a ``KVStore`` (not a look-alike such as
    the asyncio or Mooncake-compatible stores, which take ``batch_put``)."""
    return isinstance(store, KVStore)


def pipeline_chunks(num_keys: int, *, edge: int | None = None, middle: int | None = None,
                    limit: int = RESERVE_BATCH) -> list[tuple[int, int]]:
    """``(lo, hi)`` bounds covering ``range(num_keys)`` in order: a first and a last chunk
    of at most ``edge`` keys (None: ``EDGE_KEYS``), the rest in chunks of at most
    ``middle`` (None: ``MIDDLE_KEYS``), none over ``limit``. One chunk when ``num_keys <=
    2 * edge`` (and ``limit``)."""
    edge = EDGE_KEYS if edge is None else edge
    middle = MIDDLE_KEYS if middle is None else middle
    edge, middle = max(1, min(edge, limit)), max(1, min(middle, limit))
    if num_keys <= 2 * edge:
        return [(lo, min(num_keys, lo + limit)) for lo in range(0, num_keys, limit)]
    bounds = [(0, edge)]
    inner_hi = num_keys - edge
    for lo in range(edge, inner_hi, middle):
        bounds.append((lo, min(inner_hi, lo + middle)))
    bounds.append((inner_hi, num_keys))
    return bounds


class Worker:
    """The thread a connector's copies run on while its RPCs run on the caller's thread
    (started at the first ``submit``; one per connector, so one copy at a time). ``inline``:
    no thread, every call runs at ``submit`` (nothing overlaps: the old serial order).
    Not thread-safe: the connector's own thread submits."""

    def __init__(self, *, inline: bool = False):
        self._inline = inline
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._inline:
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # NOTE: re-raised by result(), as a thread's
                future.set_exception(exc)
            return future
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="kvstore-engine-copy")
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        """Stop the thread (after the copy in flight). Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


_INLINE = Worker(inline=True)


def put_in_place(store: Any, keys: list[str], block_bytes: int,
                 fill: Callable[[list[int], list[memoryview]], list[int] | None],
                 worker: Worker | None = None) -> tuple[list, list[bool]]:
    """Put one block of ``block_bytes`` under each key by writing it where it is stored:
    ``reserve_puts`` hands out the reserved ranges and ``fill(positions, views)``
    writes block ``keys[positions[i]]`` into ``views[i]`` (keys stored already get no view)
    and returns each view's XXH3-64 digest, computed as it wrote (a fused gather), or None
    (the commit hashes the views); then the reservation commits. Chunks of
    ``pipeline_chunks``: chunk i's ``fill`` runs on ``worker`` (None: inline) while chunk
    i+1 is reserved and chunk i-1 commits.

    Returns (what ``batch_put`` would, per key; per key whether this call wrote it: False
    for a key stored already or refused). NOTE: why: a gather into staging rows followed by
    a put moved every byte twice, this moves it once (``kvstore.client.reserve``), and the
    fused digest spares the commit reading it back.

    Errors: what ``reserve_puts`` raises for a whole call, and what ``fill`` raises; then
    every reservation not committed yet is aborted (nothing of it becomes visible, its space
    goes back), after the copy in flight has ended (so no copy writes into a range given
    back); chunks committed before stay stored."""
    chunks = pipeline_chunks(len(keys))
    # NOTE: one chunk overlaps nothing: inline, no thread hand-off
    worker = worker if worker is not None and len(chunks) > 1 else _INLINE
    results: list = [None] * len(keys)
    written = [False] * len(keys)
    open_chunks: list = []   # [(lo, reservation, filled positions, future)], oldest first

    def start(lo: int, hi: int) -> None:
        reservation = reserve_puts(store, keys[lo:hi], [block_bytes] * (hi - lo))
        filled = [j for j, view in enumerate(reservation.views) if view is not None]
        try:
            future = worker.submit(fill, [lo + j for j in filled],
                                   [reservation.views[j] for j in filled]) if filled else None
        except BaseException:
            reservation.abort()   # NOTE: no copy started: nothing writes into it
            raise
        open_chunks.append((lo, reservation, filled, future))

    def finish() -> None:
        lo, reservation, filled, future = open_chunks[0]
        digests = future.result() if future is not None else None
        sums: list[int | None] = [None] * len(reservation.views)
        for j, digest in zip(filled, digests or ()):
            sums[j] = digest
        open_chunks.pop(0)
        chunk_results = reservation.commit(sums)
        results[lo:lo + len(chunk_results)] = chunk_results
        for j in filled:
            written[lo + j] = chunk_results[j] is None

    try:
        for lo, hi in chunks:
            start(lo, hi)
            if len(open_chunks) > 1:
                finish()
        while open_chunks:
            finish()
    finally:
        _abort_all(open_chunks)
    return results, written


def _abort_all(open_chunks: list) -> None:
    """Abort the reservations left open by an error, each after its copy has ended."""
    for _, reservation, _, future in open_chunks:
        if future is not None:
            concurrent.futures.wait([future])
        reservation.abort()
    open_chunks.clear()


#: scatter(first, rows, checksums): blocks ``first + j`` from ``rows[j]`` (``RowAddresses``
#: of leased ranges, or a staging tensor ``[n, block_bytes]``); with checksums, a verified scatter returning
#: per row whether it matched (and was written), else None.
ScatterRows = Callable[[int, Any, Sequence[int] | None], Sequence[bool] | None]


def load_in_place(store: Any, keys: list[str], block_bytes: int, scatter: ScatterRows,
                  staging: Callable[[int], Any], worker: Worker | None = None, *,
                  to_first_missing: bool = False) -> tuple[int, list[str]]:
    """Load blocks ``keys[0], keys[1], ...`` (each ``block_bytes``) into the engine's cache
    by ``scatter``; returns (how many leading blocks are now in the cache, the keys that
    failed). One pass: the blocks this host's shm segments hold are scattered from leased
    views of them, each hashed and compared with its recorded checksum first (unless the
    store's config has ``verify=False``); in chunks (``pipeline_chunks``), chunk i's
    scatter on ``worker`` (None: inline) while chunk i+1 is leased. The first block that is
    not served so (no such view, a checksum that does not match) and every block after it
    go the general way: one ``batch_get_into`` into ``staging(n)`` rows (other replicas,
    other transports; its errors, e.g. ChecksumMismatchError, name the key in the failed
    keys), then ``scatter`` of the rows that arrived, stopping at the first that did not.
    ``to_first_missing``: the keys are a request's whole chain, not a known stored prefix:
    the first key the master reports not found (or still being written) ends it, and is
    no failure (the leases' answers stand in for a ``match_prefix``).

    What the cache holds afterwards: the loaded run's pages hold their blocks; a block that
    failed never had its pages written (they hold what they held); a page after the first
    failure holds what it held or its own block's verified bytes (the verified scatter runs
    the rows of a chunk in parallel, and the chunk after it may be under way), never
    unverified bytes.
    Raises only what ``batch_get_into`` raises for a whole batch (invalid arguments,
    ClosedError, MasterUnavailableError naming the keys), after the scatter in flight has
    ended and every lease is released."""
    verify = bool(getattr(store.config, "verify", True))
    per_lease = min(LEASE_BATCH, getattr(store, "_max_batch", LEASE_BATCH))
    chunks = pipeline_chunks(len(keys), limit=per_lease)
    worker = worker if worker is not None and len(chunks) > 1 else _INLINE
    num_done = 0
    num_keys = len(keys)     # shortened at the first key not found (to_first_missing)
    open_chunks: list = []   # [(lo, hi, leased, num_views, future)], oldest first

    def start(lo: int, hi: int) -> None:
        nonlocal num_keys
        leased = lease_views(store, keys[lo:hi])
        if to_first_missing:
            for j, error in enumerate(leased.errors):
                if isinstance(error, KeyNotFoundError):
                    hi = num_keys = lo + j
                    break
        num_views = 0
        for view in leased.views[:hi - lo]:
            if view is None or view.nbytes != block_bytes:
                break
            num_views += 1
        future = worker.submit(
            scatter, lo, RowAddresses(leased.addresses[:num_views], block_bytes),
            leased.checksums[:num_views] if verify else None) if num_views else None
        open_chunks.append((lo, hi, leased, num_views, future))

    def finish() -> bool:
        """Chunk 0's outcome: True when all of it arrived in place."""
        lo, hi, leased, num_views, future = open_chunks.pop(0)
        try:
            ok = future.result() if future is not None else None
        finally:
            leased.close()
        num_ok = 0 if future is None else num_views if ok is None else _leading_true(ok)
        nonlocal num_done
        num_done += num_ok
        return num_ok == hi - lo

    try:
        whole = True   # every chunk finished so far arrived whole
        for lo, hi in chunks:
            if lo >= num_keys:
                break   # the chain ended at a key not found
            if open_chunks and open_chunks[-1][3] < open_chunks[-1][1] - open_chunks[-1][0]:
                break   # NOTE: the last chunk lacks a view: no later chunk can be in place
            start(lo, hi)
            if len(open_chunks) > 1 and not finish():
                whole = False
                break
        # NOTE: after a chunk that did not arrive whole, the later chunks' blocks do not
        # count (a load is a leading run): they are only waited for and released below
        while whole and open_chunks:
            whole = finish()
    finally:
        for _, _, leased, _, future in open_chunks:
            if future is not None:
                concurrent.futures.wait([future])
            leased.close()
        open_chunks.clear()
    if num_done == num_keys:
        return num_done, []
    rest = keys[num_done:num_keys]
    rows = staging(len(rest))
    results = store.batch_get_into(rest, list(rows))
    num_more = num_leading_arrived(results, block_bytes)
    failed = [key for key, result in zip(rest, results) if not block_arrived(result, block_bytes)]
    if num_more:
        scatter(num_done, rows[:num_more], None)
    return num_done + num_more, failed


def _leading_true(flags: Sequence[bool]) -> int:
    for i, flag in enumerate(flags):
        if not flag:
            return i
    return len(flags)
