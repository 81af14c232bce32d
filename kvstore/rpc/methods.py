"""The master's RPC methods as the metadata client sees them: name, request and reply
message classes, the fast path's method id, and whether a call may be retried.

Idempotent methods (``retryable``) may run twice with the effect of once: reads (a second
GetReplicas only re-grants a lease, which never shortens), RenewLease, Stats, ListNodes,
Heartbeat (its change set is applied only once: ``seq``; a move acknowledged twice is settled
once), ReleaseLeases (a released id is forgotten), Pin/Unpin, PutEnd (a replay by the
same writer answers OK again) and PutRevoke (a replay finds nothing left to free). PutStart
allocates, and Remove, RemovePrefix, RegisterNode and UnregisterNode answer differently when
replayed, so they are never retried: a lost reply surfaces as MasterUnavailableError and the
caller decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.v1 import master_pb2 as pb

_RETRYABLE = frozenset({"GetReplicas", "RenewLease", "Exists", "MatchPrefix", "Stats",
                        "ListNodes", "Heartbeat", "Pin", "Unpin", "PutEnd", "PutRevoke",
                        "ReleaseLeases", "GetHomeNodes", "TouchKeys"})


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC of ``service Master`` (proto/kvstore/v1/master.proto)."""

    name: str                  # e.g. "PutStart"
    method_id: int             # position in the service, plus one (the fast path's id)
    request_class: type
    reply_class: type
    retryable: bool            # idempotent: may be sent again after a lost reply


def _methods() -> dict[str, Method]:
    # NOTE: ids follow the order of the rpcs in master.proto's service, which only ever grows
    # at its end (additive changes only), so an id never changes meaning.
    return {m.name: Method(m.name, m.index + 1, getattr(pb, f"{m.name}Request"),
                           getattr(pb, f"{m.name}Response"), m.name in _RETRYABLE)
            for m in pb.DESCRIPTOR.services_by_name["Master"].methods}


#: Every method by name, in service order.
METHODS: dict[str, Method] = _methods()
