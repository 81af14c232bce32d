"""The writer's own commit of its replicas on their daemons (durable commit, client-parallel
path; issue 10): one CLIENT_COMMIT frame per daemon per batch, sent before PutEnd and read
after it, so a put waits for the longer of PutEnd and the daemons' commits, not their sum.
Replicas written through shared memory to a daemon with a commit ring are committed by
appending one record per daemon per batch to that ring instead (``ring_commit``,
``kvstore/commit_ring.py``): durable once appended, with no daemon wake-up; a ring that is
full, gone or cannot be mapped leaves its entries to the frame, and so does an entry whose
capability has less than ``RING_MIN_VALIDITY_S`` left: the daemon drains its ring later and
refuses an expired capability there, where the writer would never hear of it, while the
frame's answer reports a refusal to the writer.
Where the master gave a batch capability for a node (``PutStartResponse.node_capability``)
and one record or frame carries every entry it covers, that record carries it instead of
the entries' own capabilities (the daemon checks one MAC instead of one per entry; issue
10, 10m); any other group (part of a batch: a failed write, entries split between ring and
frame) sends the per-entry capabilities, as before.

Guarantee: ``Commits.finish`` reports a key as committed only if every daemon it was sent
to answered that its object table holds it (durably for SSD); any other outcome (a refused
entry, a daemon that does not answer within the deadline, a lost connection) is a
``TransferError`` naming the key and the node, retryable (keys are content-addressed). Each
entry carries the put's write capability, which the daemon verifies like a WRITE's.

Connections: one pool of data-plane connections (``transport.tcp_conn``) per store, the
same token and TLS as the transports; a connection whose state is uncertain is closed.
Thread-safe (the pool is; each batch uses its own connections).
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from typing import Sequence

from kvstore import capability, commit_ring
from kvstore._deadline import Deadline
from kvstore._errors import KVStoreError, TransferError
from kvstore._principal import principal_for_token
from kvstore._tls import TLSConfig
from kvstore.transport import data_frames
from kvstore.transport.base import Target
from kvstore.transport.data_frames import Status
from kvstore.transport.tcp_conn import ConnectionPool, map_os_error
from kvstore.v1 import master_pb2 as pb

#: Idle connections kept per daemon (one batch uses one per daemon).
MAX_IDLE_PER_NODE = 4
#: Longest a put waits for a daemon's answer (within the call's deadline). NOTE: the
#: master's --commit-timeout default, for the same reasons (docs/ARCHITECTURE.md, Durable
#: commit): far above a healthy daemon's sub-millisecond answer, below the RPC timeout.
COMMIT_TIMEOUT_S = 2.0
#: Least validity a write capability must have left for its commit to go into a ring
#: (else: the frame). NOTE: the daemon drains every 20 ms (``daemon/ring_drain.py``) and
#: checks expiry with the same host's clock; 1 s is 50 drain intervals, and a capability
#: lives the master's --pending-timeout (30 s) from PutStart, so only a put that took
#: over 29 s from PutStart to its commit (or a master with a pending timeout under 1 s)
#: loses the ring's shortcut.
RING_MIN_VALIDITY_S = 1.0


class DaemonCommitter:
    """Sends CLIENT_COMMIT frames to replica daemons over pooled connections."""

    def __init__(self, token: str | None, tls: TLSConfig | None = None,
                 wall_clock=time.time):
        self._wall_clock = wall_clock     # the capabilities' clock (Unix seconds)
        self._pool = ConnectionPool(token=token, max_idle_per_node=MAX_IDLE_PER_NODE, tls=tls)
        # NOTE: the principal the daemon's data plane would give our connections: the
        # capability names it, and a ring record says it (the capability's MAC binds it)
        self._principal = principal_for_token(token)
        self.num_ring_records = 0     # batches committed through a ring
        self.num_ring_fallbacks = 0   # batches a ring could not take (full, gone, unmapped)
        self.num_ring_expiring = 0    # entries sent by frame: capability about to expire

    def ring_commit(self, entries: Sequence[tuple[int, str, Target, int]],
                    rings: dict[str, str], batches: dict[str, bytes] | None = None,
                    ) -> list[tuple[int, str, Target, int]]:
        """Append the commit of each entry whose node has a ring in ``rings`` (node id ->
        shm name; the caller passes only entries written through shared memory), one record
        per node; return the entries left for ``begin`` (no ring, the ring refused, or a
        capability that expires within ``RING_MIN_VALIDITY_S``). ``batches``: node id ->
        its batch capability (``PutSlots.node_capabilities``)."""
        by_node: dict[str, list] = defaultdict(list)
        rest = []
        valid_from_ms = int((self._wall_clock() + RING_MIN_VALIDITY_S) * 1000)
        for entry in entries:
            if entry[2].node_id not in rings:
                rest.append(entry)
            elif (capability.expiry_ms(entry[2].capability) if entry[2].capability else
                  capability.batch_expiry_ms((batches or {}).get(entry[2].node_id, b""))
                  ) <= valid_from_ms:
                self.num_ring_expiring += 1
                rest.append(entry)
            else:
                by_node[entry[2].node_id].append(entry)
        for node_id, group in by_node.items():
            try:
                writer = commit_ring.writer_for(rings[node_id])
                appended = writer.append(commit_ring.encode_record(
                    self._principal, _body(group, (batches or {}).get(node_id, b""))))
            except (OSError, ValueError):
                appended = False
            if appended:
                self.num_ring_records += 1
            else:
                self.num_ring_fallbacks += 1
                rest.extend(group)
        return rest

    def begin(self, entries: Sequence[tuple[int, str, Target, int]],
              deadline: Deadline, batches: dict[str, bytes] | None = None) -> "Commits":
        """Send the commit of every ``(index, key, target, checksum)`` (one frame per
        daemon; ``batches`` as for ``ring_commit``); ``finish`` reads the answers. Never
        raises: a send that fails is reported by ``finish``."""
        deadline = Deadline(min(deadline.at_s, Deadline.after(COMMIT_TIMEOUT_S).at_s))
        by_node: dict[tuple[str, str], list] = defaultdict(list)
        for entry in entries:
            target = entry[2]
            by_node[(target.data_addr, target.node_id)].append(entry)
        commits = Commits(self._pool, deadline)
        for (data_addr, node_id), group in by_node.items():
            body = _body(group, (batches or {}).get(node_id, b""))
            conn = None
            try:
                conn, _ = self._pool.acquire(data_addr, node_id, deadline)
                conn.set_deadline(deadline)
                data_frames.sendmsg_all(conn.sock, [data_frames.encode_client_commit(
                    1, len(body)), body])
                commits.sent.append((conn, node_id, group))
            except (OSError, KVStoreError) as exc:
                if conn is not None:
                    conn.close()
                commits.fail(group, node_id, _error(exc, node_id, "send its commit"))
        return commits

    def close(self) -> None:
        self._pool.close()


class Commits:
    """The commits of one batch in flight: ``finish`` waits for every daemon's answer."""

    def __init__(self, pool: ConnectionPool, deadline: Deadline):
        self._pool = pool
        self._deadline = deadline
        self.sent: list[tuple] = []        # (connection, node id, entries)
        self.failures: dict[int, KVStoreError] = {}

    def fail(self, group, node_id: str, cause: KVStoreError) -> None:
        for index, key, target, _ in group:
            self.failures.setdefault(index, TransferError(
                f"put {key!r}: node {node_id!r} ({target.data_addr}) did not confirm the "
                f"commit: {cause}; retry the put", keys=[key]))

    def finish(self) -> dict[int, KVStoreError]:
        """Read every daemon's answer (within the call's deadline, at most
        ``COMMIT_TIMEOUT_S``); index -> error of each key that some daemon did not
        confirm."""
        for conn, node_id, group in self.sent:
            try:
                conn.set_deadline(self._deadline)
                status, message, length = conn.read_reply()
                payload = data_frames.recv_exact(conn.sock, length) if length else b""
            except (OSError, KVStoreError, data_frames.PeerClosedError) as exc:
                conn.close()
                self.fail(group, node_id, _error(exc, node_id, "confirm its commit"))
                continue
            if status != Status.OK:
                conn.close()
                self.fail(group, node_id, TransferError(f"{status.name}: {message}"))
                continue
            self._pool.release(conn)
            for line in payload.decode(errors="replace").splitlines():
                index, _, reason = line.partition("\t")
                if index.isdigit() and int(index) < len(group):
                    self.fail([group[int(index)]], node_id, TransferError(f"refused: {reason}"))
        self.sent = []
        return self.failures

    def abandon(self) -> None:
        """Close the connections whose answers will not be read (the put failed)."""
        for conn, _, _ in self.sent:
            conn.close()
        self.sent = []


def _body(group, batch: bytes = b"") -> bytes:
    """The serialized ClientCommit of ``(index, key, target, checksum)`` entries, with the
    batch capability ``batch`` instead of the entries' own where it covers exactly them
    (it states their count, and the group is a part of its batch in the batch's order)."""
    message = pb.ClientCommit(
        keys=[key for _, key, _, _ in group],
        segment_ids=[t.segment_id for _, _, t, _ in group],
        offsets=[t.offset for _, _, t, _ in group],
        sizes=[t.length for _, _, t, _ in group],
        checksums=[checksum for _, _, _, checksum in group])
    if batch and capability.batch_count(batch) == len(group):
        message.batch_capability = batch
    else:
        message.capabilities.extend(t.capability for _, _, t, _ in group)
    return message.SerializeToString()


def _error(exc: BaseException, node_id: str, what: str) -> KVStoreError:
    if isinstance(exc, KVStoreError):
        return exc
    if isinstance(exc, socket.timeout):
        return TransferError(f"no answer within the deadline ({what})")
    return map_os_error(exc, node_id, what)
