"""The dependency-free transport: byte ranges over TCP to the daemon's data-plane server.

Payloads never pass through Python bytes objects: a write sends the caller's buffer with
``sendmsg`` and a read ``recv_into``s the caller's buffer. A range of at least
2 x ``stripe_min_bytes`` is split into stripes of at least ``stripe_min_bytes`` (at most
``num_streams`` of them) sent over as many connections in parallel; a batch is split into up
to ``num_streams`` groups, each pipelined on one connection (several requests in flight
before their replies are read).

Retries: every operation is idempotent (a write stores the same bytes at the same place), so
an operation that failed on a pooled connection that had gone stale (the daemon restarted or
closed it) is retried once on a fresh connection. Errors: ``TransferError`` naming the node
(``TransferTimeoutError`` past ``timeout_s``), ``AuthenticationError`` when the daemon refuses
the token or the TLS handshake fails, ``InvalidArgumentError`` for a buffer whose size
differs from the range. With ``tls`` (``kvstore.TLSConfig``) every connection is TLS.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Sequence

from kvstore._deadline import Deadline
from kvstore._errors import ClosedError, InvalidArgumentError, TransferError
from kvstore._tls import TLSConfig
from kvstore.transport import byte_views
from kvstore.transport.base import Target, Transport
from kvstore.transport.data_frames import MAX_TOKEN_BYTES, Op, Status, recv_exact_into
from kvstore.transport.tcp_conn import Connection, ConnectionPool, ReplyError, map_os_error

DEFAULT_NUM_STREAMS = 4
DEFAULT_STRIPE_MIN_BYTES = 1024 * 1024  # measured: 4 MiB as 4 x 1 MiB beat 1 x 4 MiB
UNSTRIPED_SSD_BYTES = 4 << 20   # an SSD/HBM single put below twice this: one WRITE_COMMIT
# NOTE: requests in flight per connection in a batch: enough to hide a round trip, few
# enough that the daemon's replies never fill its socket buffer while we are still sending.
PIPELINE_DEPTH = 16
_NO_PAYLOAD = memoryview(bytearray())
# the ops whose reply carries the range's bytes (a WRITE's and a WRITE_COMMIT's carry none)
_READ_OPS = frozenset((Op.READ, Op.CHECKED_READ))


class TcpTransport(Transport):
    """Reads and writes segment ranges of any reachable daemon over its TCP data plane.

    Thread-safe: connections are taken from a per-node pool, used by one thread, returned.
    ``close()`` closes idle connections and refuses further use (idempotent).
    """

    name = "tcp"

    def __init__(self, token: str | None = None, num_streams: int = DEFAULT_NUM_STREAMS, *,
                 stripe_min_bytes: int = DEFAULT_STRIPE_MIN_BYTES,
                 max_idle_per_node: int = 32, tls: TLSConfig | None = None):
        if num_streams < 1:
            raise InvalidArgumentError(f"num_streams must be >= 1, got {num_streams}")
        if stripe_min_bytes < 1:
            raise InvalidArgumentError(f"stripe_min_bytes must be >= 1, got {stripe_min_bytes}")
        if token is not None and len(token.encode()) > MAX_TOKEN_BYTES:
            raise InvalidArgumentError(f"token longer than {MAX_TOKEN_BYTES} bytes")
        self.num_streams = num_streams
        self.stripe_min_bytes = stripe_min_bytes
        self._pool = ConnectionPool(token=token, max_idle_per_node=max_idle_per_node, tls=tls)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, num_streams - 1), thread_name_prefix="kvstore-tcp")
        self._closed = False
        # node ids whose daemon answered a WRITE_COMMIT with BAD_FRAME (older than op 14)
        self._no_write_commit: set[str] = set()
        # node ids whose daemon answered a WRITE_RESERVED with BAD_FRAME (older than op 18)
        self._no_write_reserved: set[str] = set()

    def can_reach(self, target: Target) -> bool:
        return bool(target.data_addr)

    def write(self, target: Target, src: memoryview, *, timeout_s: float) -> None:
        src = byte_views.as_bytes_view(src, target.length)
        self._transfer(Op.WRITE, target, src, Deadline.after(timeout_s))

    def read_into(self, target: Target, dst: memoryview, *, timeout_s: float) -> None:
        dst = byte_views.as_bytes_view(dst, target.length, writable=True)
        self._transfer(Op.READ, target, dst, Deadline.after(timeout_s))

    def write_many(self, items: Sequence[tuple[Target, memoryview]], *,
                   timeout_s: float) -> list[BaseException | None]:
        return self._batch(Op.WRITE, items, timeout_s)

    def read_many(self, items: Sequence[tuple[Target, memoryview]], *,
                  timeout_s: float) -> list[BaseException | None]:
        return self._batch(Op.READ, items, timeout_s)

    def takes_write_commit(self, target: Target) -> bool:
        """Whether ``write_commit`` applies to ``target``: a range sent in one piece (not
        striped: shorter than two stripes, or, in a segment without a shm name, SSD or
        HBM, shorter than 2 x UNSTRIPED_SSD_BYTES) to a daemon not known to be older than
        WRITE_COMMIT.

        NOTE: an SSD (or HBM) range of up to 8 MiB is not striped: its daemon pipelines
        the one stream itself (receive into pieces while earlier ones are written,
        ``aligned_io``), and its commit then rides in the same request; 4 stripes of 1 MiB
        were each received whole before any of their bytes reached the disk, and the
        commit took a second request. Longer ranges keep their stripes: one daemon thread
        receiving the whole object then bounds the stream (bench/RESULTS.md, "SSD puts
        (9p)")."""
        return ((target.length < 2 * self.stripe_min_bytes
                 or (not target.shm_name and target.length < 2 * UNSTRIPED_SSD_BYTES))
                and target.node_id not in self._no_write_commit)

    def write_commit(self, target: Target, src: memoryview, key: str, checksum: int, *,
                     timeout_s: float) -> None:
        """Write ``src`` to ``target`` and commit it there as ``key`` with ``checksum``
        in one WRITE_COMMIT; returns once the daemon's object table holds it (durably).

        Raises ReplyError when the daemon refused the write or the commit (nothing is
        committed; status BAD_FRAME from a daemon older than op 14, which ``takes_write_commit``
        then answers False for), TransferError otherwise (a lost connection: the commit
        may or may not have been applied; the caller revokes the key, whose removal the
        daemon then applies, or which it drops on arrival)."""
        src = byte_views.as_bytes_view(src, target.length)
        if self._closed:
            raise ClosedError(f"tcp {target.node_id}: transport is closed")
        try:
            self._transfer_once(Op.WRITE_COMMIT, target, src, Deadline.after(timeout_s),
                                (key.encode(), checksum))
        except ReplyError as exc:
            if exc.status == Status.BAD_FRAME:
                self._no_write_commit.add(target.node_id)
            raise

    def takes_write_reserved(self, target: Target) -> bool:
        """Whether ``write_reserved`` applies to ``target``: what ``takes_write_commit``
        says, to a daemon not known to be older than WRITE_RESERVED."""
        return self.takes_write_commit(target) and target.node_id not in self._no_write_reserved

    def write_reserved(self, target: Target, src: memoryview, key: str, checksum: int,
                       reservation_id: int, client_id: str, *, timeout_s: float) -> None:
        """Write ``src`` to ``target`` (a part of reservation ``reservation_id``, whose
        capability ``target`` carries) in one WRITE_RESERVED; returns once the daemon made
        it visible as ``key`` (its master's PutEnd) and durable (its table).

        Raises ReplyError when the daemon refused the write or the put (status
        RESERVATION_GONE: nothing committed, put the key through PutStart; BAD_FRAME from a
        daemon older than op 18, which ``takes_write_reserved`` then answers False for),
        TransferError otherwise (a lost connection: the key may be visible or not)."""
        src = byte_views.as_bytes_view(src, target.length)
        if self._closed:
            raise ClosedError(f"tcp {target.node_id}: transport is closed")
        try:
            self._transfer_once(Op.WRITE_RESERVED, target, src, Deadline.after(timeout_s),
                                (key.encode(), checksum, reservation_id, client_id.encode()))
        except ReplyError as exc:
            if exc.status == Status.BAD_FRAME:
                self._no_write_reserved.add(target.node_id)
            raise

    def read_checked_many(self, items: Sequence[tuple[Target, memoryview]], *,
                          timeout_s: float) -> list[BaseException | None]:
        """``read_many`` as CHECKED_READs (location reads): each target's ``capability``
        is the object's identity (``checked_read.encode_identity``); a daemon that no longer
        holds that object there refuses it (ReplyError, status LOCATION_OFF or
        LOCATION_STALE), the connection staying usable."""
        return self._batch(Op.CHECKED_READ, items, timeout_s)

    def close(self) -> None:
        self._closed = True
        self._pool.close()
        self._executor.shutdown(wait=False)

    # ---- single ranges -------------------------------------------------------------------

    def _transfer(self, op: Op, target: Target, buffer: memoryview, deadline: Deadline) -> None:
        if self._closed:
            raise ClosedError(f"tcp {target.node_id}: transport is closed")
        if target.offset < 0:
            raise InvalidArgumentError(f"negative offset {target.offset}")
        num_stripes = min(self.num_streams, target.length // self.stripe_min_bytes)
        if num_stripes <= 1:
            self._transfer_once(op, target, buffer, deadline)
            return
        stripe_bytes = -(-target.length // num_stripes)
        stripes = [(start, min(stripe_bytes, target.length - start))
                   for start in range(0, target.length, stripe_bytes)]
        futures = [self._executor.submit(self._transfer_stripe, op, target, buffer, start,
                                         length, deadline) for start, length in stripes[1:]]
        first_error: BaseException | None = None
        try:
            self._transfer_stripe(op, target, buffer, *stripes[0], deadline)
        except BaseException as exc:  # noqa: BLE001 - the other stripes must be awaited
            first_error = exc
        for future in futures:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def _transfer_stripe(self, op: Op, target: Target, buffer: memoryview, start: int,
                         length: int, deadline: Deadline) -> None:
        # NOTE: the stripe keeps the whole range's capability, which allows any part of it
        stripe = target._replace(offset=target.offset + start, length=length)
        self._transfer_once(op, stripe, buffer[start:start + length], deadline)

    def _transfer_once(self, op: Op, target: Target, buffer: memoryview,
                       deadline: Deadline, commit: tuple[bytes, int] | None = None) -> None:
        """One request on one connection; retried once if a pooled connection was stale.
        ``commit``: a WRITE_COMMIT's (key, checksum), or a WRITE_RESERVED's (key, checksum,
        reservation_id, client_id).

        NOTE: a retried WRITE_COMMIT whose first frame was applied (its reply lost) is
        refused RANGE_COMMITTED: the put fails, retryable, with nothing wrong stored."""
        for attempt in range(2):
            conn, reused = self._pool.acquire(target.data_addr, target.node_id, deadline)
            try:
                if commit is None:
                    self._exchange(conn, op, target, buffer, deadline)
                else:
                    self._exchange_write_commit(conn, target, buffer, commit, deadline)
            except ReplyError as exc:
                self._finish(conn, healthy=op in _READ_OPS and exc.status != Status.BAD_FRAME)
                raise
            except TransferError:
                conn.close()
                raise
            except OSError as exc:
                conn.close()
                if reused and attempt == 0 and not isinstance(exc, TimeoutError):
                    continue
                raise map_os_error(exc, target.node_id, op.name.lower()) from exc
            self._pool.release(conn)
            return

    def _finish(self, conn: Connection, *, healthy: bool) -> None:
        # NOTE: after a refused WRITE the server closes: the connection is not reusable.
        if healthy:
            self._pool.release(conn)
        else:
            conn.close()

    def _exchange(self, conn: Connection, op: Op, target: Target, buffer: memoryview,
                  deadline: Deadline) -> None:
        conn.set_deadline(deadline)
        segment_id = target.segment_id.encode()
        # NOTE: a READ carries its read capability too (b"": none, the frame is unflagged)
        conn.send_request(op, segment_id, target.offset, target.length,
                          buffer if op == Op.WRITE else None, target.capability)
        status, message, length = conn.read_only_reply(
            buffer if op in _READ_OPS else _NO_PAYLOAD)
        self._check_reply(op, target, status, message, length)

    def _exchange_write_commit(self, conn: Connection, target: Target, buffer: memoryview,
                               commit: tuple, deadline: Deadline) -> None:
        conn.set_deadline(deadline)
        if len(commit) == 2:
            op = Op.WRITE_COMMIT
            conn.send_write_commit(target.segment_id.encode(), target.offset, buffer,
                                   target.capability, *commit)
        else:
            op = Op.WRITE_RESERVED
            conn.send_write_reserved(target.segment_id.encode(), target.offset, buffer,
                                     target.capability, *commit)
        status, message, length = conn.read_only_reply(_NO_PAYLOAD)
        self._check_reply(op, target, status, message, length)

    @staticmethod
    def _check_reply(op: Op, target: Target, status: Status, message: str,
                     length: int) -> None:
        """ReplyError for a refused request, TransferError for a reply of the wrong size."""
        if status != Status.OK:
            raise ReplyError(f"tcp {target.node_id}: {op.name.lower()} of segment "
                             f"{target.segment_id!r} [{target.offset}, +{target.length}) "
                             f"refused: {status.name}: {message}", status)
        expected = target.length if op in _READ_OPS else 0
        if length != expected:
            raise TransferError(f"tcp {target.node_id}: reply carries {length} bytes, "
                                f"expected {expected}")

    def _receive(self, conn: Connection, op: Op, target: Target, buffer: memoryview) -> None:
        status, message, length = conn.read_reply()
        self._check_reply(op, target, status, message, length)
        if op in _READ_OPS and length:
            recv_exact_into(conn.sock, buffer)

    # ---- batches -------------------------------------------------------------------------

    def _batch(self, op: Op, items: Sequence[tuple[Target, memoryview]],
               timeout_s: float) -> list[BaseException | None]:
        if self._closed:
            return [ClosedError(f"tcp {target.node_id}: transport is closed")
                    for target, _ in items]
        results: list[BaseException | None] = [None] * len(items)
        views: list[memoryview | None] = [None] * len(items)
        addr_to_indices: dict[str, list[int]] = collections.defaultdict(list)
        for index, (target, buffer) in enumerate(items):
            try:
                views[index] = byte_views.as_bytes_view(buffer, target.length,
                                                     writable=op in _READ_OPS)
                if target.offset < 0:
                    raise InvalidArgumentError(f"negative offset {target.offset}")
                addr_to_indices[target.data_addr].append(index)
            except InvalidArgumentError as exc:
                results[index] = exc
        valid = [index for indices in addr_to_indices.values() for index in indices]
        if len(valid) == 1:
            # NOTE: a batch of one large range is striped like a single transfer would be
            index = valid[0]
            target = items[index][0]
            try:
                self._transfer(op, target, views[index], Deadline.after(timeout_s))
            except Exception as exc:  # noqa: BLE001 - reported per item
                results[index] = exc
            return results
        groups: list[list[int]] = []
        for indices in addr_to_indices.values():
            num_groups = min(self.num_streams, len(indices))
            groups.extend(indices[g::num_groups] for g in range(num_groups))
        futures = [self._executor.submit(self._run_group, op, items, views, group, results,
                                         timeout_s) for group in groups[1:]]
        if groups:
            self._run_group(op, items, views, groups[0], results, timeout_s)
        for future in futures:
            future.result()
        return results

    def _run_group(self, op: Op, items: Sequence[tuple[Target, memoryview]],
                   views: list[memoryview | None], group: list[int],
                   results: list[BaseException | None], timeout_s: float) -> None:
        """Pipeline ``group``'s requests on one connection; fill ``results`` for them.

        Items left unanswered when the connection breaks are retried one by one on fresh
        connections, so one bad item never fails its neighbours.
        """
        first = items[group[0]][0]
        deadline = Deadline.after(timeout_s)
        unresolved = list(group)
        try:
            conn, _ = self._pool.acquire(first.data_addr, first.node_id, deadline)
        except Exception as exc:  # noqa: BLE001 - reported per item
            for index in group:
                results[index] = exc
            return
        in_flight: collections.deque[int] = collections.deque()
        next_pos = 0
        healthy = True
        try:
            while next_pos < len(group) or in_flight:
                # NOTE: re-armed per reply, so no single wait outlives the batch's deadline
                conn.set_deadline(deadline)
                while next_pos < len(group) and len(in_flight) < PIPELINE_DEPTH:
                    index = group[next_pos]
                    target = items[index][0]
                    conn.send_request(op, target.segment_id.encode(), target.offset,
                                      target.length,
                                      views[index] if op == Op.WRITE else None,
                                      target.capability)
                    in_flight.append(index)
                    next_pos += 1
                index = in_flight.popleft()
                try:
                    self._receive(conn, op, items[index][0], views[index])
                except ReplyError as exc:
                    results[index] = exc
                    unresolved.remove(index)
                    if op == Op.WRITE or exc.status == Status.BAD_FRAME:
                        healthy = False
                        break
                    continue
                unresolved.remove(index)
        except (OSError, TransferError):
            healthy = False
        if healthy:
            self._pool.release(conn)
        else:
            conn.close()
        for index in unresolved:
            target = items[index][0]
            try:
                self._transfer_once(op, target, views[index], deadline)
            except Exception as exc:  # noqa: BLE001 - reported per item
                results[index] = exc
