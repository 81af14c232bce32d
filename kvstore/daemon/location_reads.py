"""``LocationReads``: whether this node may serve a CHECKED_READ from its own object table.

Why: a client that read a key before keeps its location (client/location_cache.py) and
reads it again without asking the master. The daemon answers such a read only while its
table still holds that object at that range, and only while the table is known to hold
every removal the master may have completed meanwhile.

Rule (decided; docs/ARCHITECTURE.md, Location cache):
- The object: the table lists ``key`` in ``segment_id`` with that checksum, and the range
  read lies within the object's range (a striped read asks for a part of it).
- The lease: the master gives the node a location lease at each registration
  (RegisterNodeResponse.location_lease_ms: 3/4 of its --commit-timeout; 0 with
  --commit-timeout 0). A heartbeat whose reply is ``up_to_date`` (it carries every change up
  to the master's latest for this node) and that the table applied renews it, counted from
  before the heartbeat was sent. Why that bounds every window: a removal the daemon has
  not applied completes at the master either confirmed by this daemon (then applied here
  first) or unconfirmed, no sooner than --commit-timeout after it was logged; any reply
  built after the log carries it, so the last reply without it was built before, and the
  lease from its send ends before the removal's timeout does. A daemon that misses beats
  (a master down, a stalled process, a network split) stops serving location reads within
  the lease; so does one re-registering (a new master's sequence) until its first
  up-to-date beat, which the link sends right after every registration (master_link.py).
  Not from the registration reply: the master may refuse part of the inventory (a key
  whose removal this node never confirmed), and only that first beat's resync drops it.
- Refusals name their reason; the client then asks the master (and refreshes its entry).
- The same lease, for same-host clients that read a segment themselves: ``on_lease`` is told
  its end at every change, and the daemon publishes it in the DRAM segments' shm location
  tables (daemon/shm_locations.py, ``Daemon._publish_lease``).

Not covered here, by design: the bytes. The master frees a removed range at once, so a new
put may write it before this table drops the old key; the client verifies every location
read against the checksum it cached (TCP reads are always verified), so such bytes are
refused there. Thread-safe: floats assigned whole, the table has its own lock.
"""

from __future__ import annotations

import time
from typing import Callable

from kvstore.daemon.objects import ObjectTable
from kvstore.rpc import HeartbeatChanges
from kvstore.transport.data_frames import Status


class LocationReads:
    """The lease and the object check of CHECKED_READs (see the module docstring)."""

    def __init__(self, table: ObjectTable, *, clock: Callable[[], float] = time.monotonic):
        self._table = table
        self._clock = clock
        self._lease_s = 0.0
        self._fresh_until_s = float("-inf")
        self.num_served = 0     # checked reads allowed (counters: no lock, never negative)
        self.num_refused = 0
        # told the lease's end (this clock's seconds; -inf: none) whenever it changes: the
        # shm location tables publish it to same-host clients (daemon/shm_locations.py)
        self.on_lease: Callable[[float], None] | None = None

    def on_registered(self, lease_s: float) -> None:
        """A (re-)registration: a new sequence, a new lease length; nothing served until the
        first up-to-date heartbeat of this registration."""
        self._fresh_until_s = float("-inf")
        self._lease_s = max(0.0, lease_s)
        if self.on_lease is not None:
            self.on_lease(self._fresh_until_s)

    def on_heartbeat(self, sent_at_s: float, changes: HeartbeatChanges) -> None:
        """Renew the lease from ``sent_at_s`` (the clock before the heartbeat was sent) when
        ``changes`` reached the master's latest change and the table holds it."""
        if self._lease_s > 0 and changes.up_to_date and self._table.acked_seq >= changes.seq:
            self._fresh_until_s = max(self._fresh_until_s, sent_at_s + self._lease_s)
            if self.on_lease is not None:
                self.on_lease(self._fresh_until_s)

    def lease_refusal(self) -> tuple[Status, str] | None:
        """None while the node holds its location lease, else (LOCATION_OFF, why). Also the
        lease of keyed reads (daemon/keyed_reads.py)."""
        if self._clock() >= self._fresh_until_s:
            return Status.LOCATION_OFF, (
                "no up-to-date heartbeat within the location lease" if self._lease_s > 0
                else "the master grants this node no location lease")
        return None

    def refusal(self, key: str, checksum: int, segment_id: str, offset: int,
                length: int) -> tuple[Status, str] | None:
        """None if the read of [offset, +length) of ``segment_id`` as ``key``'s bytes may
        be served, else the refusal: LOCATION_OFF (no lease: every location read here is
        refused for now) or LOCATION_STALE (not that object), and why."""
        off = self.lease_refusal()
        if off is not None:
            self.num_refused += 1
            return off
        stored = self._table.get(key)
        if (stored is None or stored.segment_id != segment_id or stored.checksum != checksum
                or offset < stored.offset
                or offset + length > stored.offset + stored.length):
            self.num_refused += 1
            return Status.LOCATION_STALE, (f"{key!r} is not stored here at that range with "
                                           "that checksum")
        self.num_served += 1
        return None
