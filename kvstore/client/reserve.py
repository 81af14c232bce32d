"""Zero-staging puts: the store reserves each object's space and hands out writable views of
it; the caller writes the bytes there itself, then commits them.

    from kvstore.client.reserve import reserve_puts

    with reserve_puts(store, keys, sizes) as reservation:
        for view in reservation.views:     # a writable memoryview, or None: nothing to write
            ...                            # fill the view (e.g. gather KV pages into it)
        results = reservation.commit()     # None or the error, per key

Why: a put copies its source into the segment, so a caller that builds the value first (an
engine gathering KV pages into staging rows) moves every byte twice. Here the value is built
where it is stored: one pass. Where the first replica lies in a DRAM segment this process
maps (shm), the view is that range of the segment; elsewhere (tcp, nixl) it is a private
buffer the commit writes out like a put, so the API works on every transport.

Flow: the same calls as a put (``kvstore.client.writer``): PutStart when the reservation is
made (the objects are PENDING: invisible to readers), then at ``commit`` the checksums of the
views, the writes of the other replicas, and the put's own PutEnd (``writer.end_put``: the
daemons' commits where the master asks for them). A key that is stored already gets no view
and is a success; a key the master refused gets no view and its error.

Guarantees: nothing is visible before ``commit``; a reservation left without ``commit`` (an
exception in the block, an explicit ``abort``) gives every reserved range back (PutRevoke),
and so does a failed write. The views are released at commit/abort, so a late write through
one raises ValueError instead of landing in space the master may have reused. The caller
must write every byte of a view: unwritten bytes hold whatever the segment held. Not
thread-safe (one reservation, one thread); reservations of different threads are
independent. Errors: InvalidArgumentError (bad keys, sizes, a repeated key), the whole-call
errors of a put (MasterUnavailableError, ...) from ``reserve_puts`` itself; per-key errors in
``commit``'s results.

NOTE: a function of this module, not a ``KVStore`` method: its views point into this
process's mappings, which ``kvstore.aio.AsyncKVStore`` (every method a coroutine on a worker
thread) could not hand out safely. It runs on the store's own master client and transfers.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvstore._errors import InvalidArgumentError, KVStoreError
from kvstore.client import writer
from kvstore.client.checksum import checksum
from kvstore.client.key_checks import check_key, check_keys, check_node_id
from kvstore.client.transfer import Transfers
from kvstore.client.values import release_views
from kvstore.client.writer import PutSettings, check_replicas, check_tier
from kvstore.rpc import MasterClient


def reserve_puts(store: Any, keys: Sequence[str], sizes: Sequence[int], *, replicas: int = 1,
                 timeout_s: float | None = None, tier: str | None = None,
                 near_node: str | None = None) -> "PutReservation":
    """Reserve ``sizes[i]`` bytes for ``keys[i]`` on ``store`` (a ``KVStore``) and hand out
    writable views to fill in place, then ``commit()``: a zero-staging ``batch_put``. Use
    as a context manager: leaving it without commit gives the space back. At most the
    master's max_batch distinct keys; options and errors as ``KVStore.batch_put``
    (ClosedError for a closed store)."""
    store._check_open()
    keys, sizes = check_reservation(keys, sizes, store._max_batch)
    settings = PutSettings(
        replicas=check_replicas(replicas), deadline=store._deadline(timeout_s),
        client_id=store.client_id, host_id=store.host_id, tier=check_tier(tier),
        near_node_id=check_node_id(near_node))
    with store._closing_guard:
        return PutReservation(store._master, store._transfers, keys, sizes, settings)


def prefault(store: Any) -> int:
    """Populate this process's page tables for every shared-memory segment ``store`` has
    mapped so far (a segment is mapped by the first transfer that reaches it), so later
    reservations, puts and gets into them skip the first-touch cost (about 1 ms per 2 MiB
    chunk on a loaded 2-core machine: a third of a 32 MiB save into fresh space). For an
    engine's start-up, after a first round trip; costs about that per chunk of the whole
    segment once, so an engine with a very large pool may prefer to pay it as it goes.
    Returns the bytes covered; never raises."""
    return sum(transport.populate_mapped() for transport in store._transfers.transports
               if hasattr(transport, "populate_mapped"))


class PutReservation:
    """The ranges of one ``reserve_puts`` call; see the module docstring."""

    def __init__(self, master: MasterClient, transfers: Transfers, keys: list[str],
                 sizes: list[int], settings: PutSettings):
        self._master = master
        self._transfers = transfers
        self._settings = settings
        self._keys = keys
        self._results: list[KVStoreError | None] = [None] * len(keys)
        self._done = False
        pending = master.begin_put_start(
            keys, sizes, client_id=settings.client_id, replicas=settings.replicas,
            near_host_id=settings.host_id, near_node_id=settings.near_node_id,
            tier=settings.tier, soft_pin_ttl_s=settings.soft_pin_ttl_s,
            hard_pin=settings.hard_pin, deadline=settings.deadline)
        try:
            self._slots = pending.result()
        except KVStoreError:
            raise   # a failed PutStart started nothing
        except BaseException:
            # NOTE: interrupted before the reply was read: the put's own clean-up (read the
            # reply, revoke what it started)
            writer.abandon_start(master, settings, pending, keys)
            raise
        self._started = [j for j, slot in enumerate(self._slots) if isinstance(slot, list)]
        #: per key: the writable view to fill, or None (stored already, or refused)
        self.views: list[memoryview | None] = [None] * len(keys)
        # per started key: the replica its view is (None: a private buffer, written at commit)
        self._view_target: dict[int, Any] = {}
        # NOTE: one check that a segment is still linked (an fstat) per segment of the
        # reservation, not per key: 128 fstats were ~10% of a 128-key PutStart's client CPU
        checked: set[str] = set()
        try:
            for j, slot in enumerate(self._slots):
                if isinstance(slot, KVStoreError):
                    self._results[j] = slot
            for j in self._started:
                if not self._slots[j]:
                    self._results[j] = KVStoreError(
                        f"put {keys[j]!r}: master allocated no replica", keys=[keys[j]])
                    continue
                self.views[j], self._view_target[j] = self._view_of(self._slots[j], sizes[j],
                                                                    checked)
        except BaseException:
            self.abort()
            raise

    def _view_of(self, targets: list, size: int, checked: set[str]) -> tuple[memoryview, Any]:
        """The first replica's range when this process maps its segment, else a buffer.
        ``checked``: the segments this reservation found linked so far (``writable_range``)."""
        for target in targets:
            transport = self._transfers.transport_for(target)
            if transport is not None and hasattr(transport, "writable_range"):
                try:
                    return transport.writable_range(target, checked), target
                except KVStoreError:
                    break  # NOTE: the commit's write reports this replica's failure
        return memoryview(bytearray(size)), None

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def commit(self, checksums: Sequence[int | None] | None = None
               ) -> list[KVStoreError | None]:
        """Make every filled object visible: None (stored) or the error, per key, in order.
        Once only (InvalidArgumentError after commit or abort).

        ``checksums``: per key, the XXH3-64 of its view's bytes as the caller computed them
        while filling the view (``kvstore.ops`` gathers with ``checksums=True``), or None:
        commit hashes that view itself. NOTE: why: hashing a view it just filled reads every
        byte back from DRAM (a third of a save's CPU); a fused gather has the digest already.
        The caller vouches for it: a wrong one is recorded, and every read of that object
        then fails its checksum (ChecksumMismatchError), nothing wrong is returned. A bad
        ``checksums`` (length, a non-int or out-of-range value) raises InvalidArgumentError
        before anything is committed, and the reservation stays open."""
        self._check_open()
        given = check_checksums(checksums, len(self._keys))
        self._done = True
        settings, names = self._settings, self._keys
        written = [j for j in self._started if self.views[j] is not None]
        sums = [0] * len(names)
        items = []
        try:
            for j in written:
                sums[j] = given[j] if given[j] is not None else checksum(self.views[j])
                for target in self._slots[j]:
                    if target is not self._view_target[j]:
                        items.append((j, names[j], target, self.views[j]))
            failures = self._transfers.write(items, deadline=settings.deadline) if items else {}
        except BaseException:
            release_views(self.views)
            writer.revoke(self._master, settings, [names[j] for j in self._started])
            raise
        release_views(self.views)
        for j, error in failures.items():
            self._results[j] = error
        # NOTE: a set: ``j not in written`` over the list cost ~1.4 ms per 128-key commit
        filled = set(written)
        revoke = [names[j] for j in self._started if j in failures or j not in filled]
        writer.revoke(self._master, settings, revoke)
        committed = [j for j in written if j not in failures]
        if committed:
            writer.end_put(self._master, self._transfers, settings, committed,
                        list(range(len(names))), names, sums, self._results, self._slots)
        return list(self._results)

    def abort(self) -> None:
        """Give every reserved range back; nothing becomes visible. Idempotent."""
        if self._done:
            return
        self._done = True
        release_views(self.views)
        writer.revoke(self._master, self._settings, [self._keys[j] for j in self._started])

    def _check_open(self) -> None:
        if self._done:
            raise InvalidArgumentError("this reservation was committed or aborted already")

    def __enter__(self) -> "PutReservation":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


def check_reservation(keys: Sequence[str], sizes: Sequence[int], max_batch: int
                      ) -> tuple[list[str], list[int]]:
    """The keys and sizes of a ``reserve_puts`` call, checked: distinct valid keys, one int
    size >= 1 each, at most ``max_batch`` keys (one PutStart). InvalidArgumentError else."""
    keys = [check_key(key) for key in check_keys(keys)]
    if isinstance(sizes, (str, bytes)) or len(sizes) != len(keys):
        raise InvalidArgumentError(f"{len(keys)} keys but sizes is {sizes!r:.60}")
    sizes = list(sizes)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgumentError(f"sizes must be ints >= 1, got {size!r}")
    if len(set(keys)) != len(keys):
        raise InvalidArgumentError("keys of one reservation must be distinct")
    if len(keys) > max_batch:
        raise InvalidArgumentError(f"{len(keys)} keys: a reservation holds at most the "
                                   f"master's max_batch ({max_batch})")
    return keys, sizes


def check_checksums(checksums: Sequence[int | None] | None, num_keys: int) -> list[int | None]:
    """``commit``'s checksums, checked: None (hash every view), or one entry per key: None
    or an int in [0, 2**64). InvalidArgumentError else."""
    if checksums is None:
        return [None] * num_keys
    if isinstance(checksums, (str, bytes)) or len(checksums) != num_keys:
        raise InvalidArgumentError(f"{num_keys} keys but checksums is {checksums!r:.60}")
    checked = list(checksums)
    for value in checked:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or
                                  not 0 <= value < 1 << 64):
            raise InvalidArgumentError(f"checksums must be None or ints in [0, 2**64), got "
                                       f"{value!r:.40}")
    return checked
