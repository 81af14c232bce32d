"""Write checks for the nixl transport: the daemon checks a put's capabilities before a one-sided
NIXL WRITE lands in its segment.

NIXL (1.5.1, UCX backend) registers memory with full remote access, and the daemon registers
its whole DRAM segment once, so a NIXL WRITE itself is never seen by the daemon. Before every
NIXL WRITE the transport therefore asks the daemon over the node's data plane and writes only
the ranges the daemon allowed: the daemon runs the checks a tcp WRITE gets (segment, range,
capability, committed ranges). To a node that advertises it (``batched``: its NIXL metadata's
``batched_checks``) a batch's ranges go in one CHECK_WRITES request answered by one reply
(``check_batch``); to an older node, one CHECK_WRITE per range (``data_frames``: a WRITE
without its payload), pipelined. Either way one round trip per node per batch on one pooled
connection, overlapped by the transport with its staging copies (``send`` before the copies,
``receive`` after).

Ranges that share one capability (a reservation's, ``client/reservations.py``: one
capability covers a writer's whole reserved range, and a batch put there is bump-allocated
into consecutive ranges) are checked as one range covering them all (``coalesce``): one
check instead of one per key (one keyed MAC and one bisection on the daemon, per batch).
It is never weaker than checking each: the covering range contains every range, so a
capability that allows it allows each, and an object committed anywhere in it (the gaps
included) is refused. The cost: such a refusal fails every range of that group, not only
the one that overlaps it.

Guarantee and limit: a kvstore client never NIXL-writes a range its capability does not allow,
so a buggy client, a stale or replayed capability, or a put whose object was committed in the
meantime changes nothing stored. A hostile peer holding the node's NIXL metadata (given by the
master to any client with a valid token) can still skip the check and write the segment
directly: NIXL has no read-only registration to stop it (see docs/ARCHITECTURE.md, Write
capabilities: NIXL writes).

Errors (per range, never raised): ``TransferError`` naming the node, the range and the status
(CAPABILITY_REFUSED, RANGE_COMMITTED, OUT_OF_RANGE, ...) for a refused range; for a daemon
that cannot be reached, every range of the node (``TransferTimeoutError`` past the deadline,
``AuthenticationError`` for a refused token). Thread-safe (the pool is; a ``Pending`` belongs
to one caller).
"""

from __future__ import annotations

from typing import Sequence

from kvstore._deadline import Deadline
from kvstore._errors import KVStoreError, TransferError
from kvstore.transport import check_batch, data_frames
from kvstore.transport.base import Target
from kvstore.transport.data_frames import Op, PeerClosedError, Status
from kvstore.transport.tcp_conn import Connection, ConnectionPool, map_os_error

#: idle check connections kept per node (a batch uses one)
MAX_IDLE_PER_NODE = 4


class Pending:
    """The checks of one node's ranges, sent and not yet answered."""

    __slots__ = ("node_id", "targets", "checked", "members", "deadline", "batched",
                 "counts", "conn", "reused", "error")

    def __init__(self, node_id: str, targets: Sequence[Target], deadline: Deadline,
                 batched: bool):
        self.node_id, self.targets, self.deadline = node_id, list(targets), deadline
        # the ranges asked about, and which of ``targets`` each one covers (``coalesce``)
        self.checked, self.members = coalesce(self.targets)
        # CHECK_WRITES, not one CHECK_WRITE per range
        self.batched = batched and len(self.checked) > 1
        self.counts: list[int] = []             # ranges per CHECK_WRITES request sent
        self.conn: Connection | None = None
        self.reused = False
        self.error: KVStoreError | None = None   # the send failed: every range fails


class WriteChecks:
    """Asks daemons over their data plane whether a NIXL WRITE may land in each range."""

    def __init__(self, *, token: str | None = None, tls=None):
        self._pool = ConnectionPool(token=token, max_idle_per_node=MAX_IDLE_PER_NODE, tls=tls)

    def send(self, node_id: str, targets: Sequence[Target], deadline: Deadline, *,
             batched: bool = False) -> Pending:
        """Send the checks of ``targets`` (all of ``node_id``) without waiting: CHECK_WRITES
        when ``batched`` (the node serves op 7) and there are several, else one CHECK_WRITE
        per target. Never raises (a failure is reported by ``receive``)."""
        # NOTE: one range goes as CHECK_WRITE either way: the batched form's body and
        # payload cost a little more than they save there (bench/nixl_checks_bench.py)
        pending = Pending(node_id, targets, deadline, batched)
        self._send(pending)
        return pending

    def receive(self, pending: Pending) -> list[KVStoreError | None]:
        """The daemon's answer per target, in order: None where the write is allowed."""
        if pending.error is None:
            try:
                return _expand(pending, self._receive(pending))
            except (OSError, PeerClosedError) as exc:
                self._drop(pending)
                if not pending.reused or isinstance(exc, TimeoutError):
                    pending.error = map_os_error(exc, pending.node_id, "write check")
                else:
                    # NOTE: a pooled connection the daemon had closed: ask once more anew
                    self._send(pending, fresh=True)
                    if pending.error is None:
                        try:
                            return _expand(pending, self._receive(pending))
                        except (OSError, PeerClosedError) as again:
                            self._drop(pending)
                            pending.error = map_os_error(again, pending.node_id, "write check")
            except KVStoreError as exc:
                self._drop(pending)
                pending.error = exc
        return [pending.error] * len(pending.targets)

    def close(self) -> None:
        self._pool.close()

    # ---- internals ---------------------------------------------------------------------------
    def _send(self, pending: Pending, *, fresh: bool = False) -> None:
        first = pending.checked[0]
        try:
            if fresh:
                self._pool.discard_idle(first.data_addr)
            conn, reused = self._pool.acquire(first.data_addr, pending.node_id,
                                              pending.deadline)
        except KVStoreError as exc:
            pending.error = exc
            return
        pending.conn, pending.reused = conn, reused
        try:
            conn.set_deadline(pending.deadline)
            # NOTE: one send for the whole batch (request ids are not matched: replies come
            # in order)
            conn.sock.sendall(_requests(pending))
        except ValueError as exc:
            self._drop(pending)
            pending.error = TransferError(f"nixl {pending.node_id}: cannot frame the write "
                                          f"checks: {exc}")
        except (OSError, KVStoreError) as exc:
            if isinstance(exc, OSError) and reused and not fresh:
                self._drop(pending)
                self._send(pending, fresh=True)
                return
            self._drop(pending)
            pending.error = exc if isinstance(exc, KVStoreError) else \
                map_os_error(exc, pending.node_id, "write check")

    def _receive(self, pending: Pending) -> list[KVStoreError | None]:
        """The daemon's answer per range of ``pending.checked``."""
        conn = pending.conn
        conn.set_deadline(pending.deadline)
        results: list[KVStoreError | None] = []
        if pending.batched:
            for count in pending.counts:
                status, message, length = conn.read_reply()
                if status != Status.OK:
                    raise TransferError(f"nixl {pending.node_id}: write checks refused: "
                                        f"{status.name}: {message}")
                if length > check_batch.MAX_BODY_BYTES:
                    raise TransferError(f"nixl {pending.node_id}: write checks reply of "
                                        f"{length} bytes")
                try:
                    refused = check_batch.decode_refusals(
                        data_frames.recv_exact(conn.sock, length), count)
                except ValueError as exc:
                    raise TransferError(f"nixl {pending.node_id}: malformed write checks "
                                        f"reply: {exc}") from exc
                for index in range(count):
                    status, message = refused.get(index, (Status.OK, ""))
                    results.append(_result(pending, pending.checked[len(results)], status,
                                           message))
        else:
            for target in pending.checked:
                status, message, length = conn.read_reply()
                if length:
                    raise TransferError(f"nixl {pending.node_id}: write check reply carries "
                                        f"{length} bytes, expected none")
                results.append(_result(pending, target, status, message))
        pending.conn = None
        self._pool.release(conn)
        return results

    @staticmethod
    def _drop(pending: Pending) -> None:
        if pending.conn is not None:
            pending.conn.close()
            pending.conn = None


def _requests(pending: Pending) -> bytes:
    """Every request of ``pending``, framed, in order (a batched one notes its counts).
    ValueError for a segment id or capability the frames cannot carry."""
    if pending.batched:
        requests = check_batch.encode_ranges([
            (t.segment_id.encode(), t.offset, t.length, t.capability) for t in pending.checked])
        pending.counts = [count for count, _ in requests]
        return b"".join(data_frames.REQUEST.pack(data_frames.REQUEST_MAGIC, Op.CHECK_WRITES, 0,
                                                 0, i, count, len(body)) + body
                        for i, (count, body) in enumerate(requests))
    return b"".join(data_frames.encode_request(Op.CHECK_WRITE, target.segment_id.encode(), i,
                                               target.offset, target.length, target.capability)
                    for i, target in enumerate(pending.checked))


def coalesce(targets: list[Target]) -> tuple[list[Target], list[list[int]]]:
    """The ranges to check for ``targets`` and, per range, the positions it covers: targets
    of one segment sharing a non-empty capability become one range from the lowest offset
    to the highest end (see the module docstring); every other target is its own range.
    NOTE: empty capabilities are never merged: a node without a secret allows any write, but
    a covering range could name bytes no put of this batch was given."""
    if len(targets) < 2:
        return list(targets), [[i] for i in range(len(targets))]
    groups: dict[tuple[str, bytes], list[int]] = {}
    order: list[list[int]] = []
    for i, target in enumerate(targets):
        if not target.capability:
            order.append([i])
            continue
        group = groups.get((target.segment_id, target.capability))
        if group is None:
            group = groups[(target.segment_id, target.capability)] = []
            order.append(group)
        group.append(i)
    checked = []
    for members in order:
        first = targets[members[0]]
        if len(members) > 1:
            start = min(targets[i].offset for i in members)
            end = max(targets[i].offset + targets[i].length for i in members)
            first = first._replace(offset=start, length=end - start)
        checked.append(first)
    return checked, order


def _expand(pending: Pending, answers: list[KVStoreError | None]) -> list[KVStoreError | None]:
    """Per target of ``pending``, the answer of the range that covered it."""
    if len(pending.checked) == len(pending.targets):
        return answers
    results: list[KVStoreError | None] = [None] * len(pending.targets)
    for answer, members in zip(answers, pending.members):
        for i in members:
            results[i] = answer
    return results


def _result(pending: Pending, target: Target, status: Status,
            message: str) -> KVStoreError | None:
    """None for an allowed range, else the refusal naming the node, the range and why."""
    if status == Status.OK:
        return None
    return TransferError(f"nixl {pending.node_id}: write of segment {target.segment_id!r} "
                         f"[{target.offset}, +{target.length}) refused: {status.name}: "
                         f"{message}")
