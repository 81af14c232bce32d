"""The daemon's check of every write into its segments (a data-plane WRITE or a tier move)
and, where the master issues read capabilities, of every data-plane READ.

Rule (once the master gave this node a capability secret at registration): a write of
``[offset, offset + length)`` in a segment is allowed iff
  1. it carries a capability (``kvstore/capability.py``) that verifies with this node's
     secret, for this node and segment, not expired, whose writer is the principal of the
     connection it came on, and whose range contains the written range; and
  2. the range overlaps no object this node's table learnt as committed after the
     capability was issued (``Capability.node_seq``): a capability replayed after its put
     ended, or kept past a remove that let the master allocate the range again, is refused.
Objects the table learnt at or before ``node_seq`` are the master's to judge: it allocated
the range knowing them, so their removal is on its way to this node.

Before the first registration with a secret (an older master), every write is allowed, as
before capabilities existed. The committed ranges are kept per segment in an ordered map
(offset -> end, seq, key) in C++ (``kvstore._copy_hash.RangeTable``, csrc/cpu/range_table.cpp),
updated by ``ObjectTable.apply`` through ``note_*``; a check costs one keyed BLAKE2b and one
map lookup. Thread-safe: one lock.

Reads (once the registration's reply said the master issues read capabilities): a READ of
``[offset, offset + length)`` is allowed iff it carries a read capability that verifies
with this node's secret, for this node and segment, not expired, whose reader is the
principal of the connection, and whose range contains the read range. No table lookup: the
master issued it for a replica it just listed, and the expiry (the lease TTL) bounds it.
A write capability that passes the write rule above also allows reading its range: a writer
may read back its own PENDING range (``kvstore bench transfer`` does), never a range
committed since the capability was issued.

Window: an object committed less than a heartbeat ago is not yet in this node's table, so a
replay of its still-valid capability in that window is not refused (see docs/ARCHITECTURE.md,
"Write capabilities"); readers' checksums are the backstop.
"""

from __future__ import annotations

import hmac
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from kvstore import _copy_hash as _c
from kvstore import capability
from kvstore.capability import CapabilityRefused


class RangeCommitted(Exception):
    """The written range overlaps an object committed after the capability was issued."""


class WriteGuard:
    """Decides whether a write may land; see the module docstring for the rule."""

    def __init__(self, node_id: str, *, wall_clock: Callable[[], float] = time.time):
        self.node_id = node_id
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._secret: bytes | None = None
        self._check_reads = False
        # per segment: offset -> (end, seq, key) of the committed objects there, and the
        # highest seq ever noted there (``newest``: never lowered by a free, an upper bound
        # of every range's seq, which is all ``claiming`` needs). NOTE: a C++ map, not a
        # SortedDict: its insert was ~40% of the daemon's per-key commit work (issue 10, 10d2)
        self._ranges = _c.RangeTable()

    @property
    def enforcing(self) -> bool:
        """True once the master gave this node a secret (writes need capabilities)."""
        return self._secret is not None

    def set_secret(self, secret: bytes | None, *, check_reads: bool = False) -> None:
        """The secret of the current registration (b"" or None: the master issues none).
        Capabilities of earlier registrations stop verifying at once. The committed ranges
        are forgotten until the registration's first (full) change set: their sequences
        belong to the previous registration, and no valid capability predates this one.
        ``check_reads``: the master issues read capabilities for this node (its reply said
        so), so READs need one too; ignored without a secret."""
        with self._lock:
            self._secret = secret or None
            self._check_reads = bool(check_reads and secret)
            self._ranges.clear()

    @property
    def checking_reads(self) -> bool:
        """True when READs need a read capability (see the module docstring)."""
        return self._check_reads

    def check_read(self, segment_id: str, offset: int, length: int, blob: bytes,
                   reader: str) -> None:
        """Allow the READ or raise CapabilityRefused with the reason (none, malformed,
        forged or of another node/segment/registration, a write capability, expired,
        another reader, a range outside the allowed one). Allows every READ while the
        master issues no read capabilities for this node."""
        secret = self._secret
        if secret is None or not self._check_reads:
            return
        try:
            capability.check_read(secret, self.node_id, segment_id, blob, offset, length,
                                  reader, int(self._wall_clock() * 1000))
        except CapabilityRefused as refusal:
            if blob:
                try:
                    self.check(segment_id, offset, length, blob, reader)
                    return      # its writer reading back a range it may still write
                except (CapabilityRefused, RangeCommitted):
                    pass
            raise refusal

    def check_keyed(self, blob: bytes) -> str:
        """The key prefix a keyed read (daemon/keyed_reads.py) with capability ``blob`` may
        read ("": any key, also while the master issues no read capabilities for this
        node); CapabilityRefused with the reason (``capability.check_keyed``)."""
        secret = self._secret
        if secret is None or not self._check_reads:
            return ""
        return capability.check_keyed(secret, self.node_id, blob,
                                      int(self._wall_clock() * 1000))

    def verify_commit(self, base_seq: int, body: bytes, signed: bool) -> bytes:
        """The change set of a COMMIT push (``body`` without its MAC) if this node may apply
        it; raises CapabilityRefused when the node has a secret and the push is unsigned or
        its MAC does not verify (a forged push, or one of an earlier registration's master).
        Without a secret (an older master) every push is accepted, as before."""
        secret = self._secret
        if secret is None:
            return body[:-capability.MAC_BYTES] if signed else body
        if not signed or len(body) < capability.MAC_BYTES:
            raise CapabilityRefused("COMMIT not signed by this node's master")
        changes, mac = body[:-capability.MAC_BYTES], body[-capability.MAC_BYTES:]
        expected = capability.commit_mac(secret, self.node_id, base_seq, changes)
        if not hmac.compare_digest(mac, expected):
            raise CapabilityRefused("COMMIT signature does not verify (another master, or "
                                    "an earlier registration)")
        return changes

    def check(self, segment_id: str, offset: int, length: int, blob: bytes,
              writer: str) -> None:
        """Allow the write or raise CapabilityRefused / RangeCommitted with the reason.
        ``writer``: the principal of the connection (or MASTER_WRITER for tier moves)."""
        secret = self._secret
        if secret is None:
            return
        cap = capability.check(secret, self.node_id, segment_id, blob, offset, length, writer,
                               int(self._wall_clock() * 1000))
        with self._lock:
            self._check_free(segment_id, offset, length, cap.node_seq)

    def check_commit(self, segment_id: str, offset: int, length: int, key: str, blob: bytes,
                     writer: str) -> int:
        """Whether ``writer`` may commit ``key`` at exactly ``[offset, offset + length)``
        (a CLIENT_COMMIT entry): its capability verifies (as for a WRITE) and names exactly
        this range and this key's object. Returns the capability's ``node_seq``; raises
        CapabilityRefused with the reason (also when this node has no secret: without
        capabilities only the master commits here)."""
        secret = self._secret
        if secret is None:
            raise CapabilityRefused("this node checks no write capabilities, so it takes "
                                    "commits from its master only")
        cap = capability.check(secret, self.node_id, segment_id, blob, offset, length, writer,
                               int(self._wall_clock() * 1000))
        if cap.offset != offset or cap.length != length:
            raise CapabilityRefused(f"write capability is for [{cap.offset}, +{cap.length}), "
                                    f"not the committed [{offset}, +{length})")
        if cap.object_id != capability.object_id(key):
            raise CapabilityRefused(f"write capability is for another key than {key!r}")
        return cap.node_seq

    def check_commits(self, segment_ids: list[str], offsets: list[int], sizes: list[int],
                      keys: list[str], blobs: list[bytes],
                      writer: str) -> list[int | CapabilityRefused]:
        """``check_commit`` for each entry of one record (parallel lists): the capability's
        ``node_seq``, or the CapabilityRefused it raises. The same decisions, one clock
        read per record (``capability.accepted_commits``; an entry it does not accept goes
        through ``check_commit`` for its reason)."""
        secret = self._secret
        if secret is None:
            refusal = CapabilityRefused("this node checks no write capabilities, so it "
                                        "takes commits from its master only")
            return [refusal] * len(keys)
        results: list[int | CapabilityRefused] = []
        accepted = capability.accepted_commits(secret, self.node_id, writer,
                                               int(self._wall_clock() * 1000), segment_ids,
                                               offsets, sizes, keys, blobs)
        for i, node_seq in enumerate(accepted):
            if node_seq is None:
                try:
                    node_seq = self.check_commit(segment_ids[i], offsets[i], sizes[i],
                                                 keys[i], blobs[i], writer)
                except CapabilityRefused as exc:
                    node_seq = exc
            results.append(node_seq)
        return results

    def check_batch_commit(self, segment_ids: list[str], offsets: list[int],
                           sizes: list[int], keys: list[str], blob: bytes,
                           writer: str) -> int:
        """Whether ``writer`` may commit exactly these entries (one CLIENT_COMMIT or ring
        record carrying a batch capability, ``capability.issue_batch``): one MAC binds
        every entry's key, segment, offset and size. Returns the batch's ``node_seq``;
        raises CapabilityRefused with the reason (also when this node has no secret)."""
        secret = self._secret
        if secret is None:
            raise CapabilityRefused("this node checks no write capabilities, so it takes "
                                    "commits from its master only")
        return capability.check_batch(secret, self.node_id, blob, writer,
                                      int(self._wall_clock() * 1000), segment_ids, offsets,
                                      sizes, keys).node_seq

    def claim(self, segment_id: str, key: str, offset: int, length: int,
              node_seq: int) -> None:
        """Note ``key`` committed at the range (as ``note_stored`` with ``node_seq + 1``, so
        a WRITE replaying the capability of ``node_seq`` is refused from now on), unless
        the range overlaps an object committed after ``node_seq``: then RangeCommitted and
        nothing noted. One lock for both (a client commit's entry)."""
        with self._lock:
            self._check_free(segment_id, offset, length, node_seq)
            self._note(segment_id, key, offset, length, node_seq + 1)

    @contextmanager
    def claiming(self, ranges: Sequence[tuple[str, int, int]]
                 ) -> Iterator[Callable[[str, str, int, int, int], None]]:
        """Hold the lock for the claims of one record whose entries lie at ``ranges``
        (``(segment_id, offset, length)`` of every entry, claimed or not); yields a
        ``claim`` with ``claim``'s signature and decisions.

        NOTE: the overlap walk is skipped where it cannot refuse (issue 10, 10p: about
        half of a ring entry's claim): when the record's ranges are pairwise disjoint and
        no range noted in the segment before the record is newer than the entry's
        ``node_seq``. Then every object the walk would visit is either older than the
        capability (never refused) or another entry of this record (disjoint, so never
        overlapping), and the lock, held throughout, lets no other change in between."""
        with self._lock:
            floor = self._ranges.newest() if _disjoint(ranges) else None
            table_claim = self._ranges.claim

            def claim(segment_id: str, key: str, offset: int, length: int,
                      node_seq: int) -> None:
                check = floor is None or floor.get(segment_id, 0) > node_seq
                overlap = table_claim(segment_id, key, offset, length, node_seq, check)
                if overlap is not None:
                    raise _refusal(offset, length, overlap)

            yield claim

    def _note(self, segment_id: str, key: str, offset: int, length: int, seq: int) -> None:
        """Record the range at ``seq`` (the caller holds the lock)."""
        self._ranges.note(segment_id, key, offset, length, seq)

    def _check_free(self, segment_id: str, offset: int, length: int, node_seq: int) -> None:
        """RangeCommitted if the range overlaps an object noted after ``node_seq`` (the
        caller holds the lock)."""
        overlap = self._ranges.newer_overlap(segment_id, offset, length, node_seq)
        if overlap is not None:
            raise _refusal(offset, length, overlap)

    # ---- the object table's changes (kvstore.daemon.objects.ObjectTable.apply) ---------
    def note_stored(self, segment_id: str, key: str, offset: int, length: int,
                    seq: int) -> None:
        with self._lock:
            self._note(segment_id, key, offset, length, seq)

    def note_stored_many(self, ranges: Sequence[tuple[str, str, int, int]], seq: int) -> None:
        """``note_stored`` of each ``(segment_id, key, offset, length)`` at ``seq``, under
        one lock."""
        with self._lock:
            self._ranges.note_many(ranges, seq)

    def note_freed(self, segment_id: str, key: str, offset: int) -> None:
        with self._lock:
            # NOTE: only if still this key's (RangeTable.freed checks): a change set adds
            # before it removes, so another object may already start at this offset
            self._ranges.freed(segment_id, key, offset)

    def note_reset(self) -> None:
        with self._lock:
            self._ranges.clear()


def _refusal(offset: int, length: int, overlap: tuple[str, int, int]) -> RangeCommitted:
    key, start, end = overlap
    return RangeCommitted(f"range [{offset}, +{length}) overlaps {key!r}, committed at "
                          f"[{start}, {end}) after the capability was issued")


def _disjoint(ranges: Sequence[tuple[str, int, int]]) -> bool:
    """True when no two of the ``(segment_id, offset, length)`` ranges overlap (and each
    has a positive length)."""
    previous_segment, previous_end = None, 0
    for segment_id, offset, length in sorted(ranges):
        if length <= 0 or (segment_id == previous_segment and offset < previous_end):
            return False
        previous_segment, previous_end = segment_id, offset + length
    return True


__all__ = ["CapabilityRefused", "RangeCommitted", "WriteGuard"]
