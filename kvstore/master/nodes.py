"""Storage nodes, their segments, and each node's numbered log of object-table changes.

A node's change log is how its daemon keeps a copy of the master's table of the replicas it
holds (see the proto comment on HeartbeatRequest): every replica of the node committed by
put_end (``added``) or freed by remove, eviction, revoke or reclaim (``removed``) gets the
next per-node sequence number. A heartbeat acknowledges a sequence; the reply carries the
changes after it, and the log forgets acknowledged entries. If the daemon is behind the
oldest entry still kept (the log is bounded, and forgets what was acknowledged), or ahead of
the master's sequence, the reply is a full resync: the whole table. Adoption of an inventory
sets a baseline sequence 1 without a log entry, so the daemon's first heartbeat after
registration (acked 0) is a full resync.

Durable commit (``commits.CommitPusher``): the same changes are also pushed to the daemon as
soon as they are logged; ``durable_seq`` is the highest sequence the daemon confirmed it
applied (by a push reply or a heartbeat's ack), and every change logged adds the node to
``touched`` (the state's set, read by the service after each call), so a put or remove can
wait until its nodes' ``durable_seq`` covers it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from kvstore.master.allocator import SegmentAllocator
from kvstore.master.objects import COMPLETE
from kvstore.tiers import Tier

#: Most change entries a node's log keeps unacknowledged; past that, the daemon resyncs.
MAX_LOG_ENTRIES = 1 << 21


class SegmentSpace:
    """The master's view of one region a node contributes in one tier: its capacity, its
    allocator and how many replicas it holds (the bytes live in the daemon's own ``Segment``,
    ``kvstore/daemon/backends.py``)."""

    __slots__ = ("segment_id", "node", "tier", "capacity_bytes", "shm_name", "path",
                 "allocator", "num_replicas", "alive", "outgoing_bytes", "hits", "demotions",
                 "promotions", "evictions")

    def __init__(self, segment_id: str, node: "Node", tier: Tier, capacity_bytes: int,
                 shm_name: str, path: str):
        self.segment_id = segment_id
        self.node = node
        self.tier = tier
        self.capacity_bytes = capacity_bytes
        self.shm_name = shm_name
        self.path = path
        self.allocator = SegmentAllocator(capacity_bytes)
        self.num_replicas = 0
        self.alive = True    # False once the node is dropped: its space is gone with it
        self.outgoing_bytes = 0  # bytes of tier moves in flight out of this segment
        # counters (kvstore status): reads of a replica here (the first one listed),
        # objects moved out to a slower tier, moved in from a slower tier, evicted
        self.hits = 0
        self.demotions = 0
        self.promotions = 0
        self.evictions = 0


@dataclass(slots=True)
class TierUsage:
    """Totals of one tier over live segments."""
    used_bytes: int = 0
    capacity_bytes: int = 0
    num_replicas: int = 0


def tier_usage(nodes: Iterable["Node"], *, last_only: bool = False) -> dict[Tier, TierUsage]:
    """Tier -> its totals over the segments of ``nodes`` (tiers with no segment omitted);
    with ``last_only``, over each node's slowest segments only (the ones that evict)."""
    usage: dict[Tier, TierUsage] = {}
    for node in nodes:
        slowest = node.slowest_tier() if last_only else None
        for segment in node.segments.values():
            if slowest is not None and segment.tier != slowest:
                continue
            entry = usage.get(segment.tier)
            if entry is None:
                entry = usage[segment.tier] = TierUsage()
            entry.used_bytes += segment.allocator.used_bytes
            entry.capacity_bytes += segment.allocator.capacity_bytes
            entry.num_replicas += segment.num_replicas
    return usage


class Node:
    """A registered storage node. ``keys`` holds every key with a replica here (PENDING
    or COMPLETE), so dropping the node touches only its own objects."""

    __slots__ = ("node_id", "host_id", "data_addr", "segments", "last_heartbeat_s", "keys",
                 "seq", "log", "incarnation", "outbox",
                 "nixl_metadata", "durable_seq", "touched", "commit_push", "beat_durable",
                 "capability_secret", "client_commit", "read_capabilities", "commit_ring",
                 "freed_seq", "batch_capabilities", "registration_token", "num_adopted")

    def __init__(self, node_id: str, host_id: str, data_addr: str, now_s: float,
                 incarnation: str = "", touched: set | None = None):
        self.node_id = node_id
        self.durable_seq = 0      # the last sequence the daemon confirmed it applied
        # the sequence of the last change logged here that takes a range out of the
        # daemon's table (a removal, a replica's move to another range): until the daemon
        # confirms it, its table may list an object over space the master hands out again
        self.freed_seq = 0
        self.commit_push = False  # its daemon takes COMMIT pushes (else: heartbeats only)
        self.client_commit = False  # its daemon takes writers' own commits (CLIENT_COMMIT)
        self.commit_ring = ""      # shm name of its commit ring (same-host writers); "": none
        self.batch_capabilities = False  # its daemon verifies batch capabilities (10m)
        self.beat_durable = 0     # durable_seq when the last heartbeat was answered
        # NOTE: the state's set of nodes that logged a change during the current call
        self.touched = touched if touched is not None else set()
        self.incarnation = incarnation
        self.registration_token = ""  # of the registration that added it ("": none sent)
        self.num_adopted = 0       # objects that registration adopted (repeated on a retry)
        self.outbox: list = []     # tier moves (tiering.Move) for the next heartbeat reply
        self.host_id = host_id
        self.data_addr = data_addr
        self.segments: dict[str, SegmentSpace] = {}
        self.last_heartbeat_s = now_s
        self.keys: set[str] = set()
        self.seq = 0
        self.nixl_metadata = b""  # published as registered, returned by ListNodes
        # key of this node's write capabilities (kvstore/capability.py); None: the daemon
        # does not check them (an older daemon), so none are issued for it
        self.capability_secret: bytes | None = None
        # True: its daemon checks READs too, so GetReplicas issues read capabilities for it
        self.read_capabilities = False
        # entries: (seq, key, segment_id, offset, length, checksum, codec); segment_id None
        # marks a removal
        self.log: deque[tuple] = deque()

    def slowest_tier(self) -> Tier | None:
        """The last tier of this node: only there are objects evicted (others demote)."""
        return max((s.tier for s in self.segments.values()), default=None)

    def log_added(self, key: str, segment: SegmentSpace, offset: int, size_bytes: int,
                  checksum: int, codec: int) -> None:
        if self.commit_push:
            self.touched.add(self)
        self.seq += 1
        self.log.append((self.seq, key, segment.segment_id, offset, size_bytes, checksum, codec))
        if len(self.log) > MAX_LOG_ENTRIES:
            self.log.popleft()

    def log_moved(self, key: str, segment: SegmentSpace, offset: int, size_bytes: int,
                  checksum: int, codec: int) -> None:
        """``log_added`` for a replica now at another range of this node (a tier move's
        switch): its previous range leaves the daemon's table too (``freed_seq``)."""
        self.log_added(key, segment, offset, size_bytes, checksum, codec)
        self.freed_seq = self.seq

    def log_removed(self, key: str) -> None:
        if self.commit_push:
            self.touched.add(self)
        self.seq += 1
        self.freed_seq = self.seq
        self.log.append((self.seq, key, None, 0, 0, 0, 0))
        if len(self.log) > MAX_LOG_ENTRIES:
            self.log.popleft()

    def changes_after(self, acked_seq: int, objects: dict, max_changes: int):
        """What a heartbeat acknowledging ``acked_seq`` should carry.

        Returns ``(full_resync, seq, added, removed_keys)`` where ``added`` is a list of
        ``(key, segment_id, offset, length, checksum, codec)``. Forgets acknowledged entries.
        ``acked_seq`` below ``durable_seq`` (a heartbeat sent before a push's reply) counts
        as ``durable_seq``: the daemon's table is already there, and the reply's base says so.
        """
        if acked_seq > self.durable_seq and acked_seq <= self.seq:
            self.durable_seq = acked_seq
        acked_seq = max(acked_seq, self.durable_seq)
        log = self.log
        while log and log[0][0] <= acked_seq:
            log.popleft()
        oldest_kept = log[0][0] if log else self.seq + 1
        behind = acked_seq + 1 < oldest_kept and acked_seq < self.seq
        if acked_seq > self.seq or behind:
            log.clear()    # the table reflects every change up to self.seq
            return True, self.seq, self._whole_table(objects), []
        # NOTE: a key may change several times within one reply (put, remove, put again at
        # another offset). The reply's two lists carry no order between them, so only each
        # key's last change is sent: the key then appears in exactly one list.
        last_change: dict[str, tuple] = {}
        seq = acked_seq
        for i, entry in enumerate(log):
            if i == max_changes:
                break
            seq = entry[0]
            last_change.pop(entry[1], None)     # re-insert: keep the order of last changes
            last_change[entry[1]] = entry
        added = [entry[1:] for entry in last_change.values() if entry[2] is not None]
        removed = [key for key, entry in last_change.items() if entry[2] is None]
        return False, seq, added, removed

    def _whole_table(self, objects: dict) -> list[tuple]:
        table = []
        for key in self.keys:
            obj = objects.get(key)
            if obj is None or obj.state is not COMPLETE:
                continue
            for segment, offset in obj.replicas:
                if segment.node is self:
                    table.append((key, segment.segment_id, offset, obj.size_bytes,
                                  obj.checksum, obj.codec))
        return table
