"""Read leases that end with the read: the lease ids of GetReplicas and ReleaseLeases.

Rule: each GetReplicas call that found objects is one reader's hold on each of them, named by
a lease id (returned in the reply). An object counts its holders (``ObjectMeta.readers``) and
stays leased while one holds it, never past ``lease_until_s`` (the longest TTL granted: the
bound for readers that crash and never release). ReleaseLeases of an id removes that reader's
hold; when the last holder has released, the lease ends at once: the object is evictable
again and space waiting for the lease (a force-removed object, the source of a tier move) is
freed (``MasterState.lease_ended``).

Why a count and not a list of holders: one increment per key on the read path. Its safety
argument: a hold is released only while its own TTL runs (``until_s > now``), and the count
restarts at 1 only when every earlier lease has expired (``lease_until_s <= now``), so a late
release of an expired hold can never take away a live reader's hold. A hold whose release came
too late stays counted until the TTLs of the others pass: the safe direction.

RenewLease of an object whose lease had expired counts as a holder that never releases (it
has no id): the object then stays leased for that TTL.

Lease ids start at a random 62-bit value per master incarnation, so an id from a previous
master (a client's release sent across a restart) names nothing here.
"""

from __future__ import annotations

import heapq
import secrets


class LeaseBook:
    """Lease id -> (until_s, objects held), with expiry in TTL order."""

    def __init__(self):
        self._records: dict[int, tuple[float, list]] = {}
        self._expiry: list[tuple[float, int]] = []
        self._next_id = secrets.randbits(62)

    def __len__(self) -> int:
        return len(self._records)

    def grant(self, objs: list, until_s: float) -> int:
        """Record one reader's hold on ``objs`` (already counted in ``readers``); its id."""
        self._next_id += 1
        lease_id = self._next_id
        self._records[lease_id] = (until_s, objs)
        heapq.heappush(self._expiry, (until_s, lease_id))
        return lease_id

    def release(self, state, lease_ids, now_s: float, key_prefix: str | None = None) -> int:
        """End the holds named by ``lease_ids``; return how many were still held. Unknown,
        already released or expired ids are ignored (idempotent). With ``key_prefix`` (a
        tenant's namespace), ids of holds on other keys are ignored too and stay held: one
        call's objects all share its caller's namespace."""
        num_released = 0
        records = self._records
        for lease_id in lease_ids:
            record = records.get(lease_id)
            if record is None or (key_prefix is not None
                                  and not record[1][0].key.startswith(key_prefix)):
                continue
            del records[lease_id]
            if record[0] <= now_s:
                continue
            num_released += 1
            for obj in record[1]:
                if obj.readers > 0:
                    obj.readers -= 1
                    if obj.readers == 0 and obj.lease_until_s > now_s:
                        obj.lease_until_s = 0.0
                        state.lease_ended(obj)
        return num_released

    def expire(self, now_s: float) -> None:
        """Forget the records whose TTL passed (their objects' leases ended by time)."""
        expiry, records = self._expiry, self._records
        while expiry and expiry[0][0] <= now_s:
            records.pop(heapq.heappop(expiry)[1], None)
