"""Reservations: space one writer holds ahead of its puts (the Reserve call), and the commit
of keys it wrote there (PutEnd naming the reservation).

Structures (``ReservationBook``):
  ``id_to_reservation``  reservation id -> ``Reservation`` (live, or expired and not yet
                         reclaimed).
  ``_expiry_queue``      (reclaim time, id) in grant order (one TTL for all: grant order is
                         reclaim order).

Rules:
- A grant is one range of one DRAM segment, allocated from the segment's allocator like a
  PENDING object's (so it counts as used everywhere: usage, watermarks, status), for one
  ``client_id``, until ``expires_s``. It is granted only out of the space below the
  segment's high watermark, so a grant never starts a pressure pass, and it never evicts.
- Its write capability (``capability.issue`` over the whole range, object identity of the
  empty key, which no valid key has, so it never passes a daemon's commit check) expires
  with it. A writer may write anywhere in the range until then.
- ``commit`` records each key COMPLETE at the offset and size the writer names, iff the
  reservation is live and the writer's, the range lies inside it, is 64-byte aligned and
  overlaps no range committed in it before. Refused: nothing changes.
- Unused space goes back to the allocator only ``RECLAIM_GRACE_S`` after the expiry (the
  daemon checks the capability's expiry on its own wall clock: the grace covers skew), so
  no write the capability allows can land in space the master handed to another put. A
  committed range is the object's from then on: its removal frees it as any object's.
- Reservations are soft state: a restarted or new leader master knows none (its writers'
  PutEnds naming them answer ITEM_NOT_FOUND and the writers re-reserve), and its daemons
  re-registered with a new capability secret, so the old capabilities no longer verify.
- A node dropped takes its reservations with it (its segments' space is gone).

Not thread-safe: the service's lock serializes calls, as for the rest of ``MasterState``.
"""

from __future__ import annotations

import bisect
import itertools
import secrets
from collections import deque
from dataclasses import dataclass, field

from kvstore.master.allocator import aligned_size
from kvstore.master.config import ALIGNMENT_BYTES as ALIGNMENT
from kvstore.master.objects import (
    COMPLETE, ITEM_ALREADY_EXISTS, ITEM_INVALID, ITEM_NOT_FOUND, ITEM_OK, ObjectMeta,
)
from kvstore.master.validation import check_batch, check_id, check_parallel, invalid, key_problem
from kvstore.tiers import Tier

#: Seconds past a reservation's expiry before its unused space is reused (clock skew
#: between master and daemons, and a write checked just before the expiry).
RECLAIM_GRACE_S = 2.0
#: Most of a segment's free space below its high watermark one grant takes.
MAX_GRANT_FRACTION = 0.25


@dataclass(slots=True, eq=False)
class Reservation:
    """One writer's range ``[offset, offset + size_bytes)`` of ``segment``."""

    reservation_id: int
    client_id: str
    writer: str                # the caller's principal name ("" for the cluster's)
    segment: object            # nodes.SegmentSpace
    offset: int
    size_bytes: int
    expires_s: float           # master clock: commits refused from then on
    # sorted, disjoint (start, end) of the ranges committed in it
    used: list = field(default_factory=list)
    used_bytes: int = 0
    reclaimed: bool = False

    @property
    def unused_bytes(self) -> int:
        return self.size_bytes - self.used_bytes

    def fits(self, offset: int, size_bytes: int) -> str | None:
        """None if ``[offset, +aligned size)`` may be committed here; else why not."""
        end = offset + aligned_size(size_bytes)
        if offset % ALIGNMENT:
            return f"offset {offset} is not a multiple of {ALIGNMENT}"
        if offset < self.offset or end > self.offset + self.size_bytes:
            return (f"range [{offset}, +{size_bytes}) lies outside reservation "
                    f"{self.reservation_id} [{self.offset}, +{self.size_bytes})")
        index = bisect.bisect_right(self.used, (offset, float("inf")))
        if index and self.used[index - 1][1] > offset:
            return f"range [{offset}, +{size_bytes}) overlaps a range committed before"
        if index < len(self.used) and self.used[index][0] < end:
            return f"range [{offset}, +{size_bytes}) overlaps a range committed before"
        return None

    def mark_used(self, offset: int, size_bytes: int) -> None:
        length = aligned_size(size_bytes)
        bisect.insort(self.used, (offset, offset + length))
        self.used_bytes += length

    def gaps(self) -> list[tuple[int, int]]:
        """The unused ``(offset, length)`` extents, in offset order."""
        gaps, cursor = [], self.offset
        for start, end in self.used:
            if start > cursor:
                gaps.append((cursor, start - cursor))
            cursor = end
        if cursor < self.offset + self.size_bytes:
            gaps.append((cursor, self.offset + self.size_bytes - cursor))
        return gaps


class ReservationBook:
    """The live reservations of one master incarnation (see the module docstring)."""

    def __init__(self):
        self.id_to_reservation: dict[int, Reservation] = {}
        self._expiry_queue: deque[tuple[float, int]] = deque()
        # NOTE: ids start at a random 62-bit value per master, so an id of a previous master
        # names nothing here (its writers' PutEnds are refused and they re-reserve)
        self._ids = itertools.count(secrets.randbits(62) + 1)

    def reserved_bytes(self, node) -> int:
        """Unused bytes of ``node``'s live reservations (``kvstore status``)."""
        return sum(r.unused_bytes for r in self.id_to_reservation.values()
                   if r.segment.node is node)

    def grant(self, state, size_bytes: int, min_bytes: int, client_id: str, near_host_id: str,
              ttl_s: float, now_s: float, writer: str = "") -> tuple[Reservation | None, str]:
        """A new reservation of at most ``size_bytes`` (at least ``min_bytes``) in the DRAM
        segment with the most grantable space (one on ``near_host_id`` first), or
        ``(None, why)``. Raises Rejected (INVALID_ARGUMENT) for a bad size or id."""
        check_id(client_id, "client_id", allow_empty=True)
        check_id(near_host_id, "near_host_id", allow_empty=True)
        if size_bytes <= 0:
            raise invalid(f"size_bytes must be > 0, got {size_bytes}")
        if ttl_s <= 0:
            return None, "reservations are off on this master (--reservation-ttl 0)"
        high = state.config.high_watermark
        best, best_room = None, 0
        for node in state.nodes.values():
            for segment in node.segments.values():
                if segment.tier is not Tier.DRAM or not segment.alive:
                    continue
                room = int(segment.capacity_bytes * high) - segment.allocator.used_bytes
                room = int(min(room, segment.allocator.free_bytes) * MAX_GRANT_FRACTION)
                if near_host_id and node.host_id == near_host_id:
                    room += 1 << 62     # NOTE: same host first (shm writes), then most room
                if room > best_room:
                    best, best_room = segment, room
        if best is None:
            return None, "no DRAM segment has room below its high watermark"
        grant = min(size_bytes, best_room & ((1 << 62) - 1)) // ALIGNMENT * ALIGNMENT
        if grant <= 0 or grant < min_bytes:
            return None, (f"at most {grant} bytes grantable on {best.node.node_id}, below the "
                          f"{min_bytes} asked for")
        offset = best.allocator.allocate(grant)
        if offset is None:
            return None, f"no free extent of {grant} bytes on {best.node.node_id}"
        reservation = Reservation(next(self._ids), client_id, writer, best, offset, grant,
                                  now_s + ttl_s)
        self.id_to_reservation[reservation.reservation_id] = reservation
        self._expiry_queue.append((now_s + ttl_s + RECLAIM_GRACE_S,
                                   reservation.reservation_id))
        state.next_sweep_s = min(state.next_sweep_s, now_s + ttl_s + RECLAIM_GRACE_S)
        return reservation, ""

    def commit(self, state, reservation_id: int, client_id: str, keys, offsets, sizes,
               checksums, now_s: float, writer: str = ""):
        """Record ``keys[i]`` COMPLETE at ``offsets[i]`` (``sizes[i]`` bytes) of the
        reservation. Per key: ITEM_OK (also a replay by this writer of a key it committed at
        that range with that size and checksum: idempotent), ITEM_ALREADY_EXISTS (the key
        exists or is pending: a success for content-addressed keys; its range stays
        unused), ITEM_INVALID (a bad
        key or size, a range outside the reservation, unaligned, or overlapping one
        committed before: nothing changed), ITEM_NOT_FOUND for every key when the
        reservation is unknown, expired or another writer's (``client_id`` and the
        caller's principal ``writer`` both name the grant's). Returns ``(statuses,
        messages, committed)``; the nodes of committed objects are in ``state.touched``
        (the service waits for their daemons: durable commit)."""
        check_batch(len(keys), state.config.max_batch)
        check_parallel({"keys": len(keys), "reserved_offsets": len(offsets),
                        "reserved_sizes": len(sizes), "checksums": len(checksums)},
                       optional=("checksums",))
        reservation = self.id_to_reservation.get(reservation_id)
        gone = None
        if (reservation is None or reservation.client_id != client_id
                or reservation.writer != writer):
            gone = (f"reservation {reservation_id} is unknown to this master (expired and "
                    "reclaimed, or granted by another master) or not yours")
        elif now_s >= reservation.expires_s or not reservation.segment.alive:
            gone = f"reservation {reservation_id} expired"
        if gone is not None:
            return [ITEM_NOT_FOUND] * len(keys), [gone] * len(keys), []
        segment = reservation.segment
        node = segment.node
        objects, pending = state.objects, state.pending
        state.use_count += 1
        statuses, messages, committed = [], [""] * len(keys), []
        for i, key in enumerate(keys):
            offset, size = offsets[i], sizes[i]
            problem = key_problem(key) if size > 0 else "size must be > 0"
            if problem is None:
                obj = objects.get(key)
                if obj is not None or key in pending:
                    # NOTE: a replay names the same range, size and checksum; another
                    # size at that offset is not the object committed there
                    if (obj is not None and obj.client_id == client_id
                            and obj.replicas == [(segment, offset)]
                            and obj.size_bytes == size
                            and (not checksums or obj.checksum == checksums[i])):
                        # NOTE: a replay waits for the daemon like a first commit
                        if node.commit_push:
                            node.touched.add(node)
                        statuses.append(ITEM_OK)
                    else:
                        statuses.append(ITEM_ALREADY_EXISTS)
                    continue
                problem = reservation.fits(offset, size)
            if problem is not None:
                statuses.append(ITEM_INVALID)
                messages[i] = problem
                continue
            obj = ObjectMeta(key, size, [(segment, offset)], 0, client_id, 0.0, False,
                             COMPLETE, checksums[i] if checksums else 0)
            obj.last_used = state.use_count
            objects.store(key, obj)
            reservation.mark_used(offset, size)
            node.keys.add(key)
            segment.num_replicas += 1
            node.log_added(key, segment, offset, size, obj.checksum, obj.codec)
            statuses.append(ITEM_OK)
            committed.append(obj)
        return statuses, messages, committed

    def expire(self, now_s: float) -> None:
        """Give back the unused space of every reservation past its expiry and grace."""
        queue = self._expiry_queue
        while queue and queue[0][0] <= now_s:
            _, reservation_id = queue.popleft()
            reservation = self.id_to_reservation.pop(reservation_id, None)
            if reservation is not None:
                self._reclaim(reservation)

    def next_expiry_s(self) -> float | None:
        return self._expiry_queue[0][0] if self._expiry_queue else None

    def _reclaim(self, reservation: Reservation) -> None:
        reservation.reclaimed = True
        segment = reservation.segment
        if not segment.alive:
            return
        for offset, length in reservation.gaps():
            segment.allocator.free(offset, length)


__all__ = ["RECLAIM_GRACE_S", "Reservation", "ReservationBook"]
