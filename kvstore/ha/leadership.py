"""``Leadership``: whether a master of an etcd cluster may serve a call now (the fence).

Roles: STANDBY (not elected: every call is refused), TAKING_OVER (elected, rebuilding its
tables: only the daemons' calls are served), LEADING (every call), DEPOSED (the lease was
lost: every call is refused, for good; the process then exits, see ``election``).

Rules, checked by ``check`` under the service lock before every call:
- A leader serves only while its lease is surely alive: until ``lease_valid_until_s``, which
  the election sets to (when the last renewal was *sent*) + TTL x ``LEASE_SAFETY``. etcd
  counts the TTL from when it *received* that renewal, so the master stops before etcd can
  hand the lease's keys to a new leader. Past it the call is refused at once, even if the
  renewal thread has not run (a SIGSTOPped master resumed by SIGCONT refuses its first call).
- A request that carries an epoch newer than ours comes from someone who has seen a newer
  leader: refused (this master is deposed, whatever its lease says).
- Taking over: until every daemon the previous leader listed (``nodes`` key) has registered,
  or ``takeover_wait_s`` passed, only RegisterNode, Heartbeat, UnregisterNode, Stats and
  ListNodes are served, so a get never misses an object whose daemon has not reported yet.

Refusals are ``Rejected(UNAVAILABLE)`` whose text starts with ``NOT_SERVING``: the client
knows the call did not run (``kvstore.rpc.errors.NotServingError``) and may send it again,
PutStart included. Every served reply carries ``epoch``.
"""

from __future__ import annotations

import enum
import logging
import time

import grpc

from kvstore.master.validation import Rejected
from kvstore.rpc.errors import NOT_SERVING

log = logging.getLogger("kvstore.ha")

#: Share of the lease TTL a leader trusts its lease for after sending a renewal (clock-rate
#: drift between this host and etcd's is far below 10%).
LEASE_SAFETY = 0.9
#: The calls a master taking over serves: the daemons' (they rebuild its tables) and reads
#: of its own state.
TAKEOVER_CALLS = frozenset({"RegisterNode", "Heartbeat", "UnregisterNode", "Stats",
                            "ListNodes"})


class Role(enum.Enum):
    STANDBY = "standby"
    TAKING_OVER = "taking over"
    LEADING = "leading"
    DEPOSED = "deposed"


class Leadership:
    """The role of one master: changed by the election thread (each change a few attribute
    writes, ordered so that a call checked meanwhile sees a consistent state), read by
    every call under the service lock (which also moves TAKING_OVER to LEADING)."""

    def __init__(self, cluster: str, *, takeover_wait_s: float, clock=time.monotonic):
        self.cluster = cluster
        self.takeover_wait_s = takeover_wait_s
        self.clock = clock
        self.role = Role.STANDBY
        self.epoch = 0
        self.lease_valid_until_s = 0.0
        self.deposed_reason = ""
        self._takeover_until_s = 0.0
        self._expected_nodes: frozenset[str] = frozenset()

    # ---- changes (election thread) ---------------------------------------------------------

    def elect(self, epoch: int, lease_valid_until_s: float, expected_nodes) -> None:
        # NOTE: the role last: a call checked meanwhile (under the service lock, while this
        # runs on the election thread) sees a standby, or a leader with its lease and epoch
        self.epoch = epoch
        self.lease_valid_until_s = lease_valid_until_s
        self._expected_nodes = frozenset(expected_nodes)
        self._takeover_until_s = self.clock() + self.takeover_wait_s
        self.role = Role.TAKING_OVER
        log.info("elected leader of cluster %s, epoch %d: taking over, waiting up to %.1fs "
                 "for %d daemons", self.cluster, epoch, self.takeover_wait_s,
                 len(self._expected_nodes))

    def renewed(self, lease_valid_until_s: float) -> None:
        self.lease_valid_until_s = max(self.lease_valid_until_s, lease_valid_until_s)

    def depose(self, reason: str) -> None:
        if self.role is not Role.DEPOSED:
            log.error("stepping down as leader of cluster %s (epoch %d): %s", self.cluster,
                      self.epoch, reason)
        self.role, self.deposed_reason = Role.DEPOSED, reason

    # ---- the fence (every call) ------------------------------------------------------------

    def serving(self, now_s: float | None = None) -> bool:
        """True while this master is the leader with a live lease."""
        now_s = self.clock() if now_s is None else now_s
        return (self.role in (Role.TAKING_OVER, Role.LEADING)
                and now_s < self.lease_valid_until_s)

    def check(self, name: str, request_epoch: int, node_ids) -> None:
        """Raise Rejected(UNAVAILABLE, "NOT_SERVING ...") unless call ``name`` may run now
        (see the module docstring); ``node_ids`` are the daemons registered so far."""
        role = self.role
        if role is Role.LEADING or role is Role.TAKING_OVER:
            now_s = self.clock()
            if now_s >= self.lease_valid_until_s:
                self.depose("lease not renewed within its TTL (etcd unreachable, or this "
                            "process was paused)")
                role = self.role
            elif request_epoch > self.epoch:
                self.depose(f"a caller has seen epoch {request_epoch}, newer than ours")
                role = self.role
        if role is Role.LEADING:
            return
        if role is Role.TAKING_OVER:
            if self._expected_nodes <= set(node_ids) or self.clock() >= self._takeover_until_s:
                missing = self._expected_nodes - set(node_ids)
                log.info("took over cluster %s (epoch %d)%s", self.cluster, self.epoch,
                         f"; {len(missing)} daemons never came back" if missing else "")
                self.role = Role.LEADING
                return
            if name in TAKEOVER_CALLS:
                return
            raise Rejected(grpc.StatusCode.UNAVAILABLE, (
                f"{NOT_SERVING}: leader of cluster {self.cluster} (epoch {self.epoch}) is "
                f"taking over: {len(self._expected_nodes & set(node_ids))} of "
                f"{len(self._expected_nodes)} daemons have reported"))
        if role is Role.DEPOSED:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, (
                f"{NOT_SERVING}: this master stepped down as leader of cluster {self.cluster} "
                f"(epoch {self.epoch}): {self.deposed_reason}"))
        raise Rejected(grpc.StatusCode.UNAVAILABLE, (
            f"{NOT_SERVING}: this master is a standby of cluster {self.cluster}, not its "
            "leader"))
