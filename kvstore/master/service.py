"""The gRPC face of the master: turns requests into ``MasterState`` calls and results into
replies, one method per RPC of ``proto/kvstore/v1/master.proto``.

Error handling: ``Rejected`` from the state becomes the status it names: on the gRPC context
(the reply body is dropped by gRPC), or in an error frame on the fast path (``fastrpc``).
Anything else escaping a handler is a master bug: it is logged with its traceback and
answered INTERNAL, and the master keeps serving.
Every call runs under one lock (state is not thread-safe) after ``maybe_sweep`` with one
clock read, so a request sees one instant.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from kvstore.master import objects
from kvstore.master.state import MasterState
from kvstore.master.validation import Rejected, check_id, invalid
from kvstore.v1 import master_pb2 as pb

log = logging.getLogger("kvstore.master")

# NOTE: the state's status and codec ints are defined once, in ``objects``; they must be the
# wire's values, as the replies carry them as they are.
if ({name: getattr(objects, name) for name in pb.ItemStatus.keys()}
        != dict(pb.ItemStatus.items()) or objects.CODECS != tuple(pb.Codec.values())):
    raise RuntimeError("kvstore.master.objects' statuses or codecs differ from master.proto's")

_MS = 1e-3
#: Longest lease one call may ask for: a lease blocks eviction and reuse of the space.
MAX_LEASE_TTL_MS = 3_600_000
#: Longest soft pin (30 days); a hard pin has no TTL.
MAX_PIN_TTL_MS = 30 * 86_400_000


def _checked_ttl_s(ttl_ms: int, max_ms: int, name: str) -> float:
    if ttl_ms > max_ms:
        raise invalid(f"{name} must be <= {max_ms}, got {ttl_ms}")
    return ttl_ms * _MS


def _segment_tables(segments):
    """The reply's (nodes, segments) tables for segments in index order."""
    node_to_index: dict = {}
    node_refs, segment_refs = [], []
    for segment in segments:
        node = segment.node
        index = node_to_index.get(node)
        if index is None:
            index = node_to_index[node] = len(node_refs)
            node_refs.append(_node_ref(node))
        segment_refs.append(pb.SegmentRef(
            node_index=index, segment_id=segment.segment_id, tier=segment.tier,
            shm_name=segment.shm_name, capacity_bytes=segment.capacity_bytes))
    return node_refs, segment_refs


def _node_ref(node):
    if node.ref is None:
        node.ref = pb.NodeRef(node_id=node.node_id, host_id=node.host_id,
                              data_addr=node.data_addr)
    return node.ref


def _packed_tag(field_name: str) -> bytes:
    """The wire tag of a packed repeated field of GetReplicasResponse."""
    number = pb.GetReplicasResponse.DESCRIPTOR.fields_by_name[field_name].number
    return _varint(number << 3 | 2)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATUSES_TAG, _SIZES_TAG, _CHECKSUMS_TAG, _CODECS_TAG, _STARTS_TAG, _COUNTS_TAG, \
    _SEGMENT_TAG = map(_packed_tag, ("statuses", "sizes", "checksums", "codecs",
                                     "replica_start", "replica_count", "replica_segment"))


#: Batch lengths whose packed 0..n-1 encoding is kept (a client uses a few batch sizes).
_MAX_RANGE_PAYLOADS = 64


def _fill_arrays(reply, num_items: int, num_to_range_payload: dict, tag_name_values) -> None:
    """Set ``reply``'s repeated integer fields from ``(tag, field name, values)``.

    NOTE: why not the constructor: it converts element by element (25-45 ns a key per
    field, ~150 ns where each value is its own int object far away in memory), which was a
    fifth of a 1024-key GetReplicas. A field whose values are all one value (all ITEM_OK,
    one replica each, same size: the common batch) or a ``range`` (replica_start when
    every key has one replica) is encoded here as packed bytes and parsed in one C call
    (~6 ns a key). ``count`` finds the uniform case at C speed: the values are small ints
    or interned sizes (``MasterState.put_start``), so it compares identities.
    """
    encoded = []
    for tag, name, values in tag_name_values:
        if not values:
            continue
        if isinstance(values, range) and values.start == 0 and values.step == 1:
            payload = num_to_range_payload.get(len(values))
            if payload is None:
                if len(num_to_range_payload) >= _MAX_RANGE_PAYLOADS:
                    num_to_range_payload.clear()
                payload = num_to_range_payload[len(values)] = b"".join(map(_varint, values))
        elif len(values) == num_items and values.count(values[0]) == num_items:
            payload = _varint(values[0]) * num_items
        else:
            getattr(reply, name).extend(values)
            continue
        encoded += (tag, _varint(len(payload)), payload)
    if encoded:
        reply.MergeFromString(b"".join(encoded))


class MasterService:
    """Implements every Master RPC as ``method(request, now_s) -> reply`` over ``state``."""

    def __init__(self, state: MasterState, *, metrics_port: int | None = None):
        self.state = state
        self.metrics_port = metrics_port or 0
        self.fast_port = 0  # set by the server once the fast path is bound; 0: none
        self.lock = threading.Lock()
        self._num_to_range_payload: dict[int, bytes] = {}   # see _fill_arrays

    # -- membership ---------------------------------------------------------------------------

    def RegisterNode(self, request, now_s):
        num_adopted = self.state.register_node(request.node, request.inventory, now_s)
        config = self.state.config
        log.info("node %s registered (%d segments, %d objects adopted)",
                 request.node.node_id, len(request.node.segments), num_adopted)
        return pb.RegisterNodeResponse(
            heartbeat_interval_ms=int(config.heartbeat_interval_s * 1000),
            node_ttl_ms=int(config.node_ttl_s * 1000), master_id=self.state.master_id,
            num_objects_adopted=num_adopted)

    def Heartbeat(self, request, now_s):
        result = self.state.heartbeat(request.node_id, request.acked_seq, now_s)
        if result is None:
            return pb.HeartbeatResponse(known=False, master_id=self.state.master_id)
        full_resync, seq, added, removed = result
        if added:
            keys, segment_ids, offsets, lengths, checksums, codecs = zip(*added)
            inventory = pb.Inventory(keys=keys, segment_ids=segment_ids, offsets=offsets,
                                     lengths=lengths, checksums=checksums, codecs=codecs)
        else:
            inventory = None
        return pb.HeartbeatResponse(known=True, master_id=self.state.master_id, seq=seq,
                                    full_resync=full_resync, added=inventory,
                                    removed_keys=removed)

    def UnregisterNode(self, request, now_s):
        num_dropped = self.state.unregister_node(request.node_id)
        log.info("node %s unregistered (%d objects dropped)", request.node_id, num_dropped)
        return pb.UnregisterNodeResponse(num_objects_dropped=num_dropped)

    # -- put ----------------------------------------------------------------------------------

    def PutStart(self, request, now_s):
        statuses, messages, all_picks = self.state.put_start(
            request.keys, request.sizes, request.replicas, request.preferred_tier,
            request.near_host_id, request.client_id,
            _checked_ttl_s(request.soft_pin_ttl_ms, MAX_PIN_TTL_MS, "soft_pin_ttl_ms"),
            request.hard_pin, request.codec, now_s)
        starts, counts, rep_segments, rep_offsets = [], [], [], []
        segment_to_index: dict = {}
        for picks in all_picks:
            starts.append(len(rep_offsets))
            counts.append(len(picks))
            for segment, offset in picks:
                index = segment_to_index.get(segment)
                if index is None:
                    index = segment_to_index[segment] = len(segment_to_index)
                rep_segments.append(index)
                rep_offsets.append(offset)
        nodes, segments = _segment_tables(segment_to_index)
        return pb.PutStartResponse(
            statuses=statuses, error_messages=messages, replica_start=starts,
            replica_count=counts, replica_segment=rep_segments, replica_offset=rep_offsets,
            nodes=nodes, segments=segments)

    def PutEnd(self, request, now_s):
        return pb.PutEndResponse(statuses=self.state.put_end(
            request.keys, request.client_id, request.checksums, now_s))

    def PutRevoke(self, request, now_s):
        return pb.PutRevokeResponse(statuses=self.state.put_revoke(request.keys,
                                                                   request.client_id))

    # -- get ----------------------------------------------------------------------------------

    def _lease_ttl_s(self, lease_ttl_ms: int) -> float:
        return (_checked_ttl_s(lease_ttl_ms, MAX_LEASE_TTL_MS, "lease_ttl_ms") if lease_ttl_ms
                else self.state.config.lease_ttl_s)

    def GetReplicas(self, request, now_s):
        check_id(request.client_host_id, "client_host_id", allow_empty=True)
        lease_ttl_s = self._lease_ttl_s(request.lease_ttl_ms)
        (statuses, sizes, checksums, codecs, starts, counts, rep_segments, rep_offsets,
         segments, messages) = self.state.get_replicas(
            request.keys, lease_ttl_s, request.client_host_id, now_s)
        nodes, segment_refs = _segment_tables(segments)
        reply = pb.GetReplicasResponse(
            replica_offset=rep_offsets, nodes=nodes, segments=segment_refs,
            lease_expires_in_s=lease_ttl_s, error_messages=messages)
        _fill_arrays(reply, len(statuses), self._num_to_range_payload, (
            (_STATUSES_TAG, "statuses", statuses), (_SIZES_TAG, "sizes", sizes),
            (_CHECKSUMS_TAG, "checksums", checksums), (_CODECS_TAG, "codecs", codecs),
            (_STARTS_TAG, "replica_start", starts), (_COUNTS_TAG, "replica_count", counts),
            (_SEGMENT_TAG, "replica_segment", rep_segments)))
        return reply

    def RenewLease(self, request, now_s):
        return pb.RenewLeaseResponse(statuses=self.state.renew_lease(
            request.keys, self._lease_ttl_s(request.lease_ttl_ms), now_s))

    def Exists(self, request, now_s):
        return pb.ExistsResponse(exists=self.state.exists(request.keys))

    def Remove(self, request, now_s):
        statuses, messages = self.state.remove(request.keys, request.force, now_s)
        return pb.RemoveResponse(statuses=statuses, error_messages=messages)

    def RemovePrefix(self, request, now_s):
        num_removed, num_skipped = self.state.remove_prefix(request.prefix, request.force,
                                                            now_s)
        return pb.RemovePrefixResponse(num_removed=num_removed, num_skipped=num_skipped)

    def Pin(self, request, now_s):
        ttl_s = _checked_ttl_s(request.ttl_ms, MAX_PIN_TTL_MS, "ttl_ms")
        return pb.PinResponse(statuses=self.state.pin(request.keys, ttl_s,
                                                      request.hard, now_s))

    def Unpin(self, request, now_s):
        return pb.UnpinResponse(statuses=self.state.unpin(request.keys))

    def MatchPrefix(self, request, now_s):
        indices, nodes = self.state.match_prefix(request.keys)
        return pb.MatchPrefixResponse(num_matched=len(indices), node_index=indices,
                                      nodes=[_node_ref(n) for n in nodes])

    # -- observability ------------------------------------------------------------------------

    def Stats(self, request, now_s):
        from kvstore.master.eviction import tier_usage
        state = self.state
        replicas_by_tier: dict[int, int] = {}
        for node in state.nodes.values():
            for segment in node.segments.values():
                replicas_by_tier[segment.tier] = (replicas_by_tier.get(segment.tier, 0)
                                                  + segment.num_replicas)
        tiers = [pb.TierStats(tier=tier, capacity_bytes=capacity, used_bytes=used,
                              num_objects=replicas_by_tier.get(tier, 0))
                 for tier, (used, capacity) in sorted(tier_usage(state).items())]
        num_pending = len(state.pending)
        num_leased = sum(1 for o in state.objects.values() if o.lease_until_s > now_s)
        return pb.StatsResponse(
            master_id=state.master_id, num_nodes=len(state.nodes),
            num_objects=len(state.objects), num_pending=num_pending,
            tiers=tiers, hits=state.hits, misses=state.misses, evictions=state.evictions,
            num_leased=num_leased, uptime_s=now_s - state.started_s,
            metrics_port=self.metrics_port, max_batch=state.config.max_batch,
            fast_port=self.fast_port)

    def ListNodes(self, request, now_s):
        infos = []
        for node in self.state.nodes.values():
            segments = [pb.SegmentInfo(segment_id=s.segment_id, tier=s.tier,
                                       capacity_bytes=s.capacity_bytes, shm_name=s.shm_name,
                                       path=s.path) for s in node.segments.values()]
            infos.append(pb.NodeInfo(
                node_id=node.node_id, host_id=node.host_id, data_addr=node.data_addr,
                segments=segments,
                used_bytes=sum(s.allocator.used_bytes for s in node.segments.values()),
                num_objects=len(node.keys),
                last_heartbeat_age_s=now_s - node.last_heartbeat_s))
        return pb.ListNodesResponse(nodes=infos)


#: Every RPC of the service, in master.proto order.
METHODS = ("RegisterNode", "Heartbeat", "UnregisterNode", "PutStart", "PutEnd", "PutRevoke",
           "GetReplicas", "RenewLease", "Exists", "Remove", "RemovePrefix", "Pin", "Unpin",
           "MatchPrefix", "Stats", "ListNodes")


def make_invoker(service: MasterService, name: str, clock, metrics, transport: str):
    """``invoke(request) -> reply`` for RPC ``name``, with no gRPC context: the core that both
    the gRPC adapter and the framed fast path (``fastrpc``) call, so both run the same code.

    Runs the handler under the service lock after the due sweep (one clock read per call)
    and records the call in ``metrics`` labelled with ``transport``. Raises ``Rejected``
    with the status to answer: the handler's own, or INTERNAL for a master bug (logged with
    its traceback; the master keeps serving).
    """
    method = getattr(service, name)
    lock, state = service.lock, service.state
    method_metrics = metrics.for_method(name, transport) if metrics else None
    perf_counter = time.perf_counter

    def invoke(request):
        started = perf_counter()
        with lock:
            try:
                now_s = clock.monotonic()
                if now_s >= state.next_sweep_s:
                    state.sweep(now_s)
                return method(request, now_s)
            except Rejected:
                raise
            except Exception as exc:
                log.exception("internal error in %s", name)
                raise Rejected(grpc.StatusCode.INTERNAL,
                               f"internal error in {name}; see the master's log") from exc
            finally:
                # NOTE: under the lock: the recorder updates plain counters (metrics.py)
                if method_metrics is not None:
                    method_metrics(perf_counter() - started)

    return invoke


def make_handlers(service: MasterService, clock, metrics, *, asynchronous: bool):
    """A ``grpc.GenericRpcHandler`` for every method, sync or async."""
    handlers = {}
    for name in METHODS:
        request_class = getattr(pb, f"{name}Request")
        response_class = getattr(pb, f"{name}Response")
        fn = _grpc_adapter(make_invoker(service, name, clock, metrics, "grpc"), response_class)
        if asynchronous:
            fn = _make_async(fn)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler("kvstore.v1.Master", handlers)


def _grpc_adapter(invoke, response_class):
    """Turns ``Rejected`` into the call's gRPC status (the reply body is then dropped)."""

    def handler(request, context):
        try:
            return invoke(request)
        except Rejected as exc:
            context.set_code(exc.code)
            context.set_details(exc.message)
            return response_class()

    return handler


def _make_async(fn):
    async def handler(request, context):
        return fn(request, context)
    return handler
