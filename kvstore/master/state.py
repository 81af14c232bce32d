"""``MasterState``: the master's whole metadata and the object verbs of its API.

Structures:
  ``objects``  key -> ObjectMeta, an OrderedDict in LRU order (oldest first): put_end and
               get_replicas move a key to the end, eviction walks from the front.
  ``nodes``    node id -> Node (segments, change log, keys held).
  ``_pending`` (deadline, object) in put_start order: the pending-timeout reclaim queue.
  ``_deferred``heap of (lease end, ...) ranges whose object was force-removed while leased:
               their space is freed only when the lease ends, so a reader never sees reuse.

Every method takes ``now_s`` from the caller's clock read (one ``now`` per request, so a
sweep and a batch see one instant). Not thread-safe: the service serializes calls with a
lock. Membership verbs live in ``registry``, eviction in ``eviction``.
"""

from __future__ import annotations

import heapq
import uuid
from collections import OrderedDict, deque

from kvstore.master import eviction, registry
from kvstore.master.config import MasterConfig
from kvstore.master.membership import Node, Segment
from kvstore.master.objects import (
    CODECS, COMPLETE, ITEM_ALREADY_EXISTS, ITEM_INVALID, ITEM_LEASED, ITEM_NO_SPACE,
    ITEM_NOT_FOUND, ITEM_OK, ITEM_PENDING, ITEM_PINNED, PENDING, TIERS, ObjectMeta,
)
from kvstore.master.placement import place, rank_segments
from kvstore.master.validation import (
    check_batch, check_id, check_keys_strict, check_parallel, invalid, key_problem,
)

MAX_REPLICAS = 16
#: Longest gap between sweeps while requests keep arriving (seconds).
SWEEP_PERIOD_S = 0.5


class MasterState:
    """All metadata of one master incarnation (``master_id``)."""

    def __init__(self, config: MasterConfig, now_s: float):
        self.config = config
        self.master_id = uuid.uuid4().hex[:16]
        self.started_s = now_s
        self.objects: OrderedDict[str, ObjectMeta] = OrderedDict()
        self.nodes: dict[str, Node] = {}
        self._pending: deque[tuple[float, ObjectMeta]] = deque()
        self._deferred: list[tuple[float, int, Segment, int, int]] = []
        self._deferred_count = 0
        self._turn = 0
        self.next_sweep_s = now_s
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # -- membership (see registry) ------------------------------------------------------------

    def register_node(self, node_info, inventory, now_s: float) -> int:
        return registry.register_node(self, node_info, inventory, now_s)

    def heartbeat(self, node_id: str, acked_seq: int, now_s: float):
        return registry.heartbeat(self, node_id, acked_seq, now_s)

    def unregister_node(self, node_id: str) -> int:
        return registry.unregister_node(self, node_id)

    # -- put ----------------------------------------------------------------------------------

    def put_start(self, keys, sizes, num_replicas: int, preferred_tier: int, near_host_id: str,
                  client_id: str, soft_pin_ttl_s: float, hard_pin: bool, codec: int,
                  now_s: float):
        """Allocate and record PENDING objects. Per key: ITEM_OK with its replicas,
        ITEM_ALREADY_EXISTS (COMPLETE or PENDING under the key, nothing allocated),
        ITEM_NO_SPACE (fewer than ``num_replicas`` nodes have room even after eviction),
        ITEM_INVALID (bad key or size). Not idempotent: a retry of an OK key answers
        ALREADY_EXISTS. Returns ``(statuses, messages, picks)`` where ``picks[i]`` is the
        list of ``(segment, offset)`` of key i (empty unless OK)."""
        check_batch(len(keys), self.config.max_batch)
        check_parallel({"keys": len(keys), "sizes": len(sizes)})
        num_replicas = num_replicas or 1
        if num_replicas > MAX_REPLICAS:
            raise invalid(f"replicas must be <= {MAX_REPLICAS}, got {num_replicas}")
        if preferred_tier and preferred_tier not in TIERS:
            raise invalid(f"unknown preferred_tier {preferred_tier}")
        if codec not in CODECS:
            raise invalid(f"unknown codec {codec}")
        check_id(near_host_id, "near_host_id", allow_empty=True)
        check_id(client_id, "client_id", allow_empty=True)
        classes = rank_segments(self.nodes.values(), preferred_tier, near_host_id)
        objects = self.objects
        statuses, messages, all_picks = [], None, []
        deadline_s = now_s + self.config.pending_timeout_s
        for i, (key, size) in enumerate(zip(keys, sizes)):
            problem = key_problem(key) if size > 0 else "size must be > 0"
            if problem is None and key in objects:
                statuses.append(ITEM_ALREADY_EXISTS)
                all_picks.append(())
                continue
            picks = None
            if problem is None:
                self._turn += 1
                picks = place(classes, size, num_replicas, self._turn)
                if picks is None and eviction.make_room(self, classes, size, num_replicas,
                                                        now_s):
                    picks = place(classes, size, num_replicas, self._turn)
            if picks is None:
                statuses.append(ITEM_INVALID if problem else ITEM_NO_SPACE)
                if messages is None:
                    messages = [""] * len(keys)
                messages[i] = problem or (f"no space for {size} bytes on {num_replicas} "
                                          "distinct node(s), even after eviction")
                all_picks.append(())
                continue
            obj = ObjectMeta(key, size, picks, codec, client_id, soft_pin_ttl_s, hard_pin)
            objects[key] = obj
            for segment, _ in picks:
                segment.node.keys.add(key)
                segment.num_replicas += 1
            self._pending.append((deadline_s, obj))
            statuses.append(ITEM_OK)
            all_picks.append(picks)
        eviction.relieve_pressure(self, now_s)
        return statuses, messages, all_picks

    def put_end(self, keys, client_id: str, checksums, now_s: float):
        """Make this writer's PENDING objects COMPLETE (visible). Per key: ITEM_OK (also
        when already COMPLETE by this writer: idempotent), ITEM_NOT_FOUND otherwise."""
        check_batch(len(keys), self.config.max_batch)
        check_parallel({"keys": len(keys), "checksums": len(checksums)}, optional=("checksums",))
        objects = self.objects
        statuses = []
        for i, key in enumerate(keys):
            obj = objects.get(key)
            if obj is None or obj.client_id != client_id:
                statuses.append(ITEM_NOT_FOUND)
                continue
            if obj.state is PENDING:
                obj.state = COMPLETE
                if checksums:
                    obj.checksum = checksums[i]
                if obj.soft_pin_ttl_s:
                    obj.soft_pin_until_s = now_s + obj.soft_pin_ttl_s
                objects.move_to_end(key)
                for segment, offset in obj.replicas:
                    segment.node.log_added(key, segment, offset, obj.size_bytes, obj.checksum,
                                           obj.codec)
            statuses.append(ITEM_OK)
        return statuses

    def put_revoke(self, keys, client_id: str):
        """Drop this writer's PENDING objects and free their space at once (no reader can
        hold a lease on a PENDING object). Per key: ITEM_OK or ITEM_NOT_FOUND. Idempotent."""
        check_batch(len(keys), self.config.max_batch)
        statuses = []
        for key in keys:
            obj = self.objects.get(key)
            if obj is None or obj.state is not PENDING or obj.client_id != client_id:
                statuses.append(ITEM_NOT_FOUND)
                continue
            self.drop_object(obj, 0.0)
            statuses.append(ITEM_OK)
        return statuses

    # -- get ----------------------------------------------------------------------------------

    def get_replicas(self, keys, lease_ttl_s: float, client_host_id: str, now_s: float):
        """Where each COMPLETE key's replicas are; grants (lengthens, never shortens) a lease
        of ``lease_ttl_s`` and marks the key recently used. Per key: ITEM_OK, ITEM_NOT_FOUND,
        ITEM_PENDING, ITEM_INVALID. Returns the reply's parallel arrays plus the segment
        table and per-key messages (None when all are valid)."""
        check_batch(len(keys), self.config.max_batch)
        objects = self.objects
        touch = objects.move_to_end
        lease_until_s = now_s + lease_ttl_s
        statuses, sizes, checksums, codecs = [], [], [], []
        starts, counts, rep_segments, rep_offsets = [], [], [], []
        segment_to_index: dict[Segment, int] = {}
        messages = None
        for i, key in enumerate(keys):
            obj = objects.get(key)
            if obj is not None and obj.state is COMPLETE:
                touch(key)
                if obj.lease_until_s < lease_until_s:
                    obj.lease_until_s = lease_until_s
                statuses.append(ITEM_OK)
                sizes.append(obj.size_bytes)
                checksums.append(obj.checksum)
                codecs.append(obj.codec)
                starts.append(len(rep_offsets))
                replicas = obj.replicas
                counts.append(len(replicas))
                if client_host_id and len(replicas) > 1:
                    replicas = sorted(replicas, key=lambda r: r[0].node.host_id != client_host_id)
                for segment, offset in replicas:
                    index = segment_to_index.get(segment)
                    if index is None:
                        index = segment_to_index[segment] = len(segment_to_index)
                    rep_segments.append(index)
                    rep_offsets.append(offset)
                continue
            if obj is not None:
                status = ITEM_PENDING
            else:
                problem = key_problem(key)
                status = ITEM_NOT_FOUND if problem is None else ITEM_INVALID
                if problem is not None:
                    if messages is None:
                        messages = [""] * len(keys)
                    messages[i] = problem
            statuses.append(status)
            sizes.append(0)
            checksums.append(0)
            codecs.append(0)
            starts.append(len(rep_offsets))
            counts.append(0)
        num_hits = statuses.count(ITEM_OK)
        self.hits += num_hits
        self.misses += len(keys) - num_hits
        return (statuses, sizes, checksums, codecs, starts, counts, rep_segments, rep_offsets,
                list(segment_to_index), messages)

    def renew_lease(self, keys, lease_ttl_s: float, now_s: float):
        """Lengthen the leases of COMPLETE keys (never shortens). Per key: ITEM_OK,
        ITEM_NOT_FOUND, ITEM_PENDING. Idempotent."""
        check_batch(len(keys), self.config.max_batch)
        lease_until_s = now_s + lease_ttl_s
        statuses = []
        for key in keys:
            obj = self.objects.get(key)
            if obj is None or obj.state is not COMPLETE:
                statuses.append(ITEM_NOT_FOUND if obj is None else ITEM_PENDING)
                continue
            if obj.lease_until_s < lease_until_s:
                obj.lease_until_s = lease_until_s
            statuses.append(ITEM_OK)
        return statuses

    def exists(self, keys) -> list[bool]:
        """True for each COMPLETE key. No lease, no LRU touch. A bad key fails the call."""
        check_batch(len(keys), self.config.max_batch)
        get = self.objects.get
        result = [(o := get(k)) is not None and o.state is COMPLETE for k in keys]
        if not all(result):
            check_keys_strict(k for k, found in zip(keys, result) if not found)
        return result

    def match_prefix(self, keys):
        """Length of the leading run of COMPLETE keys, and the node of each one's first
        replica (as indices into the returned node list). A bad key fails the call."""
        check_batch(len(keys), self.config.max_batch)
        node_to_index: dict[Node, int] = {}
        indices = []
        for key in keys:
            obj = self.objects.get(key)
            if obj is None or obj.state is not COMPLETE:
                if obj is None:
                    check_keys_strict([key])
                break
            node = obj.replicas[0][0].node
            index = node_to_index.get(node)
            if index is None:
                index = node_to_index[node] = len(node_to_index)
            indices.append(index)
        return indices, list(node_to_index)

    # -- remove and pin -----------------------------------------------------------------------

    def remove(self, keys, force: bool, now_s: float):
        """Remove COMPLETE objects. Per key: ITEM_OK; ITEM_NOT_FOUND; ITEM_PENDING (being
        written: the writer revokes it, or the pending timeout reclaims it); without
        ``force``, ITEM_PINNED (hard pin) or ITEM_LEASED. A forced remove of a leased object
        hides it at once and frees its space when the lease ends."""
        check_batch(len(keys), self.config.max_batch)
        statuses, messages = [], None
        for i, key in enumerate(keys):
            obj = self.objects.get(key)
            if obj is None:
                problem = key_problem(key)
                statuses.append(ITEM_NOT_FOUND if problem is None else ITEM_INVALID)
                if problem is not None:
                    messages = messages or [""] * len(keys)
                    messages[i] = problem
            elif obj.state is PENDING:
                statuses.append(ITEM_PENDING)
            elif not force and obj.hard_pin:
                statuses.append(ITEM_PINNED)
            elif not force and obj.lease_until_s > now_s:
                statuses.append(ITEM_LEASED)
            else:
                self.drop_object(obj, now_s)
                statuses.append(ITEM_OK)
        return statuses, messages

    def remove_prefix(self, prefix: str, force: bool, now_s: float) -> tuple[int, int]:
        """Remove every COMPLETE object whose key starts with ``prefix`` (non-empty).
        Returns ``(num_removed, num_skipped)``; skipped: pending, or pinned/leased unless
        ``force``."""
        if not prefix:
            raise invalid("prefix must not be empty")
        matching = [o for k, o in self.objects.items() if k.startswith(prefix)]
        statuses, _ = self.remove([o.key for o in matching], force, now_s) if matching \
            else ([], None)
        num_removed = statuses.count(ITEM_OK)
        return num_removed, len(statuses) - num_removed

    def pin(self, keys, ttl_s: float, hard: bool, now_s: float):
        """Hard pin, or soft pin until ``now + ttl_s`` (lengthens only). Per key: ITEM_OK or
        ITEM_NOT_FOUND. Idempotent."""
        check_batch(len(keys), self.config.max_batch)
        if not hard and ttl_s <= 0:
            raise invalid("a soft pin needs ttl_ms > 0")
        statuses = []
        for key in keys:
            obj = self.objects.get(key)
            if obj is None:
                statuses.append(ITEM_NOT_FOUND)
            elif hard:
                obj.hard_pin = True
                statuses.append(ITEM_OK)
            else:
                obj.soft_pin_until_s = max(obj.soft_pin_until_s, now_s + ttl_s)
                obj.soft_pin_ttl_s = max(obj.soft_pin_ttl_s, ttl_s) if obj.state is PENDING \
                    else obj.soft_pin_ttl_s
                statuses.append(ITEM_OK)
        return statuses

    def unpin(self, keys):
        """Clear hard and soft pins. Per key: ITEM_OK or ITEM_NOT_FOUND. Idempotent."""
        check_batch(len(keys), self.config.max_batch)
        statuses = []
        for key in keys:
            obj = self.objects.get(key)
            if obj is None:
                statuses.append(ITEM_NOT_FOUND)
                continue
            obj.hard_pin = False
            obj.soft_pin_until_s = obj.soft_pin_ttl_s = 0.0
            statuses.append(ITEM_OK)
        return statuses

    # -- dropping objects and sweeping --------------------------------------------------------

    def drop_object(self, obj: ObjectMeta, now_s: float) -> None:
        """Forget ``obj`` and free its replicas' space, deferring the free of a leased
        replica until the lease ends."""
        del self.objects[obj.key]
        leased = obj.lease_until_s > now_s
        for segment, offset in obj.replicas:
            segment.num_replicas -= 1
            node = segment.node
            node.keys.discard(obj.key)
            if obj.state is COMPLETE:
                node.log_removed(obj.key)
            if not segment.alive:
                continue
            if leased:
                self._deferred_count += 1
                heapq.heappush(self._deferred, (obj.lease_until_s, self._deferred_count,
                                                segment, offset, obj.size_bytes))
                self.next_sweep_s = min(self.next_sweep_s, obj.lease_until_s)
            else:
                segment.allocator.free(offset, obj.size_bytes)

    def maybe_sweep(self, now_s: float) -> None:
        """Run ``sweep`` if anything may be due (one comparison otherwise)."""
        if now_s >= self.next_sweep_s:
            self.sweep(now_s)

    def sweep(self, now_s: float) -> None:
        """Drop nodes silent past the node TTL, reclaim PENDING objects past the pending
        timeout, free deferred ranges whose lease ended, evict above the high watermark."""
        ttl_s = self.config.node_ttl_s
        for node in [n for n in self.nodes.values() if now_s - n.last_heartbeat_s > ttl_s]:
            registry.drop_node(self, node)
        pending = self._pending
        while pending and pending[0][0] <= now_s:
            _, obj = pending.popleft()
            if obj.state is PENDING and self.objects.get(obj.key) is obj:
                self.drop_object(obj, now_s)
        deferred = self._deferred
        while deferred and deferred[0][0] <= now_s:
            _, _, segment, offset, size = heapq.heappop(deferred)
            if segment.alive:
                segment.allocator.free(offset, size)
        eviction.relieve_pressure(self, now_s)
        next_s = now_s + SWEEP_PERIOD_S
        if self.nodes:
            next_s = min(next_s, min(n.last_heartbeat_s for n in self.nodes.values()) + ttl_s)
        if pending:
            next_s = min(next_s, pending[0][0])
        if deferred:
            next_s = min(next_s, deferred[0][0])
        self.next_sweep_s = next_s
