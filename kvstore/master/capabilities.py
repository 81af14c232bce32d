"""The master's side of write and read capabilities (format and rules in
``kvstore/capability.py``).

Trigger: every range PutStart allocates on a node that registered with
``write_capabilities`` (and every destination range of a tier move there) gets one.
Rule: the capability names the node, segment, offset, the object's size, the key's object
identity, the node's change sequence now, the writer (``kvstore._principal``) and an expiry ``pending_timeout_s`` from now:
past it the master may reclaim the PENDING object and reuse the range, so the permission
must not outlive the allocation. Nodes without a secret (older daemons) get empty bytes.
Cost: one keyed BLAKE2b per replica (~1-2 us here), paid only for nodes that check; what
the replicas of a batch share is prepared once (``capability.issue_many``).

Read capabilities: every replica of a GetReplicas reply on a node that registered with
``read_capabilities`` gets one, for the range of that replica, the reader (the caller's
principal) and an expiry the call's lease TTL from now (past it the object may be removed
and its range reused). Skipped, as not needed: replicas on the client's own host in shm
segments when the client says it reads those through shm (``GetReplicasRequest.shm_reads``),
so same-host gets pay nothing.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from kvstore import capability
from kvstore._principal import principal_for_token


class CapabilityIssuer:
    """Signs the ranges of PutStart replies and TierMove orders with each node's secret."""

    def __init__(self, config, wall_clock: Callable[[], float] = time.time):
        self._ttl_ms = int(config.pending_timeout_s * 1000)
        self._wall_clock = wall_clock
        # NOTE: one shared token today, so one writer for every caller; tenants will pass
        # the calling connection's principal instead (see kvstore/_principal.py)
        self.writer = principal_for_token(config.token)
        # True once a node that checks read capabilities registered (until then GetReplicas
        # skips for_get entirely)
        self.any_reads = False

    def _expiry_ms(self) -> int:
        return int(self._wall_clock() * 1000) + self._ttl_ms

    def for_put(self, keys: Sequence[str], sizes: Sequence[int], all_picks,
                writer: str | None = None) -> list[bytes] | None:
        """One capability per pick of every key, in reply order (parallel to the reply's
        replica_offset); None when no picked node checks capabilities (the field stays
        empty, as an older master's)."""
        if not any(segment.node.capability_secret for picks in all_picks
                   for segment, _ in picks):
            return None
        writer = self.writer if writer is None else writer
        return capability.issue_many(writer, self._expiry_ms(), (
            (segment.node.capability_secret, segment.node.node_id, segment.segment_id, offset,
             size, key, segment.node.seq)
            for key, size, picks in zip(keys, sizes, all_picks) for segment, offset in picks))

    def for_get(self, nodes, reply, objs, lease_ttl_s: float,
                shm_host_id: str) -> list[bytes] | None:
        """One read capability per replica of ``reply`` (a GetReplicasResponse built from
        ``objs``, None for keys not found), in reply order (parallel to replica_offset);
        b"" where the node does not check reads or the replica is on ``shm_host_id`` in an
        shm segment. None when no replica needs one (the field stays empty). ``nodes``:
        node id -> Node (the state's)."""
        segment_caps = []     # per reply segment: (secret, node_id, segment_id) or None
        for ref in reply.segments:
            node_ref = reply.nodes[ref.node_index]
            node = nodes.get(node_ref.node_id)
            needed = (node is not None and node.read_capabilities and node.capability_secret
                      and not (shm_host_id and ref.shm_name and node.host_id == shm_host_id))
            segment_caps.append((node.capability_secret, node.node_id, ref.segment_id)
                                if needed else None)
        if not any(segment_caps):
            return None
        reader = self.writer
        expiry_ms = int(self._wall_clock() * 1000) + int(lease_ttl_s * 1000)
        issue_read = capability.issue_read
        starts, counts = reply.replica_start, reply.replica_count
        rep_segments, offsets = list(reply.replica_segment), list(reply.replica_offset)
        caps = [b""] * len(offsets)
        for i, obj in enumerate(objs):
            if obj is None:
                continue
            start = starts[i]
            for j in range(start, start + counts[i]):
                where = segment_caps[rep_segments[j]]
                if where is not None:
                    caps[j] = issue_read(where[0], where[1], where[2], offsets[j],
                                         obj.size_bytes, obj.key, reader, expiry_ms)
        return caps

    def for_reservation(self, reservation, ttl_s: float, writer: str | None = None) -> bytes:
        """The capability for writing anywhere in ``reservation``'s range until its TTL
        (b"" if the node has none). Its object identity is the empty key's, which no
        valid key has, so no daemon accepts it for a commit: only for WRITEs.
        NOTE: ``ttl_s``, not the pending timeout: the master reuses the unused space after
        the reservation's expiry (plus a grace), so the permission must end with it."""
        node = reservation.segment.node
        secret = node.capability_secret
        if not secret:
            return b""
        return capability.issue(
            secret, node.node_id, reservation.segment.segment_id, reservation.offset,
            reservation.size_bytes, "", self.writer if writer is None else writer,
            int(self._wall_clock() * 1000) + int(ttl_s * 1000), node.seq)

    def for_reserved_commits(self, segment, keys, offsets, sizes, ok) -> list[bytes]:
        """One capability per key committed into a reservation on ``segment`` (``ok[i]``;
        b"" elsewhere): exactly its range and key, as PutStart's, so the writer's commit
        of it (commit ring, CLIENT_COMMIT) passes the daemon's checks unchanged."""
        node = segment.node
        grants = [(node.capability_secret, node.node_id, segment.segment_id, offsets[i],
                   sizes[i], key, node.seq) for i, key in enumerate(keys) if ok[i]]
        signed = iter(capability.issue_many(self.writer, self._expiry_ms(), grants))
        return [next(signed) if ok[i] else b"" for i in range(len(keys))]

    def for_move(self, node, move) -> bytes:
        """The capability for a tier move's destination range (b"" if the node has none).
        The writer is the master itself: the daemon copies on the master's order."""
        secret = node.capability_secret
        if not secret:
            return b""
        return capability.issue(secret, node.node_id, move.dst_segment_id, move.dst_offset,
                                move.length, move.key, capability.MASTER_WRITER,
                                self._expiry_ms(), node.seq)
