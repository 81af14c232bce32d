"""In-place transfers of KV blocks: a save gathers each block straight into the range the
store reserved for it (``kvstore.client.reserve``), a load scatters each block straight from
where it is stored (``kvstore.client.leased_views``), verifying it as it reads. Shared by
both connectors (``connector.PagedKVConnector``, ``hf_connector.DynamicCacheConnector``),
which pass the copy kernel as a callback.

NOTE: why: a gather into staging rows followed by a put, or a get into staging rows followed
by a scatter, moves every byte twice; these move it once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

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


def can_reserve(store: Any) -> bool:
    """True for a store ``put_in_place`` can use: a ``KVStore`` (not a look-alike such as
    the asyncio or Mooncake-compatible stores, which take ``batch_put``)."""
    return isinstance(store, KVStore)


def put_in_place(store: Any, keys: list[str], block_bytes: int,
                 fill: Callable[[list[int], list[memoryview]], list[int] | None]) -> list:
    """Put one block of ``block_bytes`` under each key by writing it where it is stored:
    ``reserve_puts`` hands out the reserved ranges and ``fill(positions, views)``
    writes block ``keys[positions[i]]`` into ``views[i]`` (keys stored already get no view)
    and returns each view's XXH3-64 digest, computed as it wrote (a fused gather), or None
    (the commit hashes the views); then the reservation commits; at most RESERVE_BATCH keys
    per reservation. Returns what ``batch_put`` would. NOTE: why: a gather into staging rows
    followed by a put moved every byte twice, this moves it once
    (``kvstore.client.reserve``), and the fused digest spares the commit reading it back."""
    results: list = []
    for lo in range(0, len(keys), RESERVE_BATCH):
        chunk = keys[lo:lo + RESERVE_BATCH]
        with reserve_puts(store, chunk, [block_bytes] * len(chunk)) as reservation:
            filled = [j for j, view in enumerate(reservation.views) if view is not None]
            sums: list[int | None] = [None] * len(chunk)
            if filled:
                digests = fill([lo + j for j in filled], [reservation.views[j] for j in filled])
                for j, digest in zip(filled, digests or ()):
                    sums[j] = digest
            results.extend(reservation.commit(sums))
    return results


#: scatter(first, rows, checksums): blocks ``first + j`` from ``rows[j]`` (``RowAddresses``
#: of leased ranges, or a staging tensor ``[n, block_bytes]``); with checksums, a verified scatter returning
#: per row whether it matched (and was written), else None.
ScatterRows = Callable[[int, Any, Sequence[int] | None], Sequence[bool] | None]


def load_in_place(store: Any, keys: list[str], block_bytes: int, scatter: ScatterRows,
                  staging: Callable[[int], Any]) -> tuple[int, list[str]]:
    """Load blocks ``keys[0], keys[1], ...`` (each ``block_bytes``) into the engine's cache
    by ``scatter``; returns (how many leading blocks are now in the cache, the keys that
    failed). One pass: the blocks this host's shm segments hold are scattered from leased
    views of them, each hashed and compared with its recorded checksum first (unless the
    store's config has ``verify=False``). The first block that is not (no such view, a
    checksum that does not match) and every block after it go the general way: one
    ``batch_get_into`` into ``staging(n)`` rows (other replicas, other transports; its
    errors, e.g. ChecksumMismatchError, name the key in the failed keys), then ``scatter``
    of the rows that arrived, stopping at the first that did not.

    What the cache holds afterwards: the loaded run's pages hold their blocks; a block that
    failed never had its pages written (they hold what they held); a page after the first
    failure holds what it held or its own block's verified bytes (the verified scatter runs
    the rows in parallel), never unverified bytes. Raises only what ``batch_get_into``
    raises for a whole batch (invalid arguments, ClosedError, MasterUnavailableError naming
    the keys)."""
    verify = bool(getattr(store.config, "verify", True))
    num_done = 0
    per_lease = min(LEASE_BATCH, getattr(store, "_max_batch", LEASE_BATCH))
    for lo in range(0, len(keys), per_lease):
        chunk = keys[lo:lo + per_lease]
        with lease_views(store, chunk) as leased:
            num_views = 0
            for view in leased.views:
                if view is None or view.nbytes != block_bytes:
                    break
                num_views += 1
            num_ok = 0
            if num_views:
                ok = scatter(num_done, RowAddresses(leased.addresses[:num_views], block_bytes),
                             leased.checksums[:num_views] if verify else None)
                num_ok = num_views if ok is None else _leading_true(ok)
        num_done += num_ok
        if num_ok < len(chunk):
            break
    if num_done == len(keys):
        return num_done, []
    rest = keys[num_done:]
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
