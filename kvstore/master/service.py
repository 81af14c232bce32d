"""The master's service: turns requests into ``MasterState`` calls and results into
replies, one method per RPC of ``proto/kvstore/v1/master.proto``. ``invoker.make_invoker``
runs a method for either transport (lock, sweep, durable wait); ``grpc_handlers`` binds
them to gRPC, ``fast_server`` to the framed fast path.

Error handling: ``Rejected`` from the state becomes the status it names: on the gRPC context
(the reply body is dropped by gRPC), or in an error frame on the fast path (``fast_server``).
Anything else escaping a handler is a master bug: it is logged with its traceback and
answered INTERNAL, and the master keeps serving.
Every call runs under one lock (state is not thread-safe) after ``maybe_sweep`` with one
clock read, so a request sees one instant. Durable commit: after a PutEnd, Remove or
RemovePrefix that logged changes, the reply waits, outside the lock, until the daemons of
the nodes it touched confirmed them (``commits.CommitPusher``, at most ``--commit-timeout``);
other calls that logged changes (PutStart's evictions, tier-move switches) push them in the
background.
"""

from __future__ import annotations

import logging
import threading
import time

from kvstore.master import auth, replies
from kvstore.master.capabilities import CapabilityIssuer
from kvstore.master.home_nodes import home_nodes_reply, touch_keys
from kvstore.master.objects import ITEM_NOT_FOUND, ITEM_OK, ITEM_UNCOMMITTED
from kvstore.master.state import MasterState
from kvstore.master.tenancy import CLUSTER
from kvstore.master.validation import Rejected, check_batch, check_id, invalid
from kvstore.master.wire import KeyBatch, WireReply
from kvstore.v1 import master_pb2 as pb

log = logging.getLogger("kvstore.master")

_MS = 1e-3
#: Longest lease one call may ask for: a lease blocks eviction and reuse of the space.
MAX_LEASE_TTL_MS = 3_600_000
#: Longest soft pin (30 days); a hard pin has no TTL.
MAX_PIN_TTL_MS = 30 * 86_400_000


def _checked_ttl_s(ttl_ms: int, max_ms: int, name: str) -> float:
    if ttl_ms > max_ms:
        raise invalid(f"{name} must be <= {max_ms}, got {ttl_ms}")
    return ttl_ms * _MS


#: The location lease a daemon gets, as a fraction of --commit-timeout. NOTE: below 1 with
#: room: the daemon counts the lease from before it sent the heartbeat (so from before the
#: master built the reply), and a removal completes unconfirmed only --commit-timeout after
#: it was logged, so a lease <= the timeout ends before any removal the daemon missed
#: completes; 0.75 leaves a quarter for two processes' clocks and scheduling, and stays above
#: the 1 s heartbeat interval at the default 2 s timeout (so leases overlap between beats).
LOCATION_LEASE_FRACTION = 0.75


def location_lease_ms(config, node) -> int:
    """How long a daemon may serve location reads after an up-to-date heartbeat (0: never:
    --commit-timeout 0, or a node that takes no commit pushes, so removals there never
    wait for it). See daemon/location_reads.py."""
    if config.commit_timeout_s <= 0 or not node.commit_push:
        return 0
    return int(config.commit_timeout_s * LOCATION_LEASE_FRACTION * 1000)


class MasterService:
    """Implements every Master RPC as ``method(request, now_s, caller) -> reply`` over
    ``state``, ``caller`` being the ``tenancy.Principal`` the call comes from (its request
    already scoped into the caller's namespace by the invoker):
    the one layer that turns the state's results into replies (those with tables or packed
    arrays through ``replies.ReplyEncoder``, which holds the encoder's caches)."""

    def __init__(self, state: MasterState, *, metrics_port: int | None = None,
                 wall_clock=time.time, data_token: str = ""):
        self.state = state
        self.capabilities = CapabilityIssuer(state.config, wall_clock)
        self._wall_clock = wall_clock
        self.data_token = data_token   # Stats' data_token for tenants (auth.Authenticator)
        self.metrics_port = metrics_port or 0
        self.fast_port = 0  # set by the server once the fast path is bound; 0: none
        self.lock = threading.Lock()
        self.replies = replies.ReplyEncoder(state)
        self.commits = None   # commits.CommitPusher, set by the server; None: no waiting
        # the HA fence (``kvstore.ha.leadership.Leadership``); None: a master without etcd
        self.leadership = None
        # called after a RegisterNode is handled and before it is answered, off the lock (HA:
        # the node list goes to etcd, so a new leader waits for every daemon holding data)
        self.on_registered = None

    # -- registration -------------------------------------------------------------------------

    def RegisterNode(self, request, now_s, caller=CLUSTER):
        num_adopted = self.state.register_node(request.node, request.inventory, now_s)
        if self.state.nodes[request.node.node_id].read_capabilities:
            self.capabilities.any_reads = True
        if num_adopted:
            self.replies.rows.forget()      # adoption may have added a replica to an object
        config = self.state.config
        log.info("node %s registered (%d segments, %d objects adopted)",
                 request.node.node_id, len(request.node.segments), num_adopted)
        return pb.RegisterNodeResponse(
            heartbeat_interval_ms=int(config.heartbeat_interval_s * 1000),
            node_ttl_ms=int(config.node_ttl_s * 1000), master_id=self.state.master_id,
            num_objects_adopted=num_adopted,
            capability_secret=self.state.nodes[request.node.node_id].capability_secret or b"",
            read_capabilities=self.state.nodes[request.node.node_id].read_capabilities,
            location_lease_ms=location_lease_ms(config,
                                                self.state.nodes[request.node.node_id]))

    def Heartbeat(self, request, now_s, caller=CLUSTER):
        result = self.state.heartbeat(request.node_id, request.acked_seq, now_s,
                                      request.moves_done, request.moves_failed)
        base_seq = 0
        if result is not None:
            add_row = self.replies.rows.add
            for obj in result[-1]:          # moved objects: their cached rows are stale
                add_row(obj)
            base_seq = self.state.nodes[request.node_id].durable_seq
        reply = replies.heartbeat(self.state.master_id, result, base_seq)
        if result is not None:
            # NOTE: the daemon serves location reads only after a reply that carries every
            # change up to now (daemon/location_reads.py)
            reply.up_to_date = result[1] == self.state.nodes[request.node_id].seq
        if reply.moves:
            node = self.state.nodes[request.node_id]
            for move in reply.moves:
                move.dst_capability = self.capabilities.for_move(node, move)
        return reply

    def UnregisterNode(self, request, now_s, caller=CLUSTER):
        num_dropped = self.state.unregister_node(request.node_id)
        log.info("node %s unregistered (%d objects dropped)", request.node_id, num_dropped)
        return pb.UnregisterNodeResponse(num_objects_dropped=num_dropped)

    # -- put ----------------------------------------------------------------------------------

    def PutStart(self, request, now_s, caller=CLUSTER):
        sizes = self.replies.sizes.intern(request.sizes)
        statuses, messages, all_picks = self.state.put_start(
            request.keys, sizes, request.replicas,
            request.preferred_tier, request.near_host_id, request.client_id,
            _checked_ttl_s(request.soft_pin_ttl_ms, MAX_PIN_TTL_MS, "soft_pin_ttl_ms"),
            request.hard_pin, request.codec, now_s, request.near_node_id, caller.tenant)
        reply = self.replies.put_start(statuses, messages, all_picks)
        if self.capabilities.needed(all_picks):
            config = self.state.config
            # NOTE: only where every replica's daemon verifies a capability and takes
            # CLIENT_COMMIT: the writer's commit is then as checked as the master's push.
            # Not for tenants: the daemons record namespaced keys, which the tenant's
            # client never names (the master maps them), so their commits are the master's
            reply.client_commit = config.client_commit and config.commit_timeout_s > 0 and \
                caller.tenant is None and all(
                segment.node.client_commit and segment.node.capability_secret
                for picks in all_picks for segment, _ in picks)
            covered: frozenset = frozenset()
            if reply.client_commit and request.batch_capabilities:
                # NOTE: the writer's commits then cost the daemon one MAC per batch
                # instead of one per entry (issue 10, 10m); the per-replica capabilities
                # stay for the WRITEs (tcp, NIXL checks) and a commit of part of a batch,
                # except on nodes the writer reaches only through shm (``covered``)
                batch_caps, covered = self.capabilities.for_put_batch(
                    request.keys, sizes, all_picks, reply.nodes, request.shm_write_host_id)
                reply.node_capability.extend(batch_caps)
            reply.replica_capability.extend(self.capabilities.for_put(
                request.keys, sizes, all_picks, skip_nodes=covered))
        return reply

    def PutEnd(self, request, now_s, caller=CLUSTER):
        if request.reservation_id:
            # NOTE: keys written inside a reservation: no PutStart came before
            statuses, messages, committed = self.state.put_end_reserved(
                request.reservation_id, request.client_id, request.keys,
                request.reserved_offsets, request.reserved_sizes, request.checksums, now_s,
                caller.name)
        else:
            statuses, committed = self.state.put_end(request.keys, request.client_id,
                                                     request.checksums, now_s)
            messages = None
        add_row = self.replies.rows.add
        for obj in committed:
            add_row(obj)
        if messages is None:
            return pb.PutEndResponse(statuses=statuses)
        reply = pb.PutEndResponse(statuses=statuses)
        if any(messages):
            reply.error_messages.extend(messages)
        if request.client_committed:
            caps = self._reserved_commits(request, statuses, caller)
            if caps is None:
                # NOTE: the invoker reads client_committed after this handler: cleared, the
                # reply waits for the master's push like any PutEnd without it
                request.client_committed = False
            else:
                reply.reserved_capabilities.extend(caps)
        return reply

    def _reserved_commits(self, request, statuses, caller) -> list[bytes] | None:
        """The write capability of each OK key of a reserved PutEnd (exactly its range and
        key; b"" elsewhere) for the writer's own commit on the daemon, or None where the
        master commits them itself: the conditions of PutStart's ``client_commit``."""
        reservation = self.state.reservations.id_to_reservation.get(request.reservation_id)
        config = self.state.config
        if (reservation is None or not config.client_commit or config.commit_timeout_s <= 0
                or caller.tenant is not None):
            return None
        segment = reservation.segment
        node = segment.node
        if not (node.client_commit and node.capability_secret):
            return None
        return self.capabilities.for_reserved_commits(
            segment, request.keys, request.reserved_offsets, request.reserved_sizes,
            [status == ITEM_OK for status in statuses])

    def Reserve(self, request, now_s, caller=CLUSTER):
        """Grant the writer a range to fill with later puts (master/reservations.py).
        A reply with reservation_id 0 and ``refusal`` when none can be granted (no DRAM
        room below the high watermark, reservations off, or a tenant: its quota does not
        count reservations yet, so tenants put through PutStart). INVALID_ARGUMENT for a
        size of 0 or a bad id. Not idempotent (it allocates)."""
        if caller.tenant is not None:
            return pb.ReserveResponse(refusal="reservations are not offered to tenants")
        config = self.state.config
        ttl_s = config.reservation_ttl_s
        if request.ttl_ms:
            ttl_s = min(ttl_s, request.ttl_ms / 1000)
        reservation, refusal = self.state.reserve(
            request.size_bytes, request.min_bytes, request.client_id, request.near_host_id,
            ttl_s, now_s, caller.name)
        if reservation is None:
            return pb.ReserveResponse(refusal=refusal)
        segment = reservation.segment
        return pb.ReserveResponse(
            reservation_id=reservation.reservation_id,
            node=self.replies.node_refs.get(segment.node),
            segment=pb.SegmentRef(node_index=0, segment_id=segment.segment_id,
                                  tier=segment.tier, shm_name=segment.shm_name,
                                  capacity_bytes=segment.capacity_bytes),
            offset=reservation.offset, size_bytes=reservation.size_bytes,
            capability=self.capabilities.for_reservation(reservation, ttl_s),
            ttl_ms=int(ttl_s * 1000))

    def uncommitted(self, request, reply, failed_nodes, now_s) -> None:
        """After a PutEnd whose commit ``failed_nodes`` did not confirm in time: drop each
        object that still has a replica there (or lost every replica meanwhile) and answer
        its key ITEM_UNCOMMITTED, naming the node. Keys all of whose replicas confirmed
        stay OK."""
        failed = set(failed_nodes)
        objects, timeout_s = self.state.objects, self.state.config.commit_timeout_s
        messages = list(reply.error_messages) or [""] * len(request.keys)
        for i, key in enumerate(request.keys):
            if reply.statuses[i] != ITEM_OK:
                continue
            obj = objects.get(key)
            if obj is None or obj.client_id != request.client_id:
                reply.statuses[i] = ITEM_UNCOMMITTED
                messages[i] = "its replicas' nodes were dropped before confirming the commit"
                continue
            silent = sorted(s.node.node_id for s, _ in obj.replicas if s.node in failed)
            if silent:
                self.state.drop_object(obj, now_s)
                reply.statuses[i] = ITEM_UNCOMMITTED
                messages[i] = (f"node(s) {', '.join(silent)} did not confirm the commit "
                               f"within {timeout_s:g}s; the object was dropped")
        del reply.error_messages[:]
        reply.error_messages.extend(messages)

    def PutRevoke(self, request, now_s, caller=CLUSTER):
        return pb.PutRevokeResponse(statuses=self.state.put_revoke(request.keys,
                                                                   request.client_id))

    # -- get ----------------------------------------------------------------------------------

    def _lease_ttl_s(self, lease_ttl_ms: int) -> float:
        return (_checked_ttl_s(lease_ttl_ms, MAX_LEASE_TTL_MS, "lease_ttl_ms") if lease_ttl_ms
                else self.state.config.lease_ttl_s)

    def GetReplicas(self, request, now_s, caller=CLUSTER):
        return self._get_replicas(request, now_s, wire=False)

    def get_replicas_wire(self, request, now_s, caller=CLUSTER):
        """GetReplicas for the fast path: the common batch's reply (every key found, one
        replica each, no read capabilities) in wire form (``wire.WireReply``), any other
        the message, as ``GetReplicas``."""
        return self._get_replicas(request, now_s, wire=True)

    def _get_replicas(self, request, now_s, *, wire: bool):
        check_id(request.client_host_id, "client_host_id", allow_empty=True)
        lease_ttl_s = self._lease_ttl_s(request.lease_ttl_ms)
        objs, missing, lease_id = self.state.get_replicas(request.keys, lease_ttl_s, now_s)
        if wire and not self.capabilities.any_reads:
            payload = self.replies.get_replicas_wire(objs, missing, lease_ttl_s, lease_id)
            if payload is not None:
                return WireReply(payload)
        reply = self.replies.get_replicas(objs, missing, lease_ttl_s, request.client_host_id)
        reply.lease_id = lease_id
        if self.capabilities.any_reads:
            caps = self.capabilities.for_get(self.state.nodes, reply, objs, lease_ttl_s,
                                             request.client_host_id if request.shm_reads
                                             else "")
            if caps is not None:
                reply.replica_read_capability.extend(caps)
        return reply

    def ReleaseLeases(self, request, now_s, caller=CLUSTER):
        check_batch(len(request.lease_ids), self.state.config.max_batch)
        return pb.ReleaseLeasesResponse(
            num_released=self.state.release_leases(
                request.lease_ids, now_s,
                caller.tenant.key_prefix if caller.tenant is not None else None))

    def RenewLease(self, request, now_s, caller=CLUSTER):
        return pb.RenewLeaseResponse(statuses=self.state.renew_lease(
            request.keys, self._lease_ttl_s(request.lease_ttl_ms), now_s))

    def Exists(self, request, now_s, caller=CLUSTER):
        return pb.ExistsResponse(exists=self.state.exists(request.keys))

    def exists_wire(self, request, now_s, caller=CLUSTER):
        """Exists of a request ``wire.parse_request`` decoded (the fast path): the reply in
        wire form (``wire.WireReply``). A tenant's request comes scoped into its namespace
        (``tenancy``: its keys a list of str): that one is answered by ``Exists``."""
        keys = request.keys
        if type(keys) is not KeyBatch:
            return self.Exists(request, now_s, caller)
        return WireReply(self.state.exists_wire(keys))

    def Remove(self, request, now_s, caller=CLUSTER):
        statuses, messages = self.state.remove(request.keys, request.force, now_s)
        removals = self.state.removals
        if removals:
            # NOTE: a retry of a removal some node has not confirmed: the key is gone from
            # the table, but the call waits for that node again and answers OK once it did
            # (``_settle`` turns it back to ITEM_UNCOMMITTED if it still did not)
            listed = set(removals.touch(request.keys, self.state.nodes))
            statuses = [ITEM_OK if status == ITEM_NOT_FOUND and key in listed else status
                        for key, status in zip(request.keys, statuses)]
            if listed:
                messages = messages or [""] * len(request.keys)
                self._unwaitable(request.keys, statuses, messages)
        return pb.RemoveResponse(statuses=statuses, error_messages=messages)

    def _unwaitable(self, keys, statuses, messages) -> None:
        """Keys whose unconfirmed removal is owed by a node that is not registered (dropped,
        not back yet): nothing to wait for, so ITEM_UNCOMMITTED now."""
        nodes, removals = self.state.nodes, self.state.removals
        for i, key in enumerate(keys):
            if statuses[i] != ITEM_OK:
                continue
            gone = [node_id for node_id in removals.silent_nodes(key, nodes)
                    if node_id not in nodes]
            if gone:
                statuses[i] = ITEM_UNCOMMITTED
                messages[i] = unconfirmed_message(gone, self.state.config.commit_timeout_s)

    def RemovePrefix(self, request, now_s, caller=CLUSTER):
        num_removed, num_skipped = self.state.remove_prefix(request.prefix, request.force,
                                                            now_s)
        removals = self.state.removals
        if removals:        # a retry waits for the removals not yet confirmed (see Remove)
            removals.touch(removals.with_prefix(request.prefix), self.state.nodes)
        return pb.RemovePrefixResponse(num_removed=num_removed, num_skipped=num_skipped)

    def Pin(self, request, now_s, caller=CLUSTER):
        ttl_s = _checked_ttl_s(request.ttl_ms, MAX_PIN_TTL_MS, "ttl_ms")
        return pb.PinResponse(statuses=self.state.pin(request.keys, ttl_s,
                                                      request.hard, now_s))

    def Unpin(self, request, now_s, caller=CLUSTER):
        return pb.UnpinResponse(statuses=self.state.unpin(request.keys))

    def MatchPrefix(self, request, now_s, caller=CLUSTER):
        return self.replies.match_prefix(self.state.match_prefix(request.keys))

    # -- observability ------------------------------------------------------------------------

    def Stats(self, request, now_s, caller=CLUSTER):
        state = self.state
        return pb.StatsResponse(
            master_id=state.master_id, num_nodes=len(state.nodes),
            num_objects=len(state.objects), num_pending=len(state.pending),
            tiers=replies.tier_stats(s for n in state.nodes.values()
                                     for s in n.segments.values()), hits=state.hits,
            misses=state.misses, evictions=state.evictions,
            num_leased=state.num_leased(now_s), uptime_s=now_s - state.started_s,
            metrics_port=self.metrics_port, max_batch=state.config.max_batch,
            fast_port=self.fast_port, tenants=replies.tenant_usages(state.tenants, caller),
            data_token=self.data_token if caller.tenant is not None else "")

    def ListNodes(self, request, now_s, caller=CLUSTER):
        return pb.ListNodesResponse(nodes=replies.node_infos(self.state.nodes.values(), now_s,
                                                             self.state.reservations))

    def GetHomeNodes(self, request, now_s, caller=CLUSTER):
        return home_nodes_reply(self.state.nodes, caller, self._wall_clock())

    def TouchKeys(self, request, now_s, caller=CLUSTER):
        return pb.TouchKeysResponse(num_found=touch_keys(self.state, request.keys, now_s))


def unconfirmed_message(node_ids, timeout_s: float) -> str:
    """The error message of a removal ``node_ids`` did not confirm."""
    return (f"removed from the master, but node(s) {', '.join(node_ids)} did not confirm "
            f"within {timeout_s:g}s: a master restarted before they do would serve it "
            "again; retry the remove (it returns once they confirmed)")
