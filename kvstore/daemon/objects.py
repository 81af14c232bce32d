"""The daemon's copy of its own object table, kept current by the master's heartbeat replies.

Why the daemon keeps one: the master's state is soft. After a master restart the daemon
re-registers with this table as its inventory, so the new master adopts every object the
daemon still holds and no stored block is lost.

Rule for a change set (``kvstore.rpc.HeartbeatChanges``): ``full_resync`` first discards the table; then
``added`` entries are inserted (replacing an entry with the same key); then ``removed_keys``
are dropped. The master sends only each key's last change, so a key is in at most one of
the two lists (tested in tests/test_master_heartbeat.py); were it in both, additions first
would err on the safe side: the table would miss an object, never list freed space.

Backends listen: each entry added or removed in a segment is noted to that segment's backend
(``Backend.note_stored``/``note_freed``; usage counters, and the SSD backend's on-disk index),
and after a change set every backend touched is synced (``Backend.sync``) before ``apply``
returns, so an SSD object is durable in the index before the next heartbeat acknowledges it.

Client commits (``commit_from_client``, durable commit's client-parallel path): a writer
commits its own replicas here before the master's push of the same change arrives. Such an
entry is outside the master's sequence, so the table remembers each key's last removal
(``_removed``: key -> the change set's sequence, the latest ``MAX_REMOVED`` keys) and
refuses to add a key removed after the entry's capability was issued: a client commit that
arrives after the master revoked, reclaimed, removed or evicted the key never brings it
back. Overlaps with objects committed since the capability are refused as for a WRITE
(``WriteGuard.claim``). When the master's copy of such a change arrives identical (same
segment, range, checksum, codec) ``apply`` leaves the table and the backends as they are
and only gives the guard the change set's sequence for the range; any difference is
applied as the master sent it.

Thread-safe: one lock guards the table; the backends' syncs run outside it, so commits
arriving on different connections share the SSD backend's group-commit rounds
(``SsdBackend.sync``) instead of syncing in turn. ``apply`` calls still run one at a time
(their own lock, held across the sync), so ``acked_seq`` only ever names a change set whose
backends were synced and only grows between resets; a change set that finds a client
commit's entry identical while that commit's sync still runs syncs the backend too (so it
is acknowledged only once the entry is durable), and so does a second client commit of it.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from contextlib import nullcontext
from typing import TYPE_CHECKING, NamedTuple

from kvstore.daemon.write_guard import RangeCommitted
from kvstore.rpc import HeartbeatChanges, Inventory

if TYPE_CHECKING:
    from kvstore.daemon.backends import Backend
    from kvstore.daemon.write_guard import WriteGuard

#: Codec (kvstore.v1.Codec) recorded when a change names none: the raw bytes.
CODEC_RAW = 0
#: Removed keys remembered for client commits. NOTE: a client commit follows its
#: PutStart by one write; a key needs to be remembered only that long, so this bounds
#: memory (~100 B a key) at a rate of removals far above any put rate seen here.
MAX_REMOVED = 1 << 16


class StoredObject(NamedTuple):
    """Where one object's bytes lie on this node (immutable; equal iff every field is).

    NOTE: a NamedTuple, not a frozen dataclass: built and compared per entry of every
    commit-ring record and heartbeat change set, and a frozen dataclass's ``__init__``
    (one ``object.__setattr__`` per field) and ``__eq__`` (two tuples built) cost ~1 us
    each there; a tuple's are done in C (issue 10, 10p)."""

    segment_id: str
    offset: int
    length: int
    checksum: int
    codec: int


class ObjectTable:
    """key -> StoredObject for the replicas on this node, plus the last applied sequence."""

    def __init__(self, backends: "list[Backend] | None" = None,
                 guard: "WriteGuard | None" = None) -> None:
        self._lock = threading.Lock()
        # NOTE: apply's own lock, held across its sync (acked_seq is set after it); the
        # table's lock is not, so a client commit on another connection is not held up
        self._apply_lock = threading.Lock()
        self._guard = guard       # told every committed range, to refuse writes over it
        self._key_to_object: dict[str, StoredObject] = {}
        self._segment_to_backend = {b.segment_id: b for b in backends or []}
        self.acked_seq = 0
        self._registering = False    # pushes are refused while a registration runs
        self._removed: OrderedDict[str, int] = OrderedDict()  # key -> seq of its removal
        # key -> client commits that added it whose backend sync has not returned yet
        self._syncing_keys: Counter[str] = Counter()
        # called (outside the lock) before a change set is applied and before an inventory
        # is built: the commit ring's drain (daemon/ring_drain.py); None: no ring
        self.before_change = None

    @property
    def registering(self) -> bool:
        """True from ``begin_registration`` until the registration ended."""
        return self._registering

    def seed(self, key: str, stored: StoredObject) -> None:
        """Insert an object recovered from this node's own storage (an SSD index at start),
        without noting it to its backend (which already knows it)."""
        with self._lock:
            self._key_to_object[key] = stored

    def __len__(self) -> int:
        with self._lock:
            return len(self._key_to_object)

    def get(self, key: str) -> StoredObject | None:
        with self._lock:
            return self._key_to_object.get(key)

    def begin_registration(self) -> None:
        """Refuse commit pushes until ``reset_sequence`` or ``end_registration``: a push to
        the new registration applied before the reset would be forgotten by it."""
        with self._lock:
            self._registering = True

    def end_registration(self) -> None:
        with self._lock:
            self._registering = False

    def reset_sequence(self) -> None:
        """A (re-)registration starts a new sequence with the master: nothing acked yet, and
        no removal remembered.
        NOTE: the removals' sequences are of the old registration, while the capabilities of
        the new one start again near 0: kept, a key removed at old sequence S would have
        every client commit of it dropped, unreported, until the new sequence passed S (an
        acknowledged put missing from this table, so lost if the master died before its
        next push; issue 10, 10y). Forgetting them is safe: a commit with a capability of
        the old registration no longer verifies with the new secret."""
        with self._apply_lock, self._lock:
            self.acked_seq = 0
            self._registering = False
            self._removed.clear()

    def apply(self, response: HeartbeatChanges) -> int:
        """Apply one heartbeat change set; return the number of entries it touched.

        Change sets at or below the acked sequence (a reply to a retried heartbeat, or
        changes a commit push already brought) are ignored, so applying one twice is
        harmless; so is one whose ``base_seq`` is past the acked sequence (a gap: changes
        in between are missing, and the master resends from what this table acknowledges).
        Applying one that starts earlier is correct: it carries each key's last change.
        """
        if self.before_change is not None:
            self.before_change()
        with self._apply_lock:
            return self._apply(response)

    def _apply(self, response: HeartbeatChanges) -> int:
        added = response.added
        backends = self._segment_to_backend
        touched: set = set()
        with self._lock:
            if not response.full_resync and (response.seq <= self.acked_seq
                                              or response.base_seq > self.acked_seq):
                return 0
            guard = self._guard
            if response.full_resync:
                self._key_to_object.clear()
                if guard is not None:
                    guard.note_reset()
                for backend in backends.values():
                    backend.note_reset()
                    touched.add(backend)
            codecs = added.codecs
            checksums = added.checksums
            same: list = []
            for i, key in enumerate(added.keys):
                stored = StoredObject(
                    added.segment_ids[i], added.offsets[i], added.lengths[i],
                    checksums[i] if i < len(checksums) else 0,
                    codecs[i] if i < len(codecs) else CODEC_RAW)
                old = self._key_to_object.get(key)
                if old == stored:
                    # NOTE: the change the commit ring (or a client commit) already applied
                    # identically (same key, segment, range, checksum, codec): the table
                    # and the backends hold it; only the guard takes the master's sequence
                    # for the range (note_stored over the same offset and key). Half of a
                    # batched put's re-apply at the next heartbeat (issue 10, 10d); noted
                    # together after the loop, under one lock (10p). Safe to defer: a
                    # change set has each key once, and no other added key at that range.
                    if guard is not None:
                        same.append((stored.segment_id, key, stored.offset, stored.length))
                    if key in self._syncing_keys:
                        # NOTE: a client commit's sync of it is still running: this change
                        # set is acknowledged only once that record is durable too
                        touched.add(backends[stored.segment_id])
                    continue
                if old is not None and (backend := backends.get(old.segment_id)) is not None \
                        and old != stored:
                    backend.note_freed(key, old.offset, old.length)
                    touched.add(backend)
                if guard is not None and old is not None:
                    guard.note_freed(old.segment_id, key, old.offset)
                self._key_to_object[key] = stored
                if guard is not None:
                    guard.note_stored(stored.segment_id, key, stored.offset, stored.length,
                                      response.seq)
                if (backend := backends.get(stored.segment_id)) is not None and old != stored:
                    backend.note_stored(key, stored.offset, stored.length, stored.checksum,
                                        stored.codec)
                    touched.add(backend)
            if same:
                guard.note_stored_many(same, response.seq)
            removed = self._removed
            for key in response.removed_keys:
                removed[key] = response.seq
                removed.move_to_end(key)
                if len(removed) > MAX_REMOVED:
                    removed.popitem(last=False)
                old = self._key_to_object.pop(key, None)
                if old is not None and guard is not None:
                    guard.note_freed(old.segment_id, key, old.offset)
                if old is not None and (backend := backends.get(old.segment_id)) is not None:
                    backend.note_freed(key, old.offset, old.length)
                    touched.add(backend)
        # NOTE: outside the table's lock (concurrent client commits join the same sync
        # rounds), inside apply's: no other change set is applied meanwhile
        for backend in touched:
            backend.sync()
        self.acked_seq = response.seq
        return len(added.keys) + len(response.removed_keys)

    def apply_pushed(self, base_seq: int, body: bytes) -> int:
        """Apply a COMMIT push (a serialized HeartbeatResponse whose changes follow
        ``base_seq``); return the sequence the table holds afterwards, every backend
        touched synced (the data plane's COMMIT handler). Raises DecodeError for a body
        that does not parse."""
        from kvstore.rpc.messages import heartbeat_changes
        from kvstore.v1 import master_pb2 as pb

        reply = pb.HeartbeatResponse.FromString(body)
        reply.base_seq = base_seq
        with self._lock:
            if self._registering:
                raise RuntimeError("registering with the master; push again")
        self.apply(heartbeat_changes(reply))
        return self.acked_seq

    def commit_from_client(self, entries) -> list[tuple[int, str]]:
        """Add objects a writer committed itself (CLIENT_COMMIT), each entry
        ``(index, key, StoredObject, node_seq)`` whose capability the guard verified
        (``node_seq``: the capability's); every backend touched synced before returning.

        Returns ``(index, reason)`` for each entry refused: the table is registering, the
        key is here at another range, or the range overlaps an object committed after the
        capability (``WriteGuard.claim``). An entry whose key was removed after the
        capability was issued is dropped without a refusal: the master decided about the key after this put (a
        PutEnd it refused fails at the client by PutEnd's own answer)."""
        refused: list[tuple[int, str]] = []
        touched: set = set()
        syncing: list[str] = []
        # backend -> [(key, StoredObject)] added there, noted in one call per backend
        noted: dict = {}
        backends, guard = self._segment_to_backend, self._guard
        key_to_object, removed_get = self._key_to_object, self._removed.get
        with self._lock:
            if self._registering:
                return [(entry[0], "the daemon is registering with its master; retry")
                        for entry in entries]
            with (guard.claiming([stored[:3] for _, _, stored, _ in entries])
                  if guard is not None else nullcontext(None)) as claim:
                for index, key, stored, node_seq in entries:
                    if removed_get(key, -1) > node_seq:
                        continue
                    old = key_to_object.get(key)
                    if old is not None:
                        if old != stored:
                            refused.append((index,
                                            f"{key!r} is committed here at another range"))
                        elif key in self._syncing_keys:   # a commit of it is syncing: wait
                            touched.add(backends[stored.segment_id])
                        continue            # the master's push came first: nothing to add
                    if claim is not None:
                        try:
                            claim(stored.segment_id, key, stored.offset, stored.length,
                                  node_seq)
                        except RangeCommitted as exc:
                            refused.append((index, str(exc)))
                            continue
                    key_to_object[key] = stored
                    backend = backends.get(stored.segment_id)
                    if backend is not None:
                        added = noted.get(backend)
                        if added is None:
                            added = noted[backend] = []
                        added.append((key, stored))
            # NOTE: one call per backend and record, not one per key (issue 10, 10d2)
            for backend, added in noted.items():
                backend.note_stored_many([key for key, _ in added],
                                         [stored.offset for _, stored in added],
                                         [stored.length for _, stored in added],
                                         [stored.checksum for _, stored in added],
                                         [stored.codec for _, stored in added])
                if backend.SYNCS:
                    touched.add(backend)
                    syncing.extend(key for key, _ in added)
            if syncing:
                self._syncing_keys.update(syncing)
        # NOTE: only backends whose sync does work (Backend.SYNCS) are tracked: a DRAM
        # object is durable once noted, and the Counter upkeep was ~10% of a 1-key record
        if not touched:
            return refused
        try:
            for backend in touched:
                backend.sync()
        finally:
            if syncing:
                with self._lock:
                    self._syncing_keys.subtract(syncing)
                    self._syncing_keys += Counter()    # NOTE: drops the keys at zero
        return refused

    def to_inventory(self) -> Inventory:
        """The whole table as an Inventory (parallel lists, one entry per object)."""
        if self.before_change is not None:
            self.before_change()
        with self._lock:
            items = list(self._key_to_object.items())
        return Inventory(keys=[key for key, _ in items],
                         segment_ids=[obj.segment_id for _, obj in items],
                         offsets=[obj.offset for _, obj in items],
                         lengths=[obj.length for _, obj in items],
                         checksums=[obj.checksum for _, obj in items],
                         codecs=[obj.codec for _, obj in items])
