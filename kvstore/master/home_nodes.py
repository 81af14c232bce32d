"""GetHomeNodes: the live node list a client computes keys' home nodes over, with its
keyed-read capabilities (docs/ARCHITECTURE.md, Home reads); and TouchKeys, the master's view
of the reads home nodes served.

Rule: the nodes are exactly those ``MasterState.put_start`` hashes a free put's home over
(``state.nodes``: every registered node), so a client holding a current list finds the node
a put placed its key on. ``membership`` is a 64-bit digest of the node ids and their
incarnations: a client that sees it change knows homes may have moved. For each node whose
daemon checks reads (``Node.read_capabilities``) the reply carries a keyed-read capability
(``capability.issue_keyed``) for the caller's key prefix (a tenant's ``{namespace}/``, ""
for the cluster principal: a tenant can read only its own keys by name), valid for
``KEYED_READ_TTL_S``; the client refreshes it before then.
"""

from __future__ import annotations

import xxhash

from kvstore import capability
from kvstore.master import tiering
from kvstore.master.validation import check_batch
from kvstore.v1 import master_pb2 as pb

#: How long a keyed-read capability lasts. NOTE: long against the one GetHomeNodes a client
#: pays per window (it refreshes at half of it), short enough that a tenant removed from the
#: master's tenant file loses keyed reads within it.
KEYED_READ_TTL_S = 60.0


def membership(nodes) -> int:
    """A digest of the live node set (ids and incarnations)."""
    digest = xxhash.xxh3_64()
    for node_id in sorted(nodes):
        digest.update(node_id.encode() + b"\0" + nodes[node_id].incarnation.encode() + b"\0")
    return digest.intdigest()


def home_nodes_reply(nodes, caller, wall_now_s: float) -> pb.GetHomeNodesResponse:
    """The reply for ``caller`` (a ``tenancy.Principal``) over ``nodes`` (node id -> Node)."""
    prefix = caller.tenant.key_prefix if caller.tenant is not None else ""
    expiry_ms = int((wall_now_s + KEYED_READ_TTL_S) * 1000)
    reply = pb.GetHomeNodesResponse(key_prefix=prefix, expiry_ms=expiry_ms,
                                    membership=membership(nodes))
    for node in nodes.values():
        cap = (capability.issue_keyed(node.capability_secret, node.node_id, prefix, expiry_ms)
               if node.read_capabilities and node.capability_secret else b"")
        reply.nodes.add(node_id=node.node_id, host_id=node.host_id, data_addr=node.data_addr,
                        keyed_read_capability=cap)
    return reply


def touch_keys(state, keys, now_s: float) -> int:
    """TouchKeys: what a GetReplicas of ``keys`` does to the master's view (a hit and the
    LRU mark per COMPLETE key, promotion queued in a tiered cluster) without its lease or
    reply; the number of keys found. Why no lease: the reads are over (a home read took
    none), and a lease would make a remove right after it find the key "leased"."""
    check_batch(len(keys), state.config.max_batch)
    found = [obj for obj in state.objects.index.get_many(keys) if obj is not None]
    state.use_count += 1
    use = state.use_count
    for obj in found:
        obj.last_used = use
    state.hits += len(found)
    if found and state.tiered and state.config.promote_after:
        tiering.maybe_promote(state, found, now_s)
    return len(found)
