"""The location cache: a repeated get of a key read before skips the master.

A get is GetReplicas (a master round trip) and the read. ``LocationCache`` keeps, per key
this client read over TCP (a bounded LRU of ``ClientConfig.location_cache_entries``; 0
turns it off), the replica it read: node, segment, range and the object's checksum. A
repeated get sends that node a CHECKED_READ (``transport/checked_read.py``) carrying the key
and checksum; the daemon serves it only while its own object table holds that object over
that range and it holds a location lease (``daemon/location_reads.py``), else it refuses
(LOCATION_STALE, or LOCATION_OFF for the whole node). The bytes are verified against the
cached checksum. Any refusal, error or mismatch drops the entry and the key goes through
the master as before (``reader.get_batch``), whose successful TCP reads refresh the entry.

Guarantee: a cached get returns the key's bytes as last committed on that daemon, checked
by their checksum, and never a key whose remove completed (the windows, one by one, are in
docs/ARCHITECTURE.md, Location cache). A cached get takes no read lease and counts no hit
at the master (eviction's recency does not see it).

Same-host reads through shm share the LRU (and ``location_cache_entries``): there the
client copies from the segment itself, and the daemon's shm location table, not a
CHECKED_READ, proves the object current (``client/shm_locations.py``; a ``CachedShm``
entry). Not cached: empty values (no transfer), tenants' clients (their daemons record
keys namespaced: ``KVStore`` builds no cache for them). A node that answers LOCATION_OFF is not asked again for
``NODE_OFF_S``. Thread-safe (one lock; reads run outside it).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvstore._deadline import Deadline
from kvstore._errors import InvalidArgumentError
from kvstore.client.checksum import checksum, is_empty_marker
from kvstore.client.shm_locations import CachedShm, ShmTables, entry_for, read_cached
from kvstore.client.values import as_destination, finish_bytes
from kvstore.transport.base import Target
from kvstore.transport.checked_read import encode_identity
from kvstore.transport.data_frames import Status

#: How long a node that answered LOCATION_OFF (no lease: its master is unreachable, or
#: grants none, or its first up-to-date heartbeat has not come yet) is read through the
#: master only. NOTE: short against the 1 s heartbeat that renews a lapsed lease (1.0 s
#: kept a whole benchmark phase on the master path after one refusal at a daemon's
#: start), long enough that a node granting none costs at most 5 refused reads a second
NODE_OFF_S = 0.2
DEFAULT_ENTRIES = 65536   # ClientConfig.location_cache_entries; ~300 B a key: ~20 MiB


@dataclass(frozen=True, slots=True)
class CachedLocation:
    """Where a key's bytes were read last: ``target`` with its identity as capability."""

    target: Target
    size_bytes: int
    checksum: int


class LocationCache:
    """key -> CachedLocation, least recently used dropped first (see the module)."""

    def __init__(self, transport, max_entries: int = DEFAULT_ENTRIES, *,
                 clock: Callable[[], float] = time.monotonic, shm=None):
        self.transport = transport          # the TcpTransport whose reads are cached (or None)
        self.shm = shm                      # the ShmTransport whose reads are cached (or None)
        self.shm_tables = ShmTables() if shm is not None else None
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._key_to_location: OrderedDict[str, CachedLocation | CachedShm] = OrderedDict()
        self._node_off_until_s: dict[str, float] = {}
        self.num_hits = 0        # keys served from a cached location
        self.num_misses = 0      # keys not cached (or on a node that is off)
        self.num_refused = 0     # cached locations refused or failed (then the master path)
        self.num_shm_hits = 0    # of num_hits, those copied from a same-host segment

    def __len__(self) -> int:
        with self._lock:
            return len(self._key_to_location)

    def lookup(self, key: str) -> CachedLocation | CachedShm | None:
        """The key's entry (now the most recently used), or None: none, or its node
        answered LOCATION_OFF within ``NODE_OFF_S``."""
        with self._lock:
            location = self._key_to_location.get(key)
            if location is None:
                return None
            if type(location) is CachedLocation:
                off_until_s = self._node_off_until_s.get(location.target.node_id)
                if off_until_s is not None and self._clock() < off_until_s:
                    return None
            self._key_to_location.move_to_end(key)
            return location

    def remember(self, key: str, target: Target, size_bytes: int, expected: int) -> None:
        """Cache the replica ``target`` a read of ``key`` just got verified bytes from."""
        if is_empty_marker(size_bytes, expected):
            return
        self._insert(key, CachedLocation(
            target._replace(capability=encode_identity(key, expected, target.capability)),
            size_bytes, expected))

    def remember_checked(self, key: str, target: Target, size_bytes: int,
                         expected: int) -> None:
        """Cache ``target``, whose capability is already the identity of ``key``'s object
        (``encode_identity``: a home read's LOCATED range, client/home_reads.py)."""
        self._insert(key, CachedLocation(target, size_bytes, expected))

    def remember_shm(self, key: str, target: Target, size_bytes: int, expected: int) -> None:
        """Cache the same-host replica ``target`` a read of ``key`` just got verified bytes
        from, if its segment's location table vouches for it (client/shm_locations.py)."""
        if self.shm_tables is None or is_empty_marker(size_bytes, expected):
            return
        entry = entry_for(self.shm_tables, key, target, size_bytes, expected)
        if entry is not None:
            self._insert(key, entry)

    def insert_many(self, entries: list[tuple[str, CachedShm]]) -> None:
        """Cache ``(key, entry)`` pairs (client/shm_batch.py's vouched keys), one lock."""
        table = self._key_to_location
        with self._lock:
            # NOTE: update (in C) appends new keys at the end, the most recent; a key still
            # there keeps its place (it was read through the master: its entry had gone,
            # or it is about to be refused)
            table.update(entries)
            while len(table) > self.max_entries:
                table.popitem(last=False)

    def _insert(self, key: str, location: CachedLocation | CachedShm) -> None:
        with self._lock:
            self._key_to_location[key] = location
            self._key_to_location.move_to_end(key)
            if len(self._key_to_location) > self.max_entries:
                self._key_to_location.popitem(last=False)

    def remember_reads(self, jobs, failures: dict) -> None:
        """Cache each ReadJob (client/transfer.py) that succeeded over this transport."""
        for job in jobs:
            if job.index in failures:
                continue
            target, transport = job.candidates[job.attempt]
            if transport is self.transport:
                self.remember(job.key, target, job.dst.nbytes, job.expected_checksum)
            elif transport is self.shm and transport is not None:
                self.remember_shm(job.key, target, job.dst.nbytes, job.expected_checksum)

    def touch(self, used: list[str], failed: list[tuple[str, CachedShm]]) -> None:
        """Mark the keys ``used`` recently used and drop the ``failed`` entries (a read
        the cache could not serve: then the master path, which caches the key again)."""
        table = self._key_to_location
        with self._lock:
            for key in used:
                if key in table:
                    table.move_to_end(key)
            for key, entry in failed:
                if table.get(key) is entry:
                    del table[key]
            self.num_refused += len(failed)

    def forget(self, key: str) -> None:
        with self._lock:
            self._key_to_location.pop(key, None)

    def count(self, *, hits: int, misses: int, shm_hits: int = 0) -> None:
        with self._lock:
            self.num_shm_hits += shm_hits
            self.num_hits += hits
            self.num_misses += misses

    def refused(self, key: str, location: CachedLocation, exc: BaseException) -> None:
        """A location read of ``key`` failed (``exc``): drop the entry; a LOCATION_OFF
        refusal turns its node off for ``NODE_OFF_S``."""
        with self._lock:
            self.num_refused += 1
            if self._key_to_location.get(key) is location:
                del self._key_to_location[key]
            if getattr(exc, "status", None) == Status.LOCATION_OFF:
                self._node_off_until_s[location.target.node_id] = self._clock() + NODE_OFF_S

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._key_to_location), "hits": self.num_hits,
                    "misses": self.num_misses, "refused": self.num_refused,
                    "shm_hits": self.num_shm_hits}


# A get of the keys the cache could not serve: (keys, outs or None) -> one result per key.
Fetch = Callable[[list, "list | None"], list]


def fetch_rest(results: list, rest: list[int], keys: Sequence[str],
               outs: Sequence[Any] | None, fetch: Fetch) -> list:
    """``results`` with the positions ``rest`` (the keys a shortcut did not serve) filled
    by one ``fetch`` of those keys, in key order."""
    if rest:
        rest.sort()
        fetched = fetch([keys[i] for i in rest],
                        [outs[i] for i in rest] if outs is not None else None)
        for i, result in zip(rest, fetched):
            results[i] = result
    return results


def location_cache_for(transfers, max_entries: int) -> LocationCache | None:
    """A cache over the TCP and shm transports of ``transfers`` (client/transfer.py); None
    when ``max_entries`` is 0 or there is neither."""
    tcp = next((t for t in transfers.transports if t.name == "tcp"), None)
    shm = next((t for t in transfers.transports if t.name == "shm"), None)
    if not max_entries or (tcp is None and shm is None):
        return None
    return LocationCache(tcp, max_entries, shm=shm)


def get_cached(cache: LocationCache, keys: Sequence[str], outs: Sequence[Any] | None,
               allocate, deadline: Deadline, fetch: Fetch, transfers) -> list[Any]:
    """Results of ``reader.get_batch`` for ``keys`` (checked, valid): cached keys by
    location reads (same-host ones in one guarded ``read_ranges`` call), the rest (and every
    key whose cached read failed) by ``fetch``. The reads served are counted in
    ``transfers``' stats (under the transport's name)."""
    table = cache._key_to_location
    # NOTE: without the lock (dict.get is atomic): a batch pays comprehensions, not a
    # locked lookup per key
    found = [table.get(key) for key in keys] if table else None
    if not found or not any(found):
        cache.count(hits=0, misses=len(keys))
        return fetch(list(keys), outs)
    results: list[Any] = [None] * len(keys)
    rest = [i for i, entry in enumerate(found) if entry is None]
    num_misses = len(rest)
    shm_positions = [i for i, entry in enumerate(found) if type(entry) is CachedShm]
    shm_ok = _read_shm(cache, keys, outs, allocate, found, shm_positions, results, rest,
                       transfers) if shm_positions else 0
    served, items = [], []
    for i, location in enumerate(found):
        if location is None or type(location) is CachedShm:
            continue
        location = cache.lookup(keys[i])
        if location is None or type(location) is CachedShm:
            rest.append(i)
            num_misses += 1
            continue
        size = location.size_bytes
        if outs is None:
            holder, dst = allocate(size)
        else:
            try:
                dst = as_destination(outs[i])
            except InvalidArgumentError:
                rest.append(i)         # the master path reports it, as without a cache
                continue
            if dst.nbytes < size:
                rest.append(i)
                continue
            dst, holder = dst[:size], size
        served.append((i, location, holder))
        items.append((location.target, dst))
    if items:
        remaining_s = deadline.remaining_s()
        errors = (cache.transport.read_checked_many(items, timeout_s=remaining_s)
                  if remaining_s > 0 else [TimeoutError()] * len(items))
        num_ok = num_bytes = 0
        for (i, location, holder), (_, dst), exc in zip(served, items, errors):
            if exc is None and checksum(dst) != location.checksum:
                exc = ValueError("checksum mismatch")   # a range reused since: refused
            if exc is not None:
                cache.refused(keys[i], location, exc)
                rest.append(i)
                continue
            results[i] = finish_bytes(holder) if outs is None else holder
            num_ok += 1
            num_bytes += location.size_bytes
        transfers.count_reads(cache.transport.name, num_ok, num_bytes)
    cache.count(hits=len(keys) - len(rest), misses=num_misses, shm_hits=shm_ok)
    return fetch_rest(results, rest, keys, outs, fetch)


def _read_shm(cache: LocationCache, keys: Sequence[str], outs: Sequence[Any] | None,
              allocate, found: list, positions: list[int], results: list, rest: list[int],
              transfers) -> int:
    """The cached same-host keys at ``positions``: one guarded read (client/shm_locations.py);
    fills ``results``, appends the keys it could not serve to ``rest`` (their entries
    dropped); returns how many it served."""
    entries = [found[i] for i in positions]
    if outs is None:
        pairs = [allocate(entry.size_bytes) for entry in entries]
        written = read_cached(cache.shm, cache.shm_tables, entries, [d for _, d in pairs])
        holders = [finish_bytes(holder) for holder, _ in pairs]
    else:
        # NOTE: the caller's outs as they are: read_ranges takes buffers and CPU tensors,
        # and hands back (None) anything else, which the master path then reports
        written = read_cached(cache.shm, cache.shm_tables, entries, [outs[i] for i in positions])
        holders = written
    ok_keys, failed = [], []
    num_bytes = 0
    for i, entry, num, holder in zip(positions, entries, written, holders):
        if num is None:
            failed.append((keys[i], entry))
            rest.append(i)
            continue
        results[i] = holder
        ok_keys.append(keys[i])
        num_bytes += num
    cache.touch(ok_keys, failed)
    transfers.count_reads(cache.shm.name, len(ok_keys), num_bytes)
    return len(ok_keys)
