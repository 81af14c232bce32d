"""The daemon's link to its master: register, heartbeat, register again when forgotten.

Trigger and rule: ``register`` runs once at start (before the daemon reports that it is
listening) and again whenever a heartbeat reply says ``known=false`` (the master restarted
or dropped this node past its TTL); each registration sends the local object table as the
inventory, so the master adopts every object this node still holds. Heartbeats run every
``heartbeat_interval_ms`` the master returned at registration and apply the change sets they
carry to the local ``ObjectTable``; the first beat of each registration comes right after it
(at start on the caller's thread, in ``start_heartbeats``), so the location lease
(``LocationReads``) starts then, not an interval later. Tier moves a reply orders are handed to a
``moves.MoveRunner`` (copied off this thread); the ids it finished go in the next heartbeat,
which comes early, as soon as a batch is done, so the master can switch the objects and free
their source ranges without waiting a whole interval.

Error handling: an unreachable master is retried with capped exponential backoff
(``RETRY_MIN_S`` .. ``RETRY_MAX_S``) and logged, never fatal; a heartbeat that fails is
logged and retried at the next beat. Every attempt of one registration carries the same
token, so an attempt whose reply was lost but which the master applied is answered again
as the same registration (same secret, the objects placed since kept); a registration
still refused as ALREADY_EXISTS (a master that predates tokens, or an entry of another
registration) unregisters that stale entry and registers again with the inventory.

Time is injected (``clock``, ``wait``), so a test can drive the loop without sleeping.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Callable

import grpc

from kvstore._deadline import Deadline
from kvstore._errors import KVStoreError, MasterUnavailableError
from kvstore.daemon.moves import MoveRunner
from kvstore.daemon.location_reads import LocationReads
from kvstore.daemon.objects import ObjectTable
from kvstore.daemon.write_guard import WriteGuard
from kvstore.rpc import MasterClient, NodeSpec, Registration

log = logging.getLogger("kvstore.daemon.master_link")

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
#: Heartbeat interval while tier moves flow: the master orders the next moves in its
#: replies (or queues them for the next beat when a put presses a tier), so beating sooner
#: keeps demotion going.
MOVING_BEAT_S = 0.02
#: Moves "flow" until this long after the last beat that acknowledged or received some.
#: NOTE: not just "the last beat": the beat right after an acknowledgement usually finds no
#: new moves yet (the tier was just relieved), and waiting a whole heartbeat interval from
#: there stalled demotion for up to 1 s while puts kept filling the tier.
MOVING_GRACE_S = 1.0


class MasterLink:
    """Keeps one node registered with one master. ``start_heartbeats`` runs a thread."""

    def __init__(self, client: MasterClient, node: NodeSpec, table: ObjectTable, *,
                 clock: Callable[[], float] = time.monotonic,
                 stop_event: threading.Event | None = None, segments=None,
                 guard: WriteGuard | None = None,
                 location_reads: LocationReads | None = None):
        self._client = client
        self._node = node
        self._table = table
        self._clock = clock
        # NOTE: shared with the owner, so a signal can end a registration still retrying
        self._stop = stop_event or threading.Event()
        self._wake = threading.Event()     # an early heartbeat (a move batch finished)
        # segment id -> segment: the tier moves' backends (None: moves are refused)
        self.moves = MoveRunner(segments, self._wake.set, guard) if segments else None
        self._guard = guard      # given each registration's capability secret
        # told each registration's location lease and each heartbeat's changes (None: none)
        self._location_reads = location_reads
        self._thread: threading.Thread | None = None
        self.heartbeat_interval_s = 1.0
        self._moving_until_s = float("-inf")   # clock() until which moves flow
        self.master_id = ""
        self.num_registrations = 0
        self._unregistered = False
        # sent with every attempt of the registration under way; "" once one succeeded
        self._registration_token = ""

    def register(self, *, timeout_s: float | None = None) -> Registration:
        """Register (with the inventory), retrying until it succeeds or ``timeout_s`` passes.

        Raises MasterUnavailableError past ``timeout_s`` (never when it is None) or when
        stopped; AuthenticationError / InvalidArgumentError at once (retrying cannot help).
        """
        deadline_s = None if timeout_s is None else self._clock() + timeout_s
        delay_s = RETRY_MIN_S
        # NOTE: from before the inventory is taken until the sequence is reset, commit pushes
        # are refused (the master retries them), so none is lost to the reset. The commit
        # ring is drained first: its records' capabilities stop verifying with the secret
        # the registration brings, and the inventory must hold every acknowledged put. The
        # drain stays paused across attempts: an attempt whose reply was lost may have been
        # applied, and writers' ring records since then carry that registration's secret,
        # which the retry (same token: answered as the same registration) brings
        if self._table.before_change is not None:
            self._table.before_change()
        self._table.begin_registration()
        try:
            while True:
                try:
                    return self._register_once()
                except MasterUnavailableError as exc:
                    if self._stop.is_set() or (deadline_s is not None and
                                               self._clock() + delay_s > deadline_s):
                        raise
                    log.warning("master %s unavailable (%s); retrying registration in %.1fs",
                                self._client.address, exc, delay_s)
                if self._stop.wait(delay_s):
                    raise MasterUnavailableError("stopped while registering with the master")
                delay_s = min(delay_s * 2, RETRY_MAX_S)
        finally:
            self._table.end_registration()

    def _register_once(self) -> Registration:
        node, inventory = self._node, self._table.to_inventory()
        if not self._registration_token:
            # NOTE: kept until an attempt succeeds, across register() calls too
            self._registration_token = secrets.token_hex(8)
        try:
            reply = self._client.register_node(
                node, inventory, registration_token=self._registration_token)
        except KVStoreError as exc:
            if getattr(exc, "code", None) != grpc.StatusCode.ALREADY_EXISTS:
                raise
            log.warning("master still lists node %s; unregistering the stale entry",
                        node.node_id)
            self._client.unregister_node(node.node_id)
            reply = self._client.register_node(
                node, inventory, registration_token=self._registration_token)
        self._registration_token = ""
        self._table.reset_sequence()
        if self._guard is not None:
            self._guard.set_secret(reply.capability_secret,
                                   check_reads=reply.read_capabilities)
        if self._location_reads is not None:
            self._location_reads.on_registered(reply.location_lease_s)
        self.heartbeat_interval_s = max(reply.heartbeat_interval_s, 0.01)
        self.master_id = reply.master_id
        self.num_registrations += 1
        # NOTE: the first beat of a registration comes at once, not an interval later: it
        # brings the full resync (which inventory items the master refused) and starts the
        # location lease, which the registration's reply alone cannot (see LocationReads)
        self._wake.set()
        log.info("registered node %s with master %s (%s): %d objects adopted, heartbeat %.3fs",
                 node.node_id, self._client.address, reply.master_id,
                 reply.num_objects_adopted, self.heartbeat_interval_s)
        return reply

    def heartbeat_once(self) -> None:
        """One heartbeat: apply its change set, or re-register if the master forgot us.

        Raises KVStoreError (e.g. MasterUnavailableError) when the call fails; the loop logs it.
        """
        done, failed = self.moves.take_results() if self.moves else ([], [])
        sent_at_s = self._clock()   # NOTE: before the send: the lease counts from here
        try:
            changes = self._client.heartbeat(self._node.node_id, self._table.acked_seq,
                                             moves_done=done, moves_failed=failed)
        except BaseException:
            if self.moves:
                self.moves.restore(done, failed)
            raise
        if changes is None:
            log.warning("master %s does not know node %s; re-registering with %d objects",
                        self._client.address, self._node.node_id, len(self._table))
            self.register(timeout_s=self.heartbeat_interval_s * 10)
            return
        self._table.apply(changes)
        if self._location_reads is not None:
            self._location_reads.on_heartbeat(sent_at_s, changes)
        if done or failed or changes.moves:
            self._moving_until_s = self._clock() + MOVING_GRACE_S
        if changes.moves and self.moves is not None:
            self.moves.submit(changes.moves)   # without segments: the master times them out

    def next_beat_wait_s(self) -> float:
        """How long the loop waits before the next beat (unless woken): MOVING_BEAT_S while
        moves flow (within MOVING_GRACE_S of the last beat that carried some), else the
        master's heartbeat interval."""
        if self._clock() < self._moving_until_s:
            return min(self.heartbeat_interval_s, MOVING_BEAT_S)
        return self.heartbeat_interval_s

    def wake(self) -> None:
        """Heartbeat now (the cluster's leader changed: the new one waits for this node)."""
        self._wake.set()

    def start_heartbeats(self) -> None:
        """Beat once on this thread (so a daemon that just registered holds its location
        lease when this returns, unless that beat failed: logged, the loop retries), then
        run the heartbeat thread. Never raises for a failed beat."""
        self._wake.clear()
        num_failures = self._beat(0)
        self._thread = threading.Thread(target=self._heartbeat_loop, args=(num_failures,),
                                        daemon=True, name="kvstore-daemon-heartbeat")
        self._thread.start()

    def _heartbeat_loop(self, num_failures: int) -> None:
        while True:
            self._wake.wait(self.next_beat_wait_s())
            if self._stop.is_set():
                break
            self._wake.clear()
            num_failures = self._beat(num_failures)

    def _beat(self, num_failures: int) -> int:
        """One ``heartbeat_once``, its failure logged; return the failures in a row."""
        try:
            self.heartbeat_once()
            if num_failures:
                log.info("master %s reachable again", self._client.address)
            return 0
        except KVStoreError as exc:
            num_failures += 1
            # NOTE: log the first failure and then every 10th, not one line per beat
            if num_failures == 1 or num_failures % 10 == 0:
                log.warning("heartbeat to master %s failed (%d in a row): %s",
                            self._client.address, num_failures, exc)
        except Exception:  # noqa: BLE001 - the heartbeat thread must never die
            num_failures += 1
            log.exception("heartbeat failed unexpectedly")
        return num_failures

    def stop(self, *, unregister: bool = True) -> None:
        """Stop heartbeating and (by default) unregister. Idempotent; never raises."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.moves is not None:
            self.moves.stop()
        if unregister and self.num_registrations and not self._unregistered:
            self._unregistered = True
            try:
                self._client.unregister_node(self._node.node_id, deadline=Deadline.after(2.0))
            except KVStoreError as exc:
                log.warning("could not unregister node %s: %s", self._node.node_id, exc)
