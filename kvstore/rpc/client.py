"""``MasterClient``: the one typed API over the master, used by the client flows, the
daemon's link to its master, ``kvstore status`` and the benchmarks.

Each verb takes and returns Python values (``kvstore.rpc.results``), never protobuf
messages; a batch verb returns one result per key, in order (the key's result, or the
``KVStoreError`` of that item, naming its key). Whole-call failures raise: AuthenticationError
(token refused), MasterUnavailableError (unreachable, or past the deadline; its subclass
ConnectionLostError when the connection broke), InvalidArgumentError (the master refused
the request as a whole), ClosedError (after ``close``).

Call policy, the same over both carriers (``carrier``: gRPC or the framed fast path):
- Deadline: every verb takes an optional ``deadline`` (``kvstore._deadline.Deadline``); each
  attempt gets at most ``rpc_timeout_s`` of what is left of it.
- Retries: a retryable method (``kvstore.rpc.methods``: idempotent ones) whose connection
  broke before its reply is sent once more, if the deadline allows; any other failure, and
  any failure of a non-idempotent method (PutStart above all: it allocates), is raised.
  A call the master refused without running it (``NotServingError``: a standby, or a leader
  taking over) may be sent again whatever its method. Over a carrier that follows a
  cluster's leader (``failover``: ``kvstore.ha.carrier``) both go on, every
  ``RETRY_PAUSE_S``, until the deadline.
- The token: given to the carrier once, sent with every call.

Thread-safe (the carriers are).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from kvstore._deadline import Deadline
from kvstore._errors import KVStoreError, MasterUnavailableError, TransferError
from kvstore.rpc import messages
from kvstore.rpc.carrier import Carrier
from kvstore.rpc.errors import ConnectionLostError, NotServingError, item_error, malformed
from kvstore.rpc.methods import METHODS, Method
from kvstore.rpc.results import (
    HeartbeatChanges, HomeNode, HomeNodes, Inventory, MasterStats, NodeSpec, NodeStatus,
    Registration, ReplicaSet, ReservationGrant,
)
from kvstore.tiers import Tier
from kvstore.transport.base import Target
from kvstore.v1 import master_pb2 as pb

#: Attempts of a retryable method whose connection broke (the first one included).
RETRYABLE_ATTEMPTS = 2
#: Pause between resends over a carrier that follows a cluster's leader.
RETRY_PAUSE_S = 0.1

_M = METHODS


def _ms(seconds: float | None) -> int:
    return int((seconds or 0) * 1000)


class MasterClient:
    """Typed calls to one master over ``carrier`` (see the module docstring)."""

    def __init__(self, carrier: Carrier, *, rpc_timeout_s: float = 10.0):
        self.carrier = carrier
        self.rpc_timeout_s = rpc_timeout_s

    @property
    def address(self) -> str:
        return self.carrier.address

    @property
    def epoch(self) -> int:
        """The highest leader epoch seen (0: not in an etcd cluster)."""
        return getattr(self.carrier, "epoch", 0)

    @property
    def path(self) -> str:
        """Which carrier the calls travel: "grpc" or "fast"."""
        return self.carrier.name

    # ---- the call policy -------------------------------------------------------------------

    def start(self, method: Method, request: Any, deadline: Deadline | None) -> "_Call":
        """Send ``request`` now; ``result()`` of the returned call waits for the reply (with
        the retry rule applied), so a caller can work while the master does."""
        return _Call(self, method, request, deadline or Deadline.after(self.rpc_timeout_s))

    def call(self, method: Method, request: Any, deadline: Deadline | None = None) -> Any:
        """``start(...).result()``: the reply message of one raw call."""
        return self.start(method, request, deadline).result()

    # ---- put -------------------------------------------------------------------------------

    def begin_put_start(self, keys: Sequence[str], sizes: Sequence[int], *, client_id: str,
                        replicas: int = 1, near_host_id: str = "", near_node_id: str = "",
                        tier: Tier | None = None,
                        soft_pin_ttl_s: float | None = None, hard_pin: bool = False,
                        deadline: Deadline | None = None,
                        batch_capabilities: bool = True,
                        shm_write_host_id: str = "") -> "_Result":
        """Send PutStart; ``result()`` gives, per key, the Targets to write (one per
        replica), None if the key exists already (nothing to write: a success), or the
        item's error (CapacityError, InvalidArgumentError, ...). Not idempotent, never
        retried: the objects are PENDING until ``put_end``. ``near_node_id`` places replicas
        on that node first (within the tier order), ``near_host_id`` on that host next.
        ``batch_capabilities``: ask for the nodes' batch capabilities (PutSlots.
        node_capabilities, for the writer's own commits); False: per-replica ones only.
        ``shm_write_host_id``: the host whose shm segments this client writes through
        shared memory (PutStartRequest.shm_write_host_id): replicas on nodes there that
        the batch capability covers then come without per-replica capabilities."""
        request = pb.PutStartRequest(
            keys=keys, sizes=sizes, replicas=replicas, near_host_id=near_host_id,
            near_node_id=near_node_id,
            client_id=client_id, hard_pin=hard_pin, preferred_tier=tier or 0,
            soft_pin_ttl_ms=_ms(soft_pin_ttl_s), batch_capabilities=batch_capabilities,
            shm_write_host_id=shm_write_host_id)
        call = self.start(_M["PutStart"], request, deadline)
        return _Result(call, lambda reply: messages.put_slots(reply, keys, sizes))

    def put_start(self, keys: Sequence[str], sizes: Sequence[int], **options: Any,
                  ) -> list[list[Target] | KVStoreError | None]:
        """``begin_put_start(...).result()``."""
        return self.begin_put_start(keys, sizes, **options).result()

    def put_end(self, keys: Sequence[str], checksums: Sequence[int], *, client_id: str,
                deadline: Deadline | None = None,
                client_committed: bool = False) -> list[KVStoreError | None]:
        """Make this writer's PENDING objects COMPLETE (visible), recording each checksum.
        Per key: None, or KeyNotFoundError (not this writer's pending object: revoked or
        reclaimed). Idempotent. ``client_committed``: the caller committed the replicas on
        their daemons itself (CLIENT_COMMIT) and waits for them; the master does not."""
        return self.begin_put_end(keys, checksums, client_id=client_id, deadline=deadline,
                                  client_committed=client_committed).result()

    def begin_put_end(self, keys: Sequence[str], checksums: Sequence[int], *,
                      client_id: str, deadline: Deadline | None = None,
                      client_committed: bool = False) -> "_Result":
        """Send PutEnd now; ``result()`` gives what ``put_end`` returns (and raises what it
        raises), so the writer can work while the master commits."""
        call = self.start(_M["PutEnd"], pb.PutEndRequest(
            keys=keys, client_id=client_id, checksums=checksums,
            client_committed=client_committed), deadline)
        return _Result(call, lambda reply: messages.statuses_to_results(
            reply, keys, "PutEnd", "put_end"))

    def reserve(self, size_bytes: int, *, client_id: str, near_host_id: str = "",
                min_bytes: int = 0, deadline: Deadline | None = None,
                ) -> ReservationGrant | str:
        """Ask for ``size_bytes`` (the master may grant less, never under ``min_bytes``) of
        DRAM to fill with later puts (``put_end_reserved``). Returns the grant, or the
        master's reason for granting none (a str). Raises InvalidArgumentError for a size of
        0, and the whole-call errors (an older master: UNIMPLEMENTED, as KVStoreError). Not
        idempotent, never retried: a lost reply's space returns after the master's TTL."""
        reply = self.call(_M["Reserve"], pb.ReserveRequest(
            size_bytes=size_bytes, client_id=client_id, near_host_id=near_host_id,
            min_bytes=min_bytes), deadline)
        if not reply.reservation_id:
            return reply.refusal or "the master granted no reservation"
        node, segment = reply.node, reply.segment
        return ReservationGrant(reply.reservation_id, Target(
            node.node_id, node.host_id, node.data_addr, segment.segment_id, segment.shm_name,
            reply.offset, reply.size_bytes, reply.capability), reply.ttl_ms / 1000,
            node.commit_ring)

    def put_end_reserved(self, reservation_id: int, keys: Sequence[str],
                         offsets: Sequence[int], sizes: Sequence[int],
                         checksums: Sequence[int], *, client_id: str,
                         deadline: Deadline | None = None) -> list[KVStoreError | None]:
        """Make keys this writer wrote inside reservation ``reservation_id`` (at
        ``offsets[i]``, ``sizes[i]`` bytes) COMPLETE; returns once their daemon holds the
        commits (the master's push). Per key: None (also for a key that already existed:
        content-addressed), KeyNotFoundError (the reservation expired or is unknown to this
        master: nothing recorded), InvalidArgumentError (a bad key, or a range outside the
        reservation or over one committed before), TransferError (the daemon did not
        confirm in time). Idempotent for this writer."""
        return self.put_end_reserved_committing(
            reservation_id, keys, offsets, sizes, checksums, client_id=client_id,
            deadline=deadline, client_committed=False)[0]

    def put_end_reserved_committing(self, reservation_id: int, keys: Sequence[str],
                                    offsets: Sequence[int], sizes: Sequence[int],
                                    checksums: Sequence[int], *, client_id: str,
                                    deadline: Deadline | None = None,
                                    client_committed: bool = True,
                                    ) -> tuple[list[KVStoreError | None], list[bytes]]:
        """``put_end_reserved``, where the caller commits the keys on their daemon itself
        once the reply is back (``client_committed``): returns the per-key results and the
        capability of each OK key for that commit (exactly its range and key). An empty
        list: the master committed them itself (its push, which the reply waited for), as
        ``put_end_reserved``."""
        reply = self.call(_M["PutEnd"], pb.PutEndRequest(
            keys=keys, client_id=client_id, checksums=checksums,
            client_committed=client_committed, reservation_id=reservation_id,
            reserved_offsets=offsets, reserved_sizes=sizes), deadline)
        results = messages.statuses_to_results(reply, keys, "PutEnd", "put")
        caps = list(reply.reserved_capabilities)
        if caps and len(caps) != len(keys):
            raise malformed("PutEnd", f"{len(caps)} reserved_capabilities for {len(keys)} keys")
        return [None if status == messages.ALREADY_EXISTS else error
                for status, error in zip(reply.statuses, results)], caps

    def put_revoke(self, keys: Sequence[str], *, client_id: str,
                   deadline: Deadline | None = None) -> list[KVStoreError | None]:
        """Give back the space of this writer's PENDING objects. Per key: None, or
        KeyNotFoundError (nothing pending under it)."""
        reply = self.call(_M["PutRevoke"], pb.PutRevokeRequest(keys=keys, client_id=client_id),
                          deadline)
        return messages.statuses_to_results(reply, keys, "PutRevoke", "put_revoke")

    # ---- get -------------------------------------------------------------------------------

    def get_replicas(self, keys: Sequence[str], *, client_host_id: str = "",
                     lease_ttl_s: float | None = None, deadline: Deadline | None = None,
                     ) -> list[ReplicaSet | KVStoreError]:
        """Per key: where its replicas are (same-host ones first), or the item's error
        (KeyNotFoundError when absent or still pending). Grants a read lease of
        ``lease_ttl_s`` (None: the master's default), which only lengthens. Idempotent."""
        return self.get_replicas_leased(keys, client_host_id=client_host_id,
                                        lease_ttl_s=lease_ttl_s, deadline=deadline)[0]

    def get_replicas_leased(self, keys: Sequence[str], *, client_host_id: str = "",
                            lease_ttl_s: float | None = None, deadline: Deadline | None = None,
                            shm_reads: bool = False,
                            ) -> tuple[list[ReplicaSet | KVStoreError], int]:
        """``get_replicas`` and the id of the leases it granted (0: none), to hand to
        ``release_leases`` once the reads are done. ``shm_reads``: this caller reads
        replicas on ``client_host_id`` through shm, so the master issues no read
        capabilities for them (their Targets' ``capability`` stays b"")."""
        request = pb.GetReplicasRequest(keys=keys, client_host_id=client_host_id,
                                        lease_ttl_ms=_ms(lease_ttl_s), shm_reads=shm_reads)
        reply = self.call(_M["GetReplicas"], request, deadline)
        return messages.replica_sets(reply, keys), reply.lease_id

    def release_leases(self, lease_ids: Sequence[int], *, deadline: Deadline | None = None,
                       ) -> int:
        """End the read leases of these GetReplicas calls (this reader is done); returns how
        many were still held. Unknown or expired ids are ignored. Idempotent."""
        reply = self.call(_M["ReleaseLeases"], pb.ReleaseLeasesRequest(lease_ids=lease_ids),
                          deadline)
        return reply.num_released

    def renew_leases(self, keys: Sequence[str], lease_ttl_s: float | None = None, *,
                     deadline: Deadline | None = None) -> list[KVStoreError | None]:
        """Lengthen the read leases of ``keys``. Per key: None or KeyNotFoundError."""
        reply = self.call(_M["RenewLease"], pb.RenewLeaseRequest(
            keys=keys, lease_ttl_ms=_ms(lease_ttl_s)), deadline)
        return messages.statuses_to_results(reply, keys, "RenewLease", "renew_lease")

    def exists(self, keys: Sequence[str], *, deadline: Deadline | None = None) -> list[bool]:
        """True per COMPLETE key. No lease. A bad key fails the whole call."""
        reply = self.call(_M["Exists"], pb.ExistsRequest(keys=keys), deadline)
        messages.check_length(reply, "exists", len(keys), "Exists")
        return list(reply.exists)

    def match_prefix(self, keys: Sequence[str], *, deadline: Deadline | None = None) -> int:
        """How many leading keys of the chain ``keys`` exist (COMPLETE). No lease."""
        reply = self.call(_M["MatchPrefix"], pb.MatchPrefixRequest(keys=keys), deadline)
        if reply.num_matched > len(keys):
            raise malformed("MatchPrefix", f"{reply.num_matched} matched of {len(keys)} keys")
        return reply.num_matched

    # ---- remove and pins -------------------------------------------------------------------

    def remove(self, keys: Sequence[str], *, force: bool = False,
               deadline: Deadline | None = None) -> list[bool | KVStoreError]:
        """Per key: True (removed), False (did not exist), or the item's error (leased or
        hard-pinned without ``force``, still being written). Not retried."""
        reply = self.call(_M["Remove"], pb.RemoveRequest(keys=keys, force=force), deadline)
        messages.check_length(reply, "statuses", len(keys), "Remove")
        texts = reply.error_messages
        return [True if status == messages.OK else False if status == messages.NOT_FOUND
                else item_error(status, key, "remove", texts[i] if i < len(texts) else "")
                for i, (key, status) in enumerate(zip(keys, reply.statuses))]

    def remove_prefix(self, prefix: str, *, force: bool = False,
                      deadline: Deadline | None = None) -> tuple[int, int]:
        """Remove every object whose key starts with ``prefix``; (num_removed, num_skipped).
        Raises TransferError naming the nodes when some did not confirm a removal in time
        (the objects are gone from the master; retrying waits for those nodes again)."""
        reply = self.call(_M["RemovePrefix"], pb.RemovePrefixRequest(prefix=prefix, force=force),
                          deadline)
        if reply.unconfirmed_nodes:
            raise TransferError(
                f"remove_prefix {prefix!r}: {reply.num_removed} removed from the master, but "
                f"node(s) {', '.join(reply.unconfirmed_nodes)} did not confirm "
                f"{reply.num_unconfirmed} of the removals in time: a master restarted before "
                "they do would serve them again; retry (it waits for them)")
        return reply.num_removed, reply.num_skipped

    def pin(self, keys: Sequence[str], *, ttl_s: float | None = None, hard: bool = False,
            deadline: Deadline | None = None) -> list[KVStoreError | None]:
        """Pin against eviction: hard, or soft for ``ttl_s``. Per key: None or
        KeyNotFoundError. Idempotent."""
        reply = self.call(_M["Pin"], pb.PinRequest(keys=keys, hard=hard, ttl_ms=_ms(ttl_s)),
                          deadline)
        return messages.statuses_to_results(reply, keys, "Pin", "pin")

    def unpin(self, keys: Sequence[str], *, deadline: Deadline | None = None,
              ) -> list[KVStoreError | None]:
        """Drop every pin. Per key: None or KeyNotFoundError. Idempotent."""
        reply = self.call(_M["Unpin"], pb.UnpinRequest(keys=keys), deadline)
        return messages.statuses_to_results(reply, keys, "Unpin", "unpin")

    # ---- membership (daemons) --------------------------------------------------------------

    def register_node(self, node: NodeSpec, inventory: Inventory, *,
                      deadline: Deadline | None = None,
                      registration_token: str = "") -> Registration:
        """Register ``node`` with the objects it holds (the master adopts what fits).
        ``registration_token``: the same on every attempt of one registration, so a
        retry after a lost reply is answered as the registration it repeats.
        Raises KVStoreError with ``code`` ALREADY_EXISTS if a live node has this id (and
        the registration does not repeat the one that added it)."""
        info = messages.node_info(node)
        info.registration_token = registration_token
        reply = self.call(_M["RegisterNode"], pb.RegisterNodeRequest(
            node=info, inventory=messages.inventory_message(inventory)), deadline)
        return Registration(master_id=reply.master_id,
                            heartbeat_interval_s=reply.heartbeat_interval_ms / 1000.0,
                            node_ttl_s=reply.node_ttl_ms / 1000.0,
                            num_objects_adopted=reply.num_objects_adopted,
                            capability_secret=reply.capability_secret,
                            read_capabilities=reply.read_capabilities,
                            location_lease_s=reply.location_lease_ms / 1000.0)

    def heartbeat(self, node_id: str, acked_seq: int, *, moves_done: Sequence[int] = (),
                  moves_failed: Sequence[int] = (), deadline: Deadline | None = None,
                  ) -> HeartbeatChanges | None:
        """Report ``node_id`` alive, acknowledging change ``acked_seq`` and the tier moves
        copied (``moves_done``) or not (``moves_failed``) since the last beat; the changes
        after it (with the next moves), or None if the master does not know the node (it
        must register again)."""
        reply = self.call(_M["Heartbeat"], pb.HeartbeatRequest(
            node_id=node_id, acked_seq=acked_seq, moves_done=moves_done,
            moves_failed=moves_failed), deadline)
        return messages.heartbeat_changes(reply) if reply.known else None

    def unregister_node(self, node_id: str, *, deadline: Deadline | None = None) -> int:
        """Drop ``node_id``; returns how many objects lost their last replica. Raises
        KeyNotFoundError for an unknown node."""
        reply = self.call(_M["UnregisterNode"], pb.UnregisterNodeRequest(node_id=node_id),
                          deadline)
        return reply.num_objects_dropped

    # ---- observability ---------------------------------------------------------------------

    def stats(self, *, deadline: Deadline | None = None) -> MasterStats:
        return messages.master_stats(self.call(_M["Stats"], pb.StatsRequest(), deadline))

    def list_nodes(self, *, deadline: Deadline | None = None) -> list[NodeStatus]:
        return messages.node_statuses(self.call(_M["ListNodes"], pb.ListNodesRequest(),
                                                deadline))

    def get_home_nodes(self, *, deadline: Deadline | None = None) -> HomeNodes:
        """The live nodes keys' home nodes are hashed over (``kvstore.home``), with this
        caller's keyed-read capabilities and key prefix (docs/ARCHITECTURE.md, Home reads)."""
        reply = self.call(_M["GetHomeNodes"], pb.GetHomeNodesRequest(), deadline)
        return HomeNodes([HomeNode(n.node_id, n.host_id, n.data_addr, n.keyed_read_capability)
                          for n in reply.nodes], reply.key_prefix, reply.expiry_ms,
                         reply.membership)

    def touch_keys(self, keys: Sequence[str], *, deadline: Deadline | None = None) -> int:
        """Tell the master that home reads served ``keys`` (hits, recency, promotion; no
        lease); the number it found."""
        return self.call(_M["TouchKeys"], pb.TouchKeysRequest(keys=keys), deadline).num_found

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the carrier's connections. Idempotent."""
        self.carrier.close()

    def __enter__(self) -> "MasterClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Call:
    """One call in flight under the policy: ``result()`` resends a retryable method once if
    its connection broke and the deadline allows."""

    __slots__ = ("_client", "_method", "_request", "_deadline", "_pending")

    def __init__(self, client: MasterClient, method: Method, request: Any, deadline: Deadline):
        self._client, self._method, self._request = client, method, request
        self._deadline = deadline
        self._pending = self._send()

    def _send(self):
        if self._deadline.expired():
            raise MasterUnavailableError(f"master {self._method.name}: DEADLINE_EXCEEDED: "
                                         "the call's deadline passed before it was sent")
        return self._client.carrier.start(self._method, self._request,
                                          self._deadline.timeout_s(self._client.rpc_timeout_s))

    def result(self) -> Any:
        # NOTE: a carrier that follows a cluster's leader (``kvstore.ha.carrier``) resends
        # until the deadline: a failover takes seconds, and the new leader is another master.
        failover = getattr(self._client.carrier, "failover", False)
        resends_left = (RETRYABLE_ATTEMPTS - 1) if self._method.retryable else 0
        while True:
            try:
                return self._pending.result()
            except NotServingError:
                # the master did not run it: safe to send again, whatever the method
                if self._deadline.expired() or not (failover or resends_left):
                    raise
                resends_left = max(resends_left - 1, 0)
            except ConnectionLostError:
                if self._deadline.expired() or not (resends_left or
                                                    (failover and self._method.retryable)):
                    raise
                resends_left = max(resends_left - 1, 0)
            if failover:
                time.sleep(min(RETRY_PAUSE_S, max(self._deadline.timeout_s(RETRY_PAUSE_S), 0)))
            self._pending = self._send_retry()

    def _send_retry(self):
        try:
            return self._send()
        except ConnectionLostError as exc:   # the next master is not there yet
            return _Failed(exc)


class _Failed:
    """A resend that failed before it was sent: ``result()`` raises its error, so the
    policy's loop decides again."""

    __slots__ = ("_error",)

    def __init__(self, error: KVStoreError):
        self._error = error

    def result(self) -> Any:
        raise self._error


class _Result:
    """A call whose reply ``decode`` turns into the verb's result."""

    __slots__ = ("_call", "_decode")

    def __init__(self, call: _Call, decode):
        self._call, self._decode = call, decode

    def result(self) -> Any:
        return self._decode(self._call.result())
