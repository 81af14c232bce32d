"""Running one RPC of ``MasterService`` for either transport, with no gRPC context: the
lock and the due sweep around the handler, the durable wait after a PutEnd, Remove or
RemovePrefix that logged changes (outside the lock, until the daemons of the nodes it
touched confirmed them: ``commits.CommitPusher``, at most ``--commit-timeout``), and the
settling of what they did not confirm. ``grpc_handlers`` and ``fast_server`` both call
``make_invoker``, so the two paths run the same code.
"""

from __future__ import annotations

import logging
import time

import grpc

from kvstore.master import replies
from kvstore.master.objects import ITEM_OK, ITEM_UNCOMMITTED
from kvstore.master.service import MasterService, unconfirmed_message
from kvstore.master.tenancy import CLUSTER, scope_request
from kvstore.master.validation import Rejected

log = logging.getLogger("kvstore.master")


#: Every RPC of the service, in master.proto order.
METHODS = ("RegisterNode", "Heartbeat", "UnregisterNode", "PutStart", "PutEnd", "PutRevoke",
           "GetReplicas", "RenewLease", "Exists", "Remove", "RemovePrefix", "Pin", "Unpin",
           "MatchPrefix", "Stats", "ListNodes", "ReleaseLeases", "Reserve", "GetHomeNodes",
           "TouchKeys")
#: The calls whose reply waits until the changes they logged are durable on the daemons.
DURABLE_METHODS = frozenset({"PutEnd", "Remove", "RemovePrefix"})
#: The calls that may wait on something outside the master (daemons, etcd): run off the
#: aio event loop.
OFF_LOOP_METHODS = DURABLE_METHODS | {"RegisterNode"}


def make_invoker(service: MasterService, name: str, clock, metrics, transport: str, *,
                 handler=None):
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

    ``handler``: called instead of the service's method ``name`` (same arguments), under the
    same guards and metrics: the fast path's ``exists_wire`` and ``get_replicas_wire``.
    """
    method = handler or getattr(service, name)
    lock, state = service.lock, service.state
    leadership = service.leadership
    nodes = state.nodes
    method_metrics = metrics.for_method(name, transport) if metrics else None
    perf_counter = time.perf_counter
    # NOTE: --commit-timeout 0 turns the wait off: replies no longer wait for the daemons
    # (changes are still pushed at once); a crash can then lose what was just acknowledged
    durable = name in DURABLE_METHODS and state.config.commit_timeout_s > 0
    put_end = name == "PutEnd"
    membership = name in ("RegisterNode", "UnregisterNode")
    registration = name == "RegisterNode"
    removal = name in ("Remove", "RemovePrefix")    # several nodes: pushed in parallel
    touched = state.touched

    def invoke(request, caller=CLUSTER):
        started = perf_counter()
        with lock:
            try:
                if leadership is not None:       # HA: refuse unless serving (the fence)
                    leadership.check(name, request.epoch, nodes)
                if caller.tenant is not None:
                    state.tenants.count_call(caller.tenant, name)
                    request = scope_request(caller, name, request)
                touched.clear()
                now_s = clock.monotonic()
                if now_s >= state.next_sweep_s:
                    state.sweep(now_s)
                reply = method(request, now_s, caller)
                needs = {node: node.seq for node in touched} if touched else None
                touched.clear()
                wait = durable
                if put_end and durable and request.client_committed:
                    wait, needs = _client_committed(reply, nodes, needs)
                if leadership is not None:
                    reply.epoch = leadership.epoch
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
        commits = service.commits
        if commits is not None:
            if needs and wait:
                _settle(service, name, request, reply, commits.wait(
                    needs, state.config.commit_timeout_s, parallel=removal), clock)
            elif needs:
                commits.kick(needs)
            if membership:
                commits.forget()
        if registration and service.on_registered is not None:
            service.on_registered()
        return reply

    return invoke


def _client_committed(reply, nodes: dict, needs: dict | None) -> tuple[bool, dict | None]:
    """(wait, needs) of a PutEnd whose writer committed its replicas on the daemons itself
    (``client_committed``; under the service lock). All keys OK: no push of the put's own
    changes (the client waits for the daemons, which hold the commits already; the next
    heartbeat or push carries the master's copy of the changes, which the daemons find
    applied), and no wait unless a node of the put has not confirmed a change that took a
    range out of its table (``Node.freed_seq``: an eviction, removal or tier-move switch,
    pushed in the background): then wait for that change. NOTE: not pushed at once: on a
    loaded host a push per put costs both processes a wake-up that competes with the next
    put (measured: p50 +200 us). NOTE: the wait for frees: the put's range may be one they
    freed, and until the daemon applies them its table lists the old object there too; a
    master rebuilt from that inventory adopts one of two overlapping items (the older), so
    without the wait an acknowledged put was lost (tests/test_durable_commit.py, 10f). A
    key refused (its PENDING object was revoked or reclaimed, which logged its removal on
    the nodes that take client commits): wait until every node confirmed everything logged
    so far, so the removal of a replica the client may have committed is durable before
    the client hears of the refusal, and a rebuilt master never adopts it."""
    if all(status == ITEM_OK for status in reply.statuses):
        frees = {node: node.freed_seq for node in needs or ()
                 if node.durable_seq < node.freed_seq}
        return bool(frees), frees or None
    return True, {node: node.seq for node in nodes.values()
                  if node.commit_push and node.durable_seq < node.seq} or needs


def _settle(service: MasterService, name: str, request, reply, failed_nodes, clock) -> None:
    """After the wait of a durable call: a PutEnd's keys on ``failed_nodes`` become
    ITEM_UNCOMMITTED (their objects dropped, the removals pushed in the background); a
    removal is settled by ``_settle_removal``."""
    if name != "PutEnd":
        _settle_removal(service, name, request, reply, failed_nodes)
        return
    if not failed_nodes:
        return
    ids = ", ".join(sorted(node.node_id for node in failed_nodes))
    state = service.state
    with service.lock:
        state.touched.clear()
        service.uncommitted(request, reply, failed_nodes, clock.monotonic())
        needs = {node: node.seq for node in state.touched}
        state.touched.clear()
    log.warning("PutEnd: node(s) %s did not confirm the commit within %gs; the put fails",
                ids, state.config.commit_timeout_s)
    if needs:
        service.commits.kick(needs)


def _settle_removal(service: MasterService, name: str, request, reply, failed_nodes) -> None:
    """After a Remove's or RemovePrefix's wait: every removal ``failed_nodes`` did not
    confirm is listed (``state.removals``); a Remove answers those keys ITEM_UNCOMMITTED
    naming the nodes, a RemovePrefix names the nodes (``unconfirmed_nodes``). The master
    keeps pushing (background, and heartbeats), and a retry waits for them again."""
    state = service.state
    removals = state.removals
    if not failed_nodes and not removals:
        return
    timeout_s = state.config.commit_timeout_s
    with service.lock:
        nodes = state.nodes
        for node in failed_nodes:
            removals.record(node)
        if name == "Remove":
            messages = list(reply.error_messages) or [""] * len(request.keys)
            for i, key in enumerate(request.keys):
                silent = removals.silent_nodes(key, nodes) if reply.statuses[i] == ITEM_OK \
                    else ()
                if silent:
                    reply.statuses[i] = ITEM_UNCOMMITTED
                    messages[i] = unconfirmed_message(silent, timeout_s)
            del reply.error_messages[:]
            if any(messages):
                reply.error_messages.extend(messages)
        else:
            silent_ids = set()
            for key in removals.with_prefix(request.prefix):
                silent = removals.silent_nodes(key, nodes)
                if silent:
                    silent_ids.update(silent)
                    reply.num_unconfirmed += 1
            reply.unconfirmed_nodes.extend(sorted(silent_ids))
        removals.prune(nodes)
        needs = {node: node.seq for node in failed_nodes if nodes.get(node.node_id) is node}
    if failed_nodes:
        log.warning("%s: node(s) %s did not confirm the removal within %gs (answered "
                    "unconfirmed; still pushing)", name,
                    ", ".join(sorted(node.node_id for node in failed_nodes)), timeout_s)
    if needs:
        service.commits.kick(needs)
