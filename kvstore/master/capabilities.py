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

    @staticmethod
    def needed(all_picks) -> bool:
        """True when some picked node checks capabilities (else the reply carries none,
        as an older master's)."""
        return any(segment.node.capability_secret for picks in all_picks
                   for segment, _ in picks)

    def for_put(self, keys: Sequence[str], sizes: Sequence[int], all_picks,
                writer: str | None = None, skip_nodes: frozenset = frozenset(),
                ) -> list[bytes] | None:
        """One capability per pick of every key, in reply order (parallel to the reply's
        replica_offset); b"" for picks on ``skip_nodes`` (node ids whose batch capability
        covers every commit the writer will send: ``for_put_batch``); None when no picked
        node checks capabilities (the field stays empty, as an older master's)."""
        if not self.needed(all_picks):
            return None
        writer = self.writer if writer is None else writer
        return capability.issue_many(writer, self._expiry_ms(), (
            (b"" if segment.node.node_id in skip_nodes else segment.node.capability_secret,
             segment.node.node_id, segment.segment_id, offset, size, key, segment.node.seq)
            for key, size, picks in zip(keys, sizes, all_picks) for segment, offset in picks))

    def for_put_batch(self, keys: Sequence[str], sizes: Sequence[int], all_picks,
                      reply_nodes, shm_host_id: str = "", writer: str | None = None,
                      ) -> tuple[list[bytes], frozenset]:
        """One batch capability per node of ``reply_nodes`` (the reply's NodeRefs, in
        order; ``capability.issue_batch``) over every pick on that node in reply order (key
        by key, each key's replicas in order), b"" where the node takes none (no secret, or
        a daemon without ``batch_capabilities``). The same expiry and sequence rule as
        ``for_put``: a writer's commit of those entries is then checked with one MAC.

        Also returns the ids of the nodes whose per-replica capabilities the writer needs
        not: a batch capability issued, the node on ``shm_host_id`` (the host whose shm
        segments the writer writes through shared memory; "": none) and every pick there
        in a shm segment, so no WRITE goes over its data plane and one record commits all."""
        writer = self.writer if writer is None else writer
        by_node: dict[str, tuple] = {}
        not_shm: set[str] = set()
        for key, size, picks in zip(keys, sizes, all_picks):
            for segment, offset in picks:
                node = segment.node
                entries = by_node.get(node.node_id)
                if entries is None:
                    entries = by_node[node.node_id] = (node, [], [], [], [])
                if not segment.shm_name:
                    not_shm.add(node.node_id)
                entries[1].append(segment.segment_id)
                entries[2].append(offset)
                entries[3].append(size)
                entries[4].append(key)
        expiry_ms = self._expiry_ms()
        caps = []
        covered = set()
        for ref in reply_nodes:
            entries = by_node.get(ref.node_id)
            node = entries[0] if entries is not None else None
            if node is None or not node.capability_secret or not node.batch_capabilities:
                caps.append(b"")
                continue
            caps.append(capability.issue_batch(node.capability_secret, node.node_id, writer,
                                               expiry_ms, node.seq, *entries[1:]))
            if shm_host_id and node.host_id == shm_host_id and node.node_id not in not_shm:
                covered.add(node.node_id)
        return caps, frozenset(covered)

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
