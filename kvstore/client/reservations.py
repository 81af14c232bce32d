"""Puts into space reserved ahead: one master call (PutEnd) per batch instead of two.

``ReservedSpace`` holds this client's current reservation (``MasterClient.reserve``, the
master's Reserve) and places keys inside it with a bump allocator: each placed key gets the
next 64-byte aligned offset, and a range is never handed out twice, so two puts of this
client never overlap (two clients never do either: each holds its own range, allocated by
the master). ``put_reserved`` writes the placed keys at once (shm memcpy, tcp WRITEs
carrying the reservation's capability, which covers its whole range, or one NIXL WRITE per
batch after one write check of the batch's whole run of ranges, ``nixl_checks.coalesce``,
its values hashed meanwhile) and makes them visible with one PutEnd naming the
reservation; the master checks each range against the reservation. A single key over tcp
is one WRITE_RESERVED whose daemon sends that PutEnd itself (``write_reserved.py``: two
round trips on the put's path instead of three). Durable commit: for shm writes to a
daemon with a commit ring, the PutEnd's reply carries each accepted key's capability and
the client appends the commits to the ring before the put returns (no second round trip);
for nixl writes it carries them too and the client sends CLIENT_COMMIT frames before the
put returns; otherwise the master pushes the commits to the daemon
before it answers.

Which puts: one replica, no placement hint (``near_node``), no tier other than DRAM, no
pins, and a batch whose bytes fit a reservation. Anything else, a batch that does not fit
what is left (a new reservation is asked for first), a master that grants none, and keys
whose reservation the master no longer knows (expired, or a restarted or new leader master)
go through PutStart as before (``writer``).

Time: a reservation is used for new placements only during the first half of its TTL
(``USE_FRACTION``), so a put that started inside it has the other half (5 s by default) to
reach the master with its PutEnd; a later PutEnd is refused (KeyNotFoundError from the
master) and the keys are put again through PutStart: they are never visible over bytes
another put wrote, since the master reuses the space only after the expiry plus a grace,
and the daemon refuses a WRITE whose capability expired.

Thread-safe: one lock around the placement (the Reserve call included, so concurrent puts
that all find the reservation full ask for one new reservation, not one each).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from kvstore._copy_hash import put_copy_hash_many
from kvstore._errors import KeyNotFoundError, KVStoreError, TransferError
from kvstore.client import hashing, write_reserved
from kvstore.client.checksum import EMPTY_CHECKSUM, EMPTY_PLACEHOLDER, checksum
from kvstore.rpc.results import ReservationGrant
from kvstore.tiers import Tier

#: Offsets and sizes of placed keys are multiples of this (the master's allocator unit).
ALIGNMENT_BYTES = 64
#: Share of a reservation's TTL during which new puts are placed in it.
USE_FRACTION = 0.5
#: After a refusal (or an error: an older master), seconds before asking again.
RETRY_AFTER_S = 1.0


def _aligned(num_bytes: int) -> int:
    return (num_bytes + ALIGNMENT_BYTES - 1) & ~(ALIGNMENT_BYTES - 1)


class ReservedSpace:
    """This client's reservation and its bump allocator (see the module docstring)."""

    def __init__(self, size_bytes: int, client_id: str, host_id: str, *,
                 clock: Callable[[], float] = time.monotonic):
        self.size_bytes = size_bytes
        self._client_id = client_id
        self._host_id = host_id
        self._clock = clock
        self._lock = threading.Lock()
        self._grant: ReservationGrant | None = None
        self._cursor = 0            # next free offset inside the grant's range
        self._use_until_s = 0.0
        self._retry_at_s = 0.0
        self.num_reserved = 0       # grants obtained (stats, tests)
        self.last_refusal = ""      # the master's last reason for granting none

    def applies(self, settings) -> bool:
        """True when a put with these ``PutSettings`` may go into reserved space."""
        return (settings.replicas == 1 and not settings.near_node_id
                and settings.tier in (None, Tier.DRAM) and not settings.soft_pin_ttl_s
                and not settings.hard_pin)

    def place(self, master, sizes: Sequence[int], deadline) -> tuple[ReservationGrant,
                                                                      list[int]] | None:
        """The grant and one offset per size (all in it), or None (the batch goes through
        PutStart). Asks the master for a new reservation when the current one is too full
        or too old; a refusal or an error disables reserving for ``RETRY_AFTER_S``."""
        need = sum(_aligned(size) for size in sizes)
        if need > self.size_bytes:
            return None
        with self._lock:
            now_s = self._clock()
            grant = self._grant
            if (grant is None or now_s >= self._use_until_s
                    or self._cursor + need > grant.target.offset + grant.target.length):
                if now_s < self._retry_at_s:
                    return None
                grant = self._reserve(master, need, deadline, now_s)
                if grant is None:
                    return None
            offsets = []
            cursor = self._cursor
            for size in sizes:
                offsets.append(cursor)
                cursor += _aligned(size)
            self._cursor = cursor
            return grant, offsets

    def forget(self, grant: ReservationGrant) -> None:
        """Stop using ``grant`` (the master no longer knows it)."""
        with self._lock:
            if self._grant is grant:
                self._grant = None

    def _reserve(self, master, need: int, deadline, now_s: float) -> ReservationGrant | None:
        self._grant = None
        try:
            grant = master.reserve(self.size_bytes, client_id=self._client_id,
                                   near_host_id=self._host_id, min_bytes=need,
                                   deadline=deadline)
        except KVStoreError as exc:
            grant = str(exc)
        if isinstance(grant, str):
            self.last_refusal = grant
            self._retry_at_s = now_s + RETRY_AFTER_S
            return None
        self._grant = grant
        self._cursor = grant.target.offset
        self._use_until_s = now_s + grant.ttl_s * USE_FRACTION
        self.num_reserved += 1
        return grant


def put_reserved(space: ReservedSpace, master, transfers, settings, indices: list[int],
                 names: list[str], sizes: list[int], sources: list[memoryview],
                 results: list) -> list[int]:
    """Put the keys into reserved space; fills ``results[indices[j]]`` for the keys it
    handled and returns the positions ``j`` of those it did not (to go through PutStart):
    all of them when nothing could be placed, or the keys whose reservation the master no
    longer knows. A write that fails is that key's TransferError (its range stays unused
    until the reservation ends: nothing to give back)."""
    placed = space.place(master, sizes, settings.deadline)
    if placed is None:
        return list(range(len(names)))
    grant, offsets = placed
    whole = grant.target
    items = [(j, names[j], whole._replace(offset=offsets[j], length=sizes[j]), sources[j])
             for j in range(len(names))]
    transport = transfers.transport_for(whole)
    if write_reserved.applies(transport, items[0][2], len(items)):
        # NOTE: a single tcp put: its daemon sends the PutEnd (write_reserved.py)
        src = sources[0]
        outcome = write_reserved.put_one(
            master, transfers, settings, grant.reservation_id, names[0], items[0][2], src,
            EMPTY_CHECKSUM if src is EMPTY_PLACEHOLDER else checksum(src))
        if outcome is write_reserved.AGAIN:
            space.forget(grant)
            return [0]
        if outcome is not write_reserved.FALLBACK:
            results[indices[0]] = outcome
            return []
    sums = _copy_hashed(transport, items)
    shm = sums is not None
    if sums is None and transport is not None and transport.name == "nixl":
        sums, failures = _write_hashing(transfers, items, sources, settings.deadline)
    elif sums is None:
        sums = [checksum(src) for src in sources]
        failures = transfers.write(items, deadline=settings.deadline)
    else:
        failures = {}
    for j, src in enumerate(sources):
        if src is EMPTY_PLACEHOLDER:
            sums[j] = EMPTY_CHECKSUM
    written = [j for j in range(len(names)) if j not in failures]
    for j, error in failures.items():
        results[indices[j]] = error
    if not written:
        return []
    ring = grant.commit_ring if shm and transfers.committer is not None else ""
    # NOTE: a nixl writer commits on the daemon itself (CLIENT_COMMIT frames, after PutEnd)
    # rather than waiting in PutEnd for the master's push, as a PutStart put over nixl does:
    # the same hops (client-master-client-daemon-client against client-master-daemon-
    # master-client), but the push's work and its wait are the master's, which every client
    # shares; no wall-clock difference was resolved at load 18-28 (bench/RESULTS.md, "NIXL
    # puts into reserved space")
    own_commit = bool(ring) or (transport is not None and transport.name == "nixl"
                                and transfers.committer is not None)
    ended, caps = master.put_end_reserved_committing(
        grant.reservation_id, [names[j] for j in written], [offsets[j] for j in written],
        [sizes[j] for j in written], [sums[j] for j in written],
        client_id=settings.client_id, deadline=settings.deadline,
        client_committed=own_commit)
    if caps:
        _ring_commit(master, transfers, settings, grant, ring, written, names, offsets,
                     sizes, sums, ended, caps)
    again = []
    for j, error in zip(written, ended):
        if isinstance(error, KeyNotFoundError):
            again.append(j)
        else:
            results[indices[j]] = error
    if again:
        space.forget(grant)
    return again


def _ring_commit(master, transfers, settings, grant, ring, written, names, offsets, sizes,
                 sums, ended, caps) -> None:
    """Commit the keys the master accepted on their daemon, with the capabilities its
    reply carried: one commit-ring record (durable once appended, docs/ARCHITECTURE.md,
    Commit ring), or CLIENT_COMMIT frames for entries the ring does not take (every entry
    where ``ring`` is "": a nixl writer's). A key whose
    daemon does not confirm becomes that TransferError (``ended`` updated in place) and is
    removed again, as in the PutStart flow (``writer.end_put``)."""
    committer = transfers.committer
    whole = grant.target
    entries = [(position, names[j], whole._replace(offset=offsets[j], length=sizes[j],
                                                   capability=caps[position]), sums[j])
               for position, j in enumerate(written) if ended[position] is None
               and caps[position]]
    left = committer.ring_commit(entries, {whole.node_id: ring}) if ring else entries
    if not left:
        return
    failures = committer.begin(left, settings.deadline).finish()
    for position, error in failures.items():
        ended[position] = error
    if failures:
        try:
            master.remove([names[written[p]] for p in failures], force=True)
        except KVStoreError:
            pass    # NOTE: best effort, as writer._remove: the daemon never confirmed it


def _write_hashing(transfers, items, sources, deadline) -> tuple[list[int], dict]:
    """Write ``items`` (nixl) while their sources are hashed: the checksums, in order, and
    the write's failures. NOTE: on the background thread from one 1 MiB value on (not the
    writer's 4 MiB): no PutStart hides the hash here, but the daemon's write check does
    (its round trip, ~70-130 us, against ~50-80 us of XXH3 per MiB), and a batch's hash
    runs beside its NIXL copy (the post releases the GIL). The hash's errors are raised
    after the write (nothing was committed: the keys' ranges stay unused)."""
    hashed = hashing.start(sources, _checksum, min_bytes=hashing.BACKGROUND_MIN_VALUE_BYTES)
    try:
        failures = transfers.write(items, deadline=deadline)
    finally:
        hashed.wait()   # NOTE: no thread reads the caller's values after the call
    return list(hashed.result()), failures


def _checksum(src: memoryview) -> int:
    return EMPTY_CHECKSUM if src is EMPTY_PLACEHOLDER else checksum(src)


def _copy_hashed(transport, items) -> list[int] | None:
    """Where ``transport`` is shm: copy every item's source into its range and hash the
    copied bytes in the same pass (``kvstore._copy_hash.put_copy_hash_many``, one call, the
    GIL released once, the transport's ``copy_threads``); the checksums, in item order. None where it is not shm, or the
    segment cannot be mapped (the caller then hashes and writes through ``Transfers``,
    which reports the error per key).
    NOTE: PutStart's flow hashes while the master allocates; here there is no round trip
    to hide the hash behind, so it rides on the copy instead."""
    if transport is None or transport.name != "shm":
        return None
    try:
        dsts = [transport.writable_range(target) for _, _, target, _ in items]
    except TransferError:
        return None
    return list(put_copy_hash_many(dsts, [src for _, _, _, src in items],
                                   getattr(transport, "copy_threads", 1)))


__all__ = ["ReservedSpace", "put_reserved"]
