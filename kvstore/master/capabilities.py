"""The master's side of write capabilities (format and rules in ``kvstore/capability.py``).

Trigger: every range PutStart allocates on a node that registered with
``write_capabilities`` (and every destination range of a tier move there) gets one.
Rule: the capability names the node, segment, offset, the object's size, the key's object
identity, the node's change sequence now, the writer (``kvstore._principal``) and an expiry ``pending_timeout_s`` from now:
past it the master may reclaim the PENDING object and reuse the range, so the permission
must not outlive the allocation. Nodes without a secret (older daemons) get empty bytes.
Cost: one keyed BLAKE2b per replica (~1-2 us here), paid only for nodes that check.
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
        expiry_ms = self._expiry_ms()
        issue = capability.issue
        caps = []
        for key, size, picks in zip(keys, sizes, all_picks):
            for segment, offset in picks:
                secret = segment.node.capability_secret
                caps.append(issue(secret, segment.node.node_id, segment.segment_id, offset,
                                  size, key, writer, expiry_ms, segment.node.seq)
                            if secret else b"")
        return caps

    def for_move(self, node, move) -> bytes:
        """The capability for a tier move's destination range (b"" if the node has none).
        The writer is the master itself: the daemon copies on the master's order."""
        secret = node.capability_secret
        if not secret:
            return b""
        return capability.issue(secret, node.node_id, move.dst_segment_id, move.dst_offset,
                                move.length, move.key, capability.MASTER_WRITER,
                                self._expiry_ms(), node.seq)
