"""The put flow of one batch: PutStart (values hashed while it runs) -> write every replica
-> PutEnd (or PutRevoke).

One PutStart and at most one PutEnd and one PutRevoke per batch, whatever its size; bytes go
through ``Transfers.write`` (one ``write_many`` per transport). A key whose write fails on any
replica is revoked (its space goes back to the pool) and reported with the transfer error;
the others are committed. A key that already exists is a success and nothing is written
(keys are content-addressed). If the caller is interrupted between PutStart and PutEnd, every
started key is revoked before the interruption propagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kvstore import capability
from kvstore._deadline import Deadline
from kvstore._errors import (
    InvalidArgumentError, KeyNotFoundError, KVStoreError, MasterUnavailableError,
)
from kvstore.client.checksum import EMPTY_CHECKSUM, EMPTY_PLACEHOLDER, checksum
from kvstore.client.key_checks import check_key
from kvstore.client import hashing, reservations, write_commit
from kvstore.client.transfer import Transfers
from kvstore.client.values import as_source
from kvstore.rpc import MasterClient
from kvstore.tiers import Tier


@dataclass(frozen=True, slots=True)
class PutSettings:
    """What one put call asks for, besides keys and values."""

    replicas: int
    deadline: Deadline       # by which the whole call must finish
    client_id: str
    host_id: str
    soft_pin_ttl_s: float | None = None
    hard_pin: bool = False
    tier: Tier | None = None
    near_node_id: str = ""   # placement hint: that node first (e.g. the decode node)
    # this client's reserved space (client/reservations.py); None: every put takes PutStart
    reserved: Any = None


def check_tier(tier: Any) -> Tier | None:
    """``tier`` (None, a Tier, or "hbm", "dram", "ssd") as a Tier or None;
    InvalidArgumentError otherwise."""
    return None if tier is None else Tier.parse(tier)


def check_replicas(replicas: Any) -> int:
    """``replicas`` as an int >= 1; InvalidArgumentError otherwise."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidArgumentError(f"replicas must be an int >= 1, got {replicas!r}")
    return replicas


def put_batch(master: MasterClient, transfers: Transfers, keys: Sequence[Any],
              values: Sequence[Any], settings: PutSettings) -> list[KVStoreError | None]:
    """Store ``values[i]`` under ``keys[i]``; one result per key, in order (None: stored or
    already present). Raises only for failures of the whole batch (master unreachable, wrong
    token); bad keys or values fail just their item."""
    results: list[KVStoreError | None] = [None] * len(keys)
    first_index: dict[str, int] = {}
    duplicate_of: dict[int, int] = {}
    indices, names, sizes, sources = [], [], [], []
    for i, (key, value) in enumerate(zip(keys, values)):
        try:
            check_key(key)
            src = as_source(value)
        except InvalidArgumentError as exc:
            exc.keys = [key] if isinstance(key, str) else []
            results[i] = exc
            continue
        if key in first_index:
            duplicate_of[i] = first_index[key]
            continue
        first_index[key] = i
        if src.nbytes == 0:
            src = EMPTY_PLACEHOLDER
        indices.append(i)
        names.append(key)
        sizes.append(src.nbytes)
        sources.append(src)
    if names:
        _put_across_failover(master, transfers, indices, names, sizes, sources, settings,
                             results)
    for i, first in duplicate_of.items():
        results[i] = results[first]
    return results


def _put_across_failover(master: MasterClient, transfers: Transfers, indices: list[int],
                         names: list[str], sizes: list[int], sources: list[memoryview],
                         settings: PutSettings, results: list[KVStoreError | None]) -> None:
    """``_put_valid``, done again whole for the keys a master failover interrupted.

    Rule: over a carrier that follows a cluster's leader (``kvstore.ha.carrier``), a put
    whose master failed (MasterUnavailableError) or whose PutEnd found its keys no longer
    pending (KeyNotFoundError: the new leader never saw the PutStart) is sent again from
    PutStart to the new leader while the deadline allows. Safe: keys are content-addressed,
    and a new leader holds no PENDING object of the old one, so nothing is committed twice
    (a key the old leader committed is ALREADY_EXISTS there: a success). Without failover,
    or once the deadline passed, the error stays with its keys.
    """
    carrier = master.carrier
    while True:
        position = carrier.position() if getattr(carrier, "failover", False) else None
        try:
            _put_valid(master, transfers, indices, names, sizes, sources, settings, results)
        except MasterUnavailableError as exc:
            if position is None or not carrier.moved_since(position, settings.deadline):
                exc.keys = exc.keys or list(names)   # what failed, so an engine can recompute
                raise
        else:
            if position is None or position[0] == master.epoch:
                return
            retry = [j for j, i in enumerate(indices) if isinstance(results[i], KeyNotFoundError)]
            if not retry:
                return
            indices = [indices[j] for j in retry]
            names = [names[j] for j in retry]
            sizes = [sizes[j] for j in retry]
            sources = [sources[j] for j in retry]
        if settings.deadline.expired():
            raise MasterUnavailableError(f"put of {len(names)} keys (first {names[0]!r}): "
                                         "the master failed over and the deadline passed",
                                         keys=list(names))
        for i in indices:
            results[i] = None


def _put_valid(master: MasterClient, transfers: Transfers, indices: list[int],
               names: list[str], sizes: list[int], sources: list[memoryview],
               settings: PutSettings, results: list[KVStoreError | None]) -> None:
    space = settings.reserved
    if space is not None and space.applies(settings):
        # NOTE: one master call (PutEnd) where the batch fits this client's reservation
        rest = reservations.put_reserved(space, master, transfers, settings, indices, names,
                                         sizes, sources, results)
        if not rest:
            return
        indices, names = [indices[j] for j in rest], [names[j] for j in rest]
        sizes, sources = [sizes[j] for j in rest], [sources[j] for j in rest]
    shm_host = getattr(transfers, "shm_write_host_id", "")
    # NOTE: a batch capability replaces a batch's per-entry ones only for commits of more
    # than one entry or shm writers' ring records; a single key written over tcp commits with
    # its own capability (WRITE_COMMIT or a CLIENT_COMMIT of one entry), so asking would only
    # make the master sign a second MAC per put (~10 us of its time)
    pending = master.begin_put_start(
        names, sizes, client_id=settings.client_id, replicas=settings.replicas,
        near_host_id=settings.host_id, near_node_id=settings.near_node_id, tier=settings.tier,
        soft_pin_ttl_s=settings.soft_pin_ttl_s, hard_pin=settings.hard_pin,
        deadline=settings.deadline, shm_write_host_id=shm_host,
        batch_capabilities=len(names) > 1 or bool(shm_host))
    # NOTE: hashed while the master allocates, not after the write: the client would only
    # wait here, so the hash is off the critical path (~100 us of a 4 MiB put), and it pulls
    # the value into the cache for the copy; a large batch is hashed on a background thread
    # until PutEnd needs the sums (hashing.py), so its hash overlaps the transfer too. The
    # cost: values the master reports ALREADY_EXISTS are hashed for nothing (a hash is ~1/10
    # of a copy).
    try:
        hashed = hashing.start(sources, _checksum)
    except BaseException:
        _abandon(master, settings, pending, names)
        raise
    try:
        _write_and_end(master, transfers, indices, names, sources, settings, results,
                       pending, hashed)
    finally:
        hashed.wait()   # NOTE: no thread reads the caller's values after the call


def _checksum(src: memoryview) -> int:
    return EMPTY_CHECKSUM if src is EMPTY_PLACEHOLDER else checksum(src)


def _sums(master: MasterClient, settings: PutSettings, hashed: hashing.Checksums,
          started: list[str]) -> list[int]:
    """The values' checksums; a failed hash revokes the keys ``started`` and raises."""
    try:
        return hashed.result()
    except BaseException:
        _revoke(master, settings, started)
        raise


def _write_and_end(master: MasterClient, transfers: Transfers, indices: list[int],
                   names: list[str], sources: list[memoryview], settings: PutSettings,
                   results: list[KVStoreError | None], pending: Any,
                   hashed: hashing.Checksums) -> None:
    """The put after PutStart was sent and its values' hash started: its reply, the writes
    (or the single tcp put's write-commit), PutEnd."""
    slots = pending.result()
    started = [j for j, slot in enumerate(slots) if isinstance(slot, list)]
    if write_commit.applies(transfers, slots, started):
        # NOTE: a single tcp put: data and commit in one daemon message (write_commit.py)
        outcome = write_commit.put_one(
            master, transfers, settings, names[0], slots[0][0], sources[0],
            _sums(master, settings, hashed, [names[0]])[0], _revoke)
        if outcome is not write_commit.FALLBACK:
            results[indices[0]] = outcome
            return
    try:
        items = []
        failures: dict[int, KVStoreError] = {}
        for j in started:
            if not slots[j]:
                failures[j] = KVStoreError(f"put {names[j]!r}: master allocated no replica",
                                           keys=[names[j]])
            for target in slots[j]:
                items.append((j, names[j], target, sources[j]))
        failures.update(transfers.write(items, deadline=settings.deadline))
    except BaseException:
        _revoke(master, settings, [names[j] for j in started])
        raise
    for j, slot in enumerate(slots):
        if isinstance(slot, KVStoreError):
            results[indices[j]] = slot
    for j, error in failures.items():
        results[indices[j]] = error
    if failures:
        _revoke(master, settings, [names[j] for j in failures])
    committed = [j for j in started if j not in failures]
    if committed:
        sums = _sums(master, settings, hashed, [names[j] for j in committed])
        _end(master, transfers, settings, committed, indices, names, sums, results, slots)


def _abandon(master: MasterClient, settings: PutSettings, pending: Any,
             names: list[str]) -> None:
    """Finish a PutStart the flow will not follow up (interrupted before its reply was
    read): read the reply and revoke the keys it started. Best effort, like ``_revoke``."""
    try:
        slots = pending.result()
    except KVStoreError:
        return
    _revoke(master, settings, [name for name, slot in zip(names, slots)
                               if isinstance(slot, list)])


def _end(master: MasterClient, transfers: Transfers, settings: PutSettings,
         committed: list[int], indices: list[int], names: list[str], sums: list[int],
         results: list[KVStoreError | None], slots: Any) -> None:
    """PutEnd of the written keys. Where the master asked for it (``slots.client_commit``)
    the keys' commits go to their replica daemons too, overlapping PutEnd's round trip:
    CLIENT_COMMIT frames are sent before PutEnd and read after it, commit-ring records are
    appended while PutEnd is out (before its reply is read, so before the put returns). A
    key a daemon did not confirm fails (TransferError naming it and the node, retryable)
    and is removed again, so no success names a replica whose daemon does not know it and
    a retried put writes it anew."""
    end_names = [names[j] for j in committed]
    end_sums = [sums[j] for j in committed]
    committer = transfers.committer
    batches = getattr(slots, "node_capabilities", None)
    if not getattr(slots, "client_commit", False) or committer is None or \
            not _committable(slots, committed, batches):
        try:
            ended = master.put_end(end_names, end_sums, client_id=settings.client_id,
                                   deadline=settings.deadline)
        except BaseException:
            _revoke(master, settings, end_names)
            raise
        _note_ended(committed, ended, indices, results)
        return
    entries = [(j, names[j], target, sums[j]) for j in committed for target in slots[j]]
    by_ring: list = []
    rings = getattr(slots, "commit_rings", None)
    if rings:
        # NOTE: only replicas written through shared memory to a node with a ring: the
        # ring is a same-host object, and a tcp writer's commit keeps its frame (its
        # confirmation)
        by_frame = []
        for entry in entries:
            (by_ring if entry[2].node_id in rings and _shm_write(transfers, entry[2])
             else by_frame).append(entry)
        entries = by_frame
    commits = [committer.begin(entries, settings.deadline, batches)] if entries else []
    try:
        pending = master.begin_put_end(end_names, end_sums, client_id=settings.client_id,
                                       deadline=settings.deadline, client_committed=True)
        if by_ring:
            # NOTE: appended while the master works on PutEnd: off the critical path. Safe
            # after PutEnd is sent: a key the master refuses has its removal logged after
            # the capability's sequence, so the daemon's removed-keys memory drops the
            # record's entry whenever it drains it (docs/ARCHITECTURE.md, Commit ring)
            left = committer.ring_commit(by_ring, rings, batches)
            if left:
                commits.append(committer.begin(left, settings.deadline, batches))
        ended = pending.result()
    except BaseException:
        for commit in commits:
            commit.abandon()
        _revoke(master, settings, end_names)
        raise
    _note_ended(committed, ended, indices, results)
    failures: dict[int, KVStoreError] = {}
    for commit in commits:
        failures.update(commit.finish())
    unconfirmed = [j for j, error in zip(committed, ended) if error is None and j in failures]
    for j in unconfirmed:
        results[indices[j]] = failures[j]
    if unconfirmed:
        _remove(master, [names[j] for j in unconfirmed])


def _committable(slots: Any, committed: list[int], batches: dict | None) -> bool:
    """True when the writer can commit every replica of ``committed`` itself: each has its
    own capability, or its node's batch capability covers all of that node's entries
    (a replica the master left without one, ``PutStartRequest.shm_write_host_id``, whose
    batch lost an entry to a failed write, cannot: the master's push commits them)."""
    counts: dict[str, int] = {}
    bare: set[str] = set()
    for j in committed:
        for target in slots[j]:
            counts[target.node_id] = counts.get(target.node_id, 0) + 1
            if not target.capability:
                bare.add(target.node_id)
    return all(capability.batch_count((batches or {}).get(node_id, b"")) == counts[node_id]
               for node_id in bare)


def _note_ended(committed: list[int], ended: list, indices: list[int],
                results: list[KVStoreError | None]) -> None:
    for j, error in zip(committed, ended):
        if error is not None:
            results[indices[j]] = error


def _shm_write(transfers: Transfers, target) -> bool:
    transport = transfers.transport_for(target)
    return transport is not None and transport.name == "shm"


def _remove(master: MasterClient, names: list[str]) -> None:
    """Drop objects the master committed but a replica daemon did not confirm (best
    effort: a daemon that never confirms is dropped past its TTL with its objects).
    NOTE: forced: a reader that leased the object in between keeps its lease's bytes."""
    try:
        master.remove(names, force=True)
    except KVStoreError:
        pass


def _revoke(master: MasterClient, settings: PutSettings, names: list[str]) -> None:
    """Give the space of ``names`` back; best effort, since the master also reclaims PENDING
    objects after its pending timeout. NOTE: on its own deadline of one RPC timeout, not the
    call's: a call that ran out of time must still give back what it took."""
    if not names:
        return
    try:
        master.put_revoke(names, client_id=settings.client_id)
    except KVStoreError:
        pass


# The flow's steps other put flows of the package share (``kvstore.client.reserve``: a put
# whose bytes the caller writes in place), under names that are theirs to call.
# NOTE: aliases, not renames, so this module's own calls stay as they are.
#: Finish a PutStart the flow will not follow up (see ``_abandon``).
abandon_start = _abandon
#: PutEnd (and the daemons' commits) of the written keys (see ``_end``).
end_put = _end
#: Give the space of keys back, best effort (see ``_revoke``).
revoke = _revoke
