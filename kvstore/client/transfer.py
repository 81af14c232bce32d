"""Move the bytes of a batch through the best transport for each replica, and count them.

``Transfers`` is the client's only door to the transports. It picks, per replica, the first
transport (in preference order: shm before tcp) that can reach it, orders a key's replicas so
the ones reachable by the most preferred transport come first (same host first), and sends
each transport one ``write_many``/``read_many`` per round, never one call per key.

Reads fall back: a key whose read fails (or, when verified, whose bytes do not match the
checksum) is retried on its next replica before it is reported. Verification is always done
for bytes that crossed a network (any transport but shm) and for shm reads unless the caller
turned it off (``verify=False``: it trusts every process that can map the segment), so no
reader gets bytes that are not the object's. Verified reads go through the transport's
``read_many_checksummed`` (shm hashes while it copies). Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from kvstore._deadline import Deadline
from kvstore._errors import ChecksumError, KVStoreError, TransferError, TransferTimeoutError
from kvstore.transport.base import Target, Transport

logger = logging.getLogger("kvstore.client")

# Transports whose bytes never leave this host's memory: verified unless the caller opts out.
_LOCAL_TRANSPORTS = frozenset({"shm"})


@dataclass
class _Counters:
    num_reads: int = 0
    read_bytes: int = 0
    num_writes: int = 0
    write_bytes: int = 0
    num_errors: int = 0


@dataclass(slots=True)
class ReadJob:
    """One key to read: its replicas (best first), its destination and expected checksum."""

    index: int                      # position in the caller's batch
    key: str
    candidates: list[tuple[Target, Transport]]
    dst: memoryview                 # exactly the object's size
    expected_checksum: int
    verify: bool
    attempt: int = 0                # index into candidates of the replica to try next
    errors: list[KVStoreError] | None = None  # one per failed attempt (made on the first)


def _remaining_s(deadline: Deadline, keys: Sequence[str]) -> float:
    remaining = deadline.remaining_s()
    if remaining <= 0:
        raise TransferTimeoutError("deadline passed before the transfer started", keys=keys)
    return remaining


class Transfers:
    """Routes a batch's transfers over ``transports`` (preference order) and keeps stats."""

    def __init__(self, transports: Sequence[Transport], committer=None):
        self.transports = list(transports)
        # client.committer.DaemonCommitter: the writer's own commits (None: the master's)
        self.committer = committer
        # True: same-host DRAM replicas are read through shm, so a get needs no read
        # capabilities for them (GetReplicasRequest.shm_reads)
        self.shm_reads = any(t.name in _LOCAL_TRANSPORTS for t in self.transports)
        # the host whose shm segments writes reach through shm (the first transport is shm:
        # it is ranked first for each such target), "" otherwise (PutStartRequest 461)
        self.shm_write_host_id = (getattr(self.transports[0], "host_id", "")
                                  if self.transports and self.transports[0].name == "shm"
                                  else "")
        self._lock = threading.Lock()
        self._counters = {t.name: _Counters() for t in self.transports}
        # (host_id, shm_name, data_addr) -> rank of the first transport that reaches it.
        # NOTE: can_reach depends only on these fields, and a batch repeats a few segments
        # many times, so asking each transport once per segment saves most of the routing.
        self._reach_to_rank: dict[tuple[str, str, str], int | None] = {}

    # ---- routing ------------------------------------------------------------------------
    def route(self, targets: Sequence[Target]) -> list[tuple[Target, Transport]]:
        """Reachable replicas with their transport, most preferred transport first (stable,
        so the master's order breaks ties)."""
        routed = []
        for target in targets:
            rank = self._rank(target)
            if rank is not None:
                routed.append((rank, target))
        if len(routed) > 1:
            routed.sort(key=lambda item: item[0])
        transports = self.transports
        return [(target, transports[rank]) for rank, target in routed]

    def transport_for(self, target: Target) -> Transport | None:
        """The transport a write of ``target`` goes over (None: none reaches it)."""
        rank = self._rank(target)
        return None if rank is None else self.transports[rank]

    def _rank(self, target: Target) -> int | None:
        """Index of the first transport that reaches ``target``; None if none does."""
        where = (target.host_id, target.shm_name, target.data_addr)
        rank = self._reach_to_rank.get(where, -1)
        if rank == -1:
            rank = self._reach_to_rank[where] = next(
                (r for r, t in enumerate(self.transports) if t.can_reach(target)), None)
        return rank

    # ---- writes -------------------------------------------------------------------------
    def write(self, items: Sequence[tuple[int, str, Target, memoryview]], *,
              deadline: Deadline) -> dict[int, KVStoreError]:
        """Write every (index, key, target, src); return index -> error for failed items.

        A key with several replicas appears once per replica; it fails if any replica fails.
        """
        failures: dict[int, KVStoreError] = {}
        groups: dict[Transport, list[tuple[int, str, Target, memoryview]]] = defaultdict(list)
        for item in items:
            rank = self._rank(item[2])
            if rank is None:
                failures[item[0]] = TransferError(
                    f"no transport can reach node {item[2].node_id!r} at {item[2].data_addr}",
                    keys=[item[1]])
                continue
            groups[self.transports[rank]].append(item)
        for transport, group in groups.items():
            try:
                timeout_s = _remaining_s(deadline, [key for _, key, _, _ in group])
            except TransferTimeoutError as exc:
                for index, _, _, _ in group:
                    failures.setdefault(index, exc)
                continue
            results = transport.write_many([(target, src) for _, _, target, src in group],
                                           timeout_s=timeout_s)
            _check_results(transport, results, len(group))
            num_ok = num_bytes = 0
            for (index, key, target, src), exc in zip(group, results):
                if exc is None:
                    num_ok += 1
                    num_bytes += src.nbytes
                else:
                    logger.debug("write of %r to %s via %s failed: %s", key, target.node_id,
                                 transport.name, exc)
                    failures.setdefault(index, _as_transfer_error(exc, key, target))
            self._count(transport.name, writes=num_ok, write_bytes=num_bytes,
                        errors=len(group) - num_ok)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("wrote %d/%d replicas (%d bytes) via %s", num_ok, len(group),
                             num_bytes, transport.name)
        return failures

    # ---- reads --------------------------------------------------------------------------
    def read(self, jobs: Sequence[ReadJob], *, deadline: Deadline) -> dict[int, KVStoreError]:
        """Read every job into its ``dst``, falling back replica by replica; return
        index -> error for jobs that no replica could serve with the right bytes."""
        failures: dict[int, KVStoreError] = {}
        pending = []
        for job in jobs:
            if job.candidates:
                pending.append(job)
            else:
                failures[job.index] = TransferError(
                    f"no replica of {job.key!r} is reachable by the transports "
                    f"{[t.name for t in self.transports]}", keys=[job.key])
        while pending:
            groups: dict[Transport, list[ReadJob]] = defaultdict(list)
            for job in pending:
                groups[job.candidates[job.attempt][1]].append(job)
            retry: list[ReadJob] = []
            for transport, group in groups.items():
                self._read_group(transport, group, deadline, retry, failures)
            pending = retry
        return failures

    def _read_group(self, transport: Transport, group: list[ReadJob], deadline: Deadline,
                    retry: list[ReadJob], failures: dict[int, KVStoreError]) -> None:
        try:
            timeout_s = _remaining_s(deadline, [job.key for job in group])
        except TransferTimeoutError as exc:
            for job in group:
                failures[job.index] = _final_error(job, exc)
            return
        items = [(job.candidates[job.attempt][0], job.dst) for job in group]
        verify = transport.name not in _LOCAL_TRANSPORTS or any(job.verify for job in group)
        if verify:
            results, digests = transport.read_many_checksummed(items, timeout_s=timeout_s)
            _check_results(transport, digests, len(group))
        else:
            results = transport.read_many(items, timeout_s=timeout_s)
        _check_results(transport, results, len(group))
        num_ok = num_bytes = 0
        for i, (job, exc) in enumerate(zip(group, results)):
            target = items[i][0]
            if exc is None and verify:
                if digests[i] != job.expected_checksum:
                    exc = ChecksumError(
                        f"bytes of {job.key!r} read from node {target.node_id!r} via "
                        f"{transport.name} do not match the object's checksum", keys=[job.key])
            if exc is None:
                num_ok += 1
                num_bytes += job.dst.nbytes
                continue
            logger.debug("read of %r from %s via %s failed: %s", job.key, target.node_id,
                         transport.name, exc)
            if job.errors is None:
                job.errors = []
            job.errors.append(_as_transfer_error(exc, job.key, target))
            job.attempt += 1
            if job.attempt < len(job.candidates):
                retry.append(job)
            else:
                failures[job.index] = _final_error(job, job.errors[-1])
        self._count(transport.name, reads=num_ok, read_bytes=num_bytes,
                    errors=len(group) - num_ok)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("read %d/%d objects (%d bytes) via %s", num_ok, len(group),
                         num_bytes, transport.name)

    # ---- stats --------------------------------------------------------------------------
    def count_reads(self, name: str, reads: int, read_bytes: int) -> None:
        """Count reads made outside ``read`` (client/shm_batch.py) under transport ``name``."""
        self._count(name, reads=reads, read_bytes=read_bytes)

    def count_writes(self, name: str, writes: int, write_bytes: int, errors: int = 0) -> None:
        """Count writes made outside ``write`` (client/write_commit.py) under ``name``."""
        self._count(name, writes=writes, write_bytes=write_bytes, errors=errors)

    def _count(self, name: str, *, reads: int = 0, read_bytes: int = 0, writes: int = 0,
               write_bytes: int = 0, errors: int = 0) -> None:
        with self._lock:
            counters = self._counters[name]
            counters.num_reads += reads
            counters.read_bytes += read_bytes
            counters.num_writes += writes
            counters.write_bytes += write_bytes
            counters.num_errors += errors

    def stats(self) -> dict[str, dict[str, int]]:
        """Per transport name: num_reads, read_bytes, num_writes, write_bytes, num_errors."""
        with self._lock:
            return {name: dict(vars(c)) for name, c in self._counters.items()}

    def close(self) -> None:
        for transport in self.transports:
            transport.close()
        if self.committer is not None:
            self.committer.close()


def _check_results(transport: Transport, results: Sequence[object], num_items: int) -> None:
    # NOTE: an item without a result must never pass for a success (its bytes may be unread).
    if len(results) != num_items:
        raise KVStoreError(f"transport {transport.name} returned {len(results)} results for "
                           f"{num_items} items")


def _as_transfer_error(exc: BaseException, key: str, target: Target) -> KVStoreError:
    if isinstance(exc, KVStoreError):
        if not exc.keys:
            exc.keys = [key]
            # NOTE: transports name nodes and ranges, not keys; the caller needs the key
            if exc.args and isinstance(exc.args[0], str) and repr(key) not in exc.args[0]:
                exc.args = (f"{key!r}: {exc.args[0]}", *exc.args[1:])
        return exc
    error = TransferError(f"transfer of {key!r} with node {target.node_id!r} "
                          f"({target.data_addr}) failed: {exc!r}", keys=[key])
    error.__cause__ = exc
    return error


def _final_error(job: ReadJob, last: KVStoreError) -> KVStoreError:
    """The error reported for a key no replica could serve: the last replica's error, which
    names the key; the earlier ones are chained as its context."""
    if job.errors and len(job.errors) > 1 and last.__context__ is None:
        last.__context__ = job.errors[-2]
    return last
