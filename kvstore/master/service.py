"""The gRPC face of the master: turns requests into ``MasterState`` calls and results into
replies, one method per RPC of ``proto/kvstore/v1/master.proto``.

Error handling: ``Rejected`` from the state becomes the status it names: on the gRPC context
(the reply body is dropped by gRPC), or in an error frame on the fast path (``fast_server``).
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

from kvstore.master import auth, replies
from kvstore.master.state import MasterState
from kvstore.master.tenancy import CLUSTER, scope_request
from kvstore.master.validation import Rejected, check_batch, check_id, invalid
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


class MasterService:
    """Implements every Master RPC as ``method(request, now_s, caller) -> reply`` over
    ``state``, ``caller`` being the ``tenancy.Principal`` the call comes from (its request
    already scoped into the caller's namespace by the invoker):
    the one layer that turns the state's results into replies (those with tables or packed
    arrays through ``replies.ReplyEncoder``, which holds the encoder's caches)."""

    def __init__(self, state: MasterState, *, metrics_port: int | None = None,
                 data_token: str = ""):
        self.state = state
        self.data_token = data_token   # Stats' data_token for tenants (auth.Authenticator)
        self.metrics_port = metrics_port or 0
        self.fast_port = 0  # set by the server once the fast path is bound; 0: none
        self.lock = threading.Lock()
        self.replies = replies.ReplyEncoder(state)

    # -- registration -------------------------------------------------------------------------

    def RegisterNode(self, request, now_s, caller=CLUSTER):
        num_adopted = self.state.register_node(request.node, request.inventory, now_s)
        if num_adopted:
            self.replies.rows.forget()      # adoption may have added a replica to an object
        config = self.state.config
        log.info("node %s registered (%d segments, %d objects adopted)",
                 request.node.node_id, len(request.node.segments), num_adopted)
        return pb.RegisterNodeResponse(
            heartbeat_interval_ms=int(config.heartbeat_interval_s * 1000),
            node_ttl_ms=int(config.node_ttl_s * 1000), master_id=self.state.master_id,
            num_objects_adopted=num_adopted)

    def Heartbeat(self, request, now_s, caller=CLUSTER):
        result = self.state.heartbeat(request.node_id, request.acked_seq, now_s,
                                      request.moves_done, request.moves_failed)
        if result is not None:
            add_row = self.replies.rows.add
            for obj in result[-1]:          # moved objects: their cached rows are stale
                add_row(obj)
        return replies.heartbeat(self.state.master_id, result)

    def UnregisterNode(self, request, now_s, caller=CLUSTER):
        num_dropped = self.state.unregister_node(request.node_id)
        log.info("node %s unregistered (%d objects dropped)", request.node_id, num_dropped)
        return pb.UnregisterNodeResponse(num_objects_dropped=num_dropped)

    # -- put ----------------------------------------------------------------------------------

    def PutStart(self, request, now_s, caller=CLUSTER):
        return self.replies.put_start(*self.state.put_start(
            request.keys, self.replies.sizes.intern(request.sizes), request.replicas,
            request.preferred_tier, request.near_host_id, request.client_id,
            _checked_ttl_s(request.soft_pin_ttl_ms, MAX_PIN_TTL_MS, "soft_pin_ttl_ms"),
            request.hard_pin, request.codec, now_s, request.near_node_id, caller.tenant))

    def PutEnd(self, request, now_s, caller=CLUSTER):
        statuses, committed = self.state.put_end(request.keys, request.client_id,
                                                 request.checksums, now_s)
        add_row = self.replies.rows.add
        for obj in committed:
            add_row(obj)
        return pb.PutEndResponse(statuses=statuses)

    def PutRevoke(self, request, now_s, caller=CLUSTER):
        return pb.PutRevokeResponse(statuses=self.state.put_revoke(request.keys,
                                                                   request.client_id))

    # -- get ----------------------------------------------------------------------------------

    def _lease_ttl_s(self, lease_ttl_ms: int) -> float:
        return (_checked_ttl_s(lease_ttl_ms, MAX_LEASE_TTL_MS, "lease_ttl_ms") if lease_ttl_ms
                else self.state.config.lease_ttl_s)

    def GetReplicas(self, request, now_s, caller=CLUSTER):
        check_id(request.client_host_id, "client_host_id", allow_empty=True)
        lease_ttl_s = self._lease_ttl_s(request.lease_ttl_ms)
        objs, missing, lease_id = self.state.get_replicas(request.keys, lease_ttl_s, now_s)
        reply = self.replies.get_replicas(objs, missing, lease_ttl_s, request.client_host_id)
        reply.lease_id = lease_id
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

    def Remove(self, request, now_s, caller=CLUSTER):
        statuses, messages = self.state.remove(request.keys, request.force, now_s)
        return pb.RemoveResponse(statuses=statuses, error_messages=messages)

    def RemovePrefix(self, request, now_s, caller=CLUSTER):
        num_removed, num_skipped = self.state.remove_prefix(request.prefix, request.force,
                                                            now_s)
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
        return pb.ListNodesResponse(nodes=replies.node_infos(self.state.nodes.values(), now_s))


#: Every RPC of the service, in master.proto order.
METHODS = ("RegisterNode", "Heartbeat", "UnregisterNode", "PutStart", "PutEnd", "PutRevoke",
           "GetReplicas", "RenewLease", "Exists", "Remove", "RemovePrefix", "Pin", "Unpin",
           "MatchPrefix", "Stats", "ListNodes", "ReleaseLeases")


def make_invoker(service: MasterService, name: str, clock, metrics, transport: str):
    """``invoke(request) -> reply`` for RPC ``name``, with no gRPC context: the core that both
    the gRPC adapter and the framed fast path (``fast_server``) call, so both run the same code.

    ``invoke(request, caller)``: ``caller`` is the ``tenancy.Principal`` the transport
    authenticated (default: the cluster principal); a tenant's request is scoped into its
    namespace first (``tenancy.scope_request``), then the handler runs under the service
    lock after the due sweep (one clock read per call), and the call is recorded in
    ``metrics`` labelled with ``transport`` (and counted for the tenant). Raises ``Rejected``
    with the status to answer: the handler's own, PERMISSION_DENIED for a daemon RPC from a
    tenant, or INTERNAL for a master bug (logged with its traceback; the master keeps
    serving).
    """
    method = getattr(service, name)
    lock, state = service.lock, service.state
    method_metrics = metrics.for_method(name, transport) if metrics else None
    perf_counter = time.perf_counter

    def invoke(request, caller=CLUSTER):
        started = perf_counter()
        with lock:
            try:
                if caller.tenant is not None:
                    state.tenants.count_call(caller.tenant, name)
                    request = scope_request(caller, name, request)
                now_s = clock.monotonic()
                if now_s >= state.next_sweep_s:
                    state.sweep(now_s)
                return method(request, now_s, caller)
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


def make_handlers(service: MasterService, clock, metrics, *, asynchronous: bool,
                  authenticator=None):
    """A ``grpc.GenericRpcHandler`` for every method, sync or async. With a tenanted
    ``authenticator`` (``auth.Authenticator``) each call's principal is resolved from its
    metadata (UNAUTHENTICATED when refused); otherwise every call is the cluster
    principal's (the token interceptor, if any, has already checked it)."""
    handlers = {}
    if authenticator is None or not authenticator.tenanted:
        authenticator = None
    for name in METHODS:
        request_class = getattr(pb, f"{name}Request")
        response_class = getattr(pb, f"{name}Response")
        fn = _grpc_adapter(make_invoker(service, name, clock, metrics, "grpc"), response_class,
                           authenticator)
        if asynchronous:
            fn = _make_async(fn)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler("kvstore.v1.Master", handlers)


def _grpc_adapter(invoke, response_class, authenticator=None):
    """Turns ``Rejected`` into the call's gRPC status (the reply body is then dropped)."""

    def handler(request, context):
        try:
            if authenticator is None:
                return invoke(request)
            caller = authenticator.principal_of_metadata(context.invocation_metadata())
            if caller is None:
                raise Rejected(grpc.StatusCode.UNAUTHENTICATED, auth.MESSAGE)
            return invoke(request, caller)
        except Rejected as exc:
            context.set_code(exc.code)
            context.set_details(exc.message)
            return response_class()

    return handler


def _make_async(fn):
    async def handler(request, context):
        return fn(request, context)
    return handler
