"""``MasterState``: the master's whole metadata and the put verbs of its API.

Structures:
  ``objects``  key -> ObjectMeta of COMPLETE objects (the only ones readers see): a dict
               whose entries are mirrored in a native index for batch reads
               (``keytable.KeyTable``).
  ``pending``  key -> ObjectMeta of PENDING objects (put_start done, put_end not yet).
  ``nodes``    node id -> Node (segments, change log, keys held).
  ``use_count``a counter bumped by every put_end/get_replicas call; each object records it
               in ``last_used``, so eviction can order objects least recently used first
               without a per-key list update on the hot read path.
  ``_pending_queue`` (deadline, object) in put_start order: the pending-timeout reclaim.
  ``_deferred``heap of (lease end, n, object) whose ``deferred`` ranges (a force-removed
               leased object's replicas, the source of a tier move) are freed only when the
               lease ends (TTL, or the last reader's release), so a reader never sees reuse.
  ``leases``   the lease ids of GetReplicas calls (``leases.LeaseBook``).
  ``moves``    move id -> tier move in flight (``tiering.Move``).
  ``touched``  the nodes that logged a change during the current call (cleared by the
               service before each call): whose daemons a put or remove waits for.

Every method takes ``now_s`` from the caller's clock read (one ``now`` per request, so a
sweep and a batch see one instant). Not thread-safe: the service serializes calls with a
lock. Reads live in ``reads``, remove/pin in ``admin``, registration in ``registration``,
pressure relief (demotion, eviction) in ``eviction``, tier moves in ``tiering``, lease ids
in ``leases``. Every verb answers in domain values (objects, picks, nodes, status
ints from ``objects``); the service and ``replies`` turn them into protobuf replies.
"""

from __future__ import annotations

import heapq
import uuid
from collections import deque

from kvstore.home import home_of, node_seeds
from kvstore.master import admin, eviction, reads, registration, tiering
from kvstore.master.leases import LeaseBook
from kvstore.master.config import MasterConfig
from kvstore.master.keytable import KeyTable
from kvstore.master.nodes import Node, SegmentSpace
from kvstore.master.objects import (
    CODECS, COMPLETE, ITEM_ALREADY_EXISTS, ITEM_INVALID, ITEM_NO_SPACE, ITEM_NOT_FOUND,
    ITEM_OK, PENDING, ObjectMeta,
)
from kvstore.master.placement import place, place_at_home, rank_segments
from kvstore.master.removals import UnconfirmedRemovals
from kvstore.master.reservations import ReservationBook
from kvstore.master.tenancy import TenantBook
from kvstore.master.validation import check_batch, check_id, check_parallel, invalid, key_problem
from kvstore.tiers import TIERS_FASTEST_FIRST, Tier

MAX_REPLICAS = 16
#: Longest gap between sweeps while requests keep arriving (seconds).
SWEEP_PERIOD_S = 0.5


class MasterState:
    """All metadata of one master incarnation (``master_id``)."""

    def __init__(self, config: MasterConfig, now_s: float):
        self.config = config
        self.master_id = uuid.uuid4().hex[:16]
        self.started_s = now_s
        self.objects: KeyTable = KeyTable()   # key -> ObjectMeta, batch-indexed
        self.pending: dict[str, ObjectMeta] = {}
        self.nodes: dict[str, Node] = {}
        self.use_count = 0
        self._pending_queue: deque[tuple[float, ObjectMeta]] = deque()
        self._deferred: list[tuple[float, int, ObjectMeta]] = []
        self._deferred_count = 0
        self._turn = 0
        self.next_sweep_s = now_s
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.demotions = 0      # tier moves completed, all nodes (segments count per node)
        self.promotions = 0
        self.pressure_idle_until_s = now_s   # see eviction.relieve_pressure
        self.leases = LeaseBook()
        self.moves: dict[int, tiering.Move] = {}
        # objects holding an inclusive SSD copy (ObjectMeta.shadow), see tiering.py
        self.shadows: dict = {}
        self.next_move_id = 0
        self.tiered = False     # some node has two tiers or more (moves are possible)
        self.touched: set[Node] = set()
        # removals a daemon did not confirm in time (removals.py; filled by the service)
        self.removals = UnconfirmedRemovals()
        # usage per tenant (tenancy.py), kept by the hooks below; None: no tenants file
        self.tenants = TenantBook(config.tenants) if config.tenants else None
        # space writers hold ahead of their puts (reservations.py)
        self.reservations = ReservationBook()

    # -- membership, reads, remove/pin: see their modules ------------------------------------

    def register_node(self, node_info, inventory, now_s: float) -> int:
        return registration.register_node(self, node_info, inventory, now_s)

    def heartbeat(self, node_id: str, acked_seq: int, now_s: float, moves_done=(),
                  moves_failed=()):
        return registration.heartbeat(self, node_id, acked_seq, now_s, moves_done,
                                      moves_failed)

    def unregister_node(self, node_id: str) -> int:
        return registration.unregister_node(self, node_id)

    def get_replicas(self, keys, lease_ttl_s: float, now_s: float):
        return reads.get_replicas(self, keys, lease_ttl_s, now_s)

    def release_leases(self, lease_ids, now_s: float, key_prefix: str | None = None) -> int:
        return self.leases.release(self, lease_ids, now_s, key_prefix)

    def renew_lease(self, keys, lease_ttl_s: float, now_s: float):
        return reads.renew_lease(self, keys, lease_ttl_s, now_s)

    def exists(self, keys) -> list[bool]:
        return reads.exists(self, keys)

    def exists_wire(self, batch) -> bytes:
        return reads.exists_wire(self, batch)

    def match_prefix(self, keys) -> list[Node]:
        return reads.match_prefix(self, keys)

    def remove(self, keys, force: bool, now_s: float):
        return admin.remove(self, keys, force, now_s)

    def remove_prefix(self, prefix: str, force: bool, now_s: float) -> tuple[int, int]:
        return admin.remove_prefix(self, prefix, force, now_s)

    def pin(self, keys, ttl_s: float, hard: bool, now_s: float):
        return admin.pin(self, keys, ttl_s, hard, now_s)

    def unpin(self, keys):
        return admin.unpin(self, keys)

    # -- put ----------------------------------------------------------------------------------

    def put_start(self, keys, sizes, num_replicas: int, preferred_tier: int, near_host_id: str,
                  client_id: str, soft_pin_ttl_s: float, hard_pin: bool, codec: int,
                  now_s: float, near_node_id: str = "", tenant=None):
        """Allocate and record PENDING objects (placed by ``placement``: preferred tier,
        then ``near_node_id``, then ``near_host_id``). Per key: ITEM_OK with its replicas,
        ITEM_ALREADY_EXISTS (COMPLETE or PENDING under the key, nothing allocated),
        ITEM_NO_SPACE (fewer than ``num_replicas`` nodes have room even after eviction; or,
        for a ``tenant`` with quotas, no tier within its quota has room: ``tenancy``),
        ITEM_INVALID (bad key or size). Not idempotent: a retry of an OK key answers
        ALREADY_EXISTS. Returns ``(statuses, messages, picks)`` where ``picks[i]`` is the
        list of ``(segment, offset)`` of key i (empty unless OK)."""
        check_batch(len(keys), self.config.max_batch)
        check_parallel({"keys": len(keys), "sizes": len(sizes)})
        num_replicas = num_replicas or 1
        if num_replicas > MAX_REPLICAS:
            raise invalid(f"replicas must be <= {MAX_REPLICAS}, got {num_replicas}")
        if preferred_tier and preferred_tier not in TIERS_FASTEST_FIRST:
            raise invalid(f"unknown preferred_tier {preferred_tier}")
        tier = Tier(preferred_tier) if preferred_tier else None   # 0: the wire's "any"
        if codec not in CODECS:
            raise invalid(f"unknown codec {codec}")
        check_id(near_host_id, "near_host_id", allow_empty=True)
        check_id(near_node_id, "near_node_id", allow_empty=True)
        check_id(client_id, "client_id", allow_empty=True)
        classes = rank_segments(self.nodes.values(), tier, near_host_id, near_node_id)
        # NOTE: a put free to choose (no tier, no node named) puts its first replica on the
        # key's home node, where a client's first get looks (docs/ARCHITECTURE.md, Home reads)
        seeds = node_seeds(self.nodes) if tier is None and not near_node_id else None
        objects, pending = self.objects, self.pending
        statuses, messages, all_picks = [], None, []
        deadline_s = now_s + self.config.pending_timeout_s
        # NOTE: once eviction could not make room for some size, it cannot for a larger one
        # in this same call either (nothing is freed meanwhile): skip the futile rescans.
        hopeless_size = None
        book = self.tenants if tenant is not None and tenant.tier_to_quota_bytes else None
        for i, (key, size) in enumerate(zip(keys, sizes)):
            problem = key_problem(key) if size > 0 else "size must be > 0"
            if problem is None and (key in objects or key in pending):
                statuses.append(ITEM_ALREADY_EXISTS)
                all_picks.append(())
                continue
            picks = None
            key_classes = classes
            if problem is None:
                self._turn += 1
                if book is not None:
                    key_classes = book.allowed_classes(tenant, classes, size, num_replicas)
                picks = self._place(key, key_classes, size, num_replicas, seeds)
                # NOTE: the hopeless shortcut holds only for the call's one set of classes
                if picks is None and (key_classes is not classes or hopeless_size is None
                                      or size < hopeless_size):
                    if eviction.make_room(self, key_classes, size, num_replicas, now_s):
                        picks = self._place(key, key_classes, size, num_replicas, seeds)
                    elif key_classes is classes:
                        hopeless_size = size
            if picks is None:
                statuses.append(ITEM_INVALID if problem else ITEM_NO_SPACE)
                if messages is None:
                    messages = [""] * len(keys)
                messages[i] = problem or (
                    book.refusal(tenant, size) if key_classes is not classes else
                    f"no space for {size} bytes on {num_replicas} distinct node(s) of "
                    f"{len(self.nodes)} live, even after eviction")
                all_picks.append(())
                continue
            obj = ObjectMeta(key, size, picks, codec, client_id, soft_pin_ttl_s, hard_pin)
            pending[key] = obj
            for segment, _ in picks:
                segment.node.keys.add(key)
                segment.num_replicas += 1
            self._pending_queue.append((deadline_s, obj))
            if self.tenants is not None:
                self.tenants.object_added(obj)
            statuses.append(ITEM_OK)
            all_picks.append(picks)
        eviction.relieve_pressure(self, now_s)
        return statuses, messages, all_picks

    def _place(self, key: str, classes, size: int, num_replicas: int, seeds):
        """``placement.place_at_home`` of ``key`` when ``seeds`` (``home.node_seeds``), else
        (or when the home has no room) ``placement.place``."""
        if seeds:
            picks = place_at_home(classes, home_of(key, seeds), size, num_replicas, self._turn)
            if picks is not None:
                return picks
        return place(classes, size, num_replicas, self._turn)

    def put_end(self, keys, client_id: str, checksums, now_s: float):
        """Make this writer's PENDING objects COMPLETE (visible). Per key: ITEM_OK (also
        when already COMPLETE by this writer: idempotent), ITEM_NOT_FOUND otherwise.
        Returns ``(statuses, committed)``: ``committed`` the objects made COMPLETE now."""
        check_batch(len(keys), self.config.max_batch)
        check_parallel({"keys": len(keys), "checksums": len(checksums)}, optional=("checksums",))
        objects, pending = self.objects, self.pending
        self.use_count += 1
        statuses, committed = [], []
        for i, key in enumerate(keys):
            obj = pending.get(key)
            if obj is not None and obj.client_id == client_id:
                del pending[key]
                objects.store(key, obj)       # objects[key] = obj (KeyTable)
                obj.state = COMPLETE
                obj.last_used = self.use_count
                if checksums:
                    obj.checksum = checksums[i]
                if obj.soft_pin_ttl_s:
                    obj.soft_pin_until_s = now_s + obj.soft_pin_ttl_s
                for segment, offset in obj.replicas:
                    segment.node.log_added(key, segment, offset, obj.size_bytes, obj.checksum,
                                           obj.codec)
                statuses.append(ITEM_OK)
                committed.append(obj)
                continue
            obj = objects.get(key)
            if obj is not None and obj.client_id == client_id:
                # NOTE: a retried put_end must not answer before the commit is durable
                # either: its nodes are waited for like those of a first commit
                self.touched.update(segment.node for segment, _ in obj.replicas
                                    if segment.node.commit_push)
                statuses.append(ITEM_OK)
            else:
                statuses.append(ITEM_NOT_FOUND)
        return statuses, committed

    def reserve(self, size_bytes: int, min_bytes: int, client_id: str, near_host_id: str,
                ttl_s: float, now_s: float, writer: str = ""):
        """Grant ``client_id`` space ahead of its puts: ``(Reservation, "")`` or ``(None,
        why)``; see ``reservations.ReservationBook.grant``."""
        return self.reservations.grant(self, size_bytes, min_bytes, client_id, near_host_id,
                                       ttl_s, now_s, writer)

    def put_end_reserved(self, reservation_id: int, client_id: str, keys, offsets, sizes,
                         checksums, now_s: float, writer: str = ""):
        """Record keys written inside a reservation COMPLETE: ``(statuses, messages,
        committed)``; see ``reservations.ReservationBook.commit``."""
        return self.reservations.commit(self, reservation_id, client_id, keys, offsets,
                                        sizes, checksums, now_s, writer)

    def put_revoke(self, keys, client_id: str):
        """Drop this writer's PENDING objects and free their space at once (no reader can
        hold a lease on a PENDING object). Per key: ITEM_OK or ITEM_NOT_FOUND. Idempotent."""
        check_batch(len(keys), self.config.max_batch)
        statuses = []
        for key in keys:
            obj = self.pending.get(key)
            if obj is None or obj.client_id != client_id:
                statuses.append(ITEM_NOT_FOUND)
                continue
            self.drop_object(obj, 0.0)
            statuses.append(ITEM_OK)
        return statuses

    def num_leased(self, now_s: float) -> int:
        """How many COMPLETE objects hold a read lease at ``now_s`` (scans every object)."""
        return sum(1 for obj in self.objects.values() if obj.lease_until_s > now_s)

    # -- dropping objects and sweeping --------------------------------------------------------

    def drop_object(self, obj: ObjectMeta, now_s: float) -> None:
        """Forget ``obj`` and free its replicas' space, deferring the free of a leased
        replica until the lease ends."""
        complete = obj.state is COMPLETE
        del (self.objects if complete else self.pending)[obj.key]
        if self.tenants is not None:
            self.tenants.object_dropped(obj)
        if obj.shadow is not None:
            tiering.drop_shadow(self, obj, now_s)
        for segment, offset in obj.replicas:
            segment.num_replicas -= 1
            node = segment.node
            node.keys.discard(obj.key)
            # NOTE: a PENDING object's removal too where writers commit themselves: the
            # writer may have committed it on the daemon before (or after) this drop, and
            # the daemon's table must not keep (or take) it
            if complete or node.client_commit:
                node.log_removed(obj.key)
            self.free_range(obj, segment, offset, now_s)

    def free_range(self, obj: ObjectMeta, segment: SegmentSpace, offset: int,
                   now_s: float) -> None:
        """Free one of ``obj``'s ranges at once, or when its lease ends if it is leased."""
        if not segment.alive:
            return
        if obj.lease_until_s <= now_s:
            segment.allocator.free(offset, obj.size_bytes)
            return
        if obj.deferred is None:
            obj.deferred = []
            self._deferred_count += 1
            heapq.heappush(self._deferred, (obj.lease_until_s, self._deferred_count, obj))
            self.next_sweep_s = min(self.next_sweep_s, obj.lease_until_s)
        obj.deferred.append((segment, offset))

    def lease_ended(self, obj: ObjectMeta) -> None:
        """Free the ranges that waited for ``obj``'s lease (its last reader released)."""
        deferred, obj.deferred = obj.deferred, None
        for segment, offset in deferred or ():
            if segment.alive:
                segment.allocator.free(offset, obj.size_bytes)

    def maybe_sweep(self, now_s: float) -> None:
        """Run ``sweep`` if anything may be due (one comparison otherwise)."""
        if now_s >= self.next_sweep_s:
            self.sweep(now_s)

    def sweep(self, now_s: float) -> None:
        """Drop nodes silent past the node TTL, reclaim PENDING objects past the pending
        timeout, free deferred ranges whose lease ended, give up tier moves past their
        timeout, demote or evict above the high watermark."""
        ttl_s = self.config.node_ttl_s
        for node in [n for n in self.nodes.values() if now_s - n.last_heartbeat_s > ttl_s]:
            registration.drop_node(self, node)
        queue = self._pending_queue
        while queue and queue[0][0] <= now_s:
            _, obj = queue.popleft()
            if obj.state is PENDING and self.pending.get(obj.key) is obj:
                self.drop_object(obj, now_s)
        deferred = self._deferred
        while deferred and deferred[0][0] <= now_s:
            _, _, obj = heapq.heappop(deferred)
            if obj.lease_until_s > now_s and obj.deferred:   # a reader leased it again
                self._deferred_count += 1
                heapq.heappush(deferred, (obj.lease_until_s, self._deferred_count, obj))
            else:
                self.lease_ended(obj)
        self.leases.expire(now_s)
        self.reservations.expire(now_s)
        tiering.expire(self, now_s)
        eviction.relieve_pressure(self, now_s)
        next_s = now_s + SWEEP_PERIOD_S
        if self.nodes:
            next_s = min(next_s, min(n.last_heartbeat_s for n in self.nodes.values()) + ttl_s)
        if queue:
            next_s = min(next_s, queue[0][0])
        if deferred:
            next_s = min(next_s, deferred[0][0])
        reclaim_s = self.reservations.next_expiry_s()
        if reclaim_s is not None:
            next_s = min(next_s, reclaim_s)
        self.next_sweep_s = next_s
