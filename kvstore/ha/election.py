"""``Election``: one master's thread that campaigns for, holds and gives up the leadership
of its cluster in etcd (keys: ``cluster``; the fence it drives: ``leadership``).

Trigger and rule:
- Start: grant a lease of ``lease_ttl_s`` (default 3 s) and publish ``members/ID``
  with it (so ``kvstore status`` lists this master as a standby).
- Campaign: create the ``leader`` key with the lease in one transaction, only if absent.
  Won: the epoch is the revision of that write; ``Leadership.elect`` (taking over, waiting
  for the daemons listed in ``nodes``). Lost: follow the leader key through etcd's watch
  stream (``watch.KeyWatch``, which wakes this thread when the key changes) and campaign
  again when it is gone (the leader's lease expired or it stepped down); a backstop read
  comes with each renewal (every TTL / 6), or every ``POLL_S`` while no stream is open.
- Renew: every TTL / ``RENEWALS_PER_TTL`` (standby or leader). A renewal sent at t moves the
  leader's trust to t + TTL x ``LEASE_SAFETY``. etcd answering TTL 0 (the lease is gone: this
  process was paused, or etcd lost it) or no answer until that trust ends: ``depose`` and
  call ``on_deposed`` (the master process exits with status 75; its supervisor restarts it
  as a fresh standby, so a deposed master never serves from its stale tables).
- While leading, the daemons' node ids are written to ``nodes`` when they change: by this
  thread's loop, and by ``publish_nodes`` before a RegisterNode is answered (so a daemon
  that holds acknowledged objects is always listed, and a new leader waits for it).

etcd unreachable at start: retried every ``POLL_S``, logged once per outage; the master
serves nothing meanwhile (it is a standby).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from kvstore.ha.cluster import POLL_S, ClusterKeys, MasterInfo
from kvstore.ha.etcd import EtcdClient, EtcdUnavailableError
from kvstore.ha.leadership import LEASE_SAFETY, Leadership, Role
from kvstore.ha.watch import KeyWatch

log = logging.getLogger("kvstore.ha")

RENEWALS_PER_TTL = 6


class Election:
    """Campaigns for ``info``'s master in cluster ``keys`` (see the module docstring).

    ``node_ids()`` returns the daemons the master knows (called under the caller's lock by
    the callable itself); ``on_deposed(reason)`` is called once, from this thread.
    """

    def __init__(self, etcd: EtcdClient, keys: ClusterKeys, info: MasterInfo,
                 leadership: Leadership, *, lease_ttl_s: int = 3,
                 node_ids: Callable[[], list[str]] = list,
                 on_deposed: Callable[[str], None] = lambda reason: None,
                 clock=time.monotonic):
        self.etcd, self.keys, self.info = etcd, keys, info
        self.leadership = leadership
        self.lease_ttl_s = lease_ttl_s
        self._node_ids, self._on_deposed = node_ids, on_deposed
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()      # stop, or the leader key changed (the watch)
        self._leader_watch: KeyWatch | None = None
        self._lease_id = 0
        self._granted_ttl_s = lease_ttl_s
        self._last_renewal_s = 0.0       # when the last renewal (or the grant) was sent
        self._published_nodes: list[str] | None = None
        self._publish_lock = threading.Lock()   # the loop and RegisterNode both publish
        self._thread = threading.Thread(target=self._run, name="kvstore-election", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning and give the lease back (the leader key goes at once, so a
        standby takes over without waiting for the TTL). Never raises."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._lease_id:
            try:
                self.etcd.revoke(self._lease_id)
            except EtcdUnavailableError as exc:
                log.warning("could not revoke lease: %s", exc)

    # ---- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if not self._join():
                return
            self._leader_watch = KeyWatch(self.etcd.url, self.keys.leader, self._wake.set,
                                          name="kvstore-election-watch").start()
            renew_every_s = self._granted_ttl_s / RENEWALS_PER_TTL
            next_renewal_s = self._clock() + renew_every_s
            while not self._stop.is_set():
                if self.leadership.role is Role.STANDBY:
                    self._campaign()
                elif self.leadership.role is not Role.DEPOSED:
                    self.publish_nodes()
                if self._clock() >= next_renewal_s:
                    next_renewal_s = self._clock() + renew_every_s
                    self._renew()
                if self.leadership.role is Role.DEPOSED:
                    self._on_deposed(self.leadership.deposed_reason)
                    return
                self._wake.wait(self._pause_s(next_renewal_s))
                self._wake.clear()
        except Exception:  # noqa: BLE001 - a bug here must depose, never leave a zombie leader
            log.exception("election thread failed")
            self.leadership.depose("election thread failed (see the log)")
            self._on_deposed(self.leadership.deposed_reason)
        finally:
            if self._leader_watch is not None:
                self._leader_watch.close()

    def _pause_s(self, next_renewal_s: float) -> float:
        """How long the loop sleeps unless woken: a leader publishes the node list every
        ``POLL_S``; a standby with an open watch stream waits for it (or the next renewal),
        without one it reads the leader key every ``POLL_S``."""
        watch = self._leader_watch
        if self.leadership.role is not Role.STANDBY or watch is None or not watch.healthy:
            return POLL_S
        return max(next_renewal_s - self._clock(), 0.0)

    def _join(self) -> bool:
        """Grant the lease and publish the member key, retrying while etcd is down."""
        logged = False
        while not self._stop.is_set():
            try:
                sent_s = self._clock()
                self._lease_id, self._granted_ttl_s = self.etcd.grant(self.lease_ttl_s)
                self._last_renewal_s = sent_s
                self.etcd.put(self.keys.member(self.info.master_id), self.info.to_json(),
                              lease_id=self._lease_id)
                log.info("master %s joined cluster %s in etcd at %s (lease TTL %ds)",
                         self.info.master_id, self.keys.cluster, self.etcd.url,
                         self._granted_ttl_s)
                return True
            except EtcdUnavailableError as exc:
                if not logged:
                    log.warning("cannot join cluster %s: %s; retrying", self.keys.cluster, exc)
                    logged = True
            self._stop.wait(POLL_S)
        return False

    def _campaign(self) -> None:
        try:
            if self.etcd.get(self.keys.leader) is not None:
                return
            # NOTE: renew first: after an etcd outage the last renewal is old, and a leader
            # trusts its lease only from the last renewal it sent
            self._renew()
            if self._clock() - self._last_renewal_s > self._trust_s() / 2:
                return
            created, revision = self.etcd.create(self.keys.leader, self.info.to_json(),
                                                 lease_id=self._lease_id)
            if not created:
                return
            expected = self._read_nodes()
        except EtcdUnavailableError as exc:
            log.warning("campaign in cluster %s failed: %s", self.keys.cluster, exc)
            return
        # NOTE: the lease was renewed at most one renewal period before this write, so it
        # lives at least TTL - period from now; trust it only from the last renewal.
        self.leadership.elect(revision, self._last_renewal_s + self._trust_s(), expected)

    def _renew(self) -> None:
        sent_s = self._clock()
        try:
            ttl_s = self.etcd.keepalive(self._lease_id)
        except EtcdUnavailableError as exc:
            if self.leadership.role is not Role.STANDBY:
                log.warning("lease renewal failed (leader trusts its lease %.1fs more): %s",
                            self.leadership.lease_valid_until_s - self._clock(), exc)
                if not self.leadership.serving():
                    self.leadership.depose("lease not renewed within its TTL: etcd "
                                           f"unreachable ({exc})")
            return
        if ttl_s <= 0 and self.leadership.role is Role.STANDBY:
            log.warning("lease %x of standby %s expired; joining again", self._lease_id,
                        self.info.master_id)
            self._join()
            return
        if ttl_s <= 0:
            self.leadership.depose(f"etcd no longer has lease {self._lease_id:x}: it expired "
                                   "(this process was paused or etcd was unreachable)")
            return
        self._last_renewal_s = sent_s
        self.leadership.renewed(sent_s + self._trust_s())

    def _trust_s(self) -> float:
        return self._granted_ttl_s * LEASE_SAFETY

    def _read_nodes(self) -> list[str]:
        kv = self.etcd.get(self.keys.nodes)
        if kv is None:
            return []
        try:
            return [str(node_id) for node_id in json.loads(kv.value)]
        except (ValueError, TypeError):
            log.warning("ignoring a malformed %s", self.keys.nodes.decode())
            return []

    def publish_nodes(self) -> None:
        """Write the node ids the master knows to ``nodes`` if they changed (leader only).
        Never raises: etcd unreachable is logged (the lease then runs out and this master
        steps down)."""
        with self._publish_lock:
            node_ids = sorted(self._node_ids())
            if self.leadership.role is not Role.LEADING or node_ids == self._published_nodes:
                return
            try:
                self.etcd.put(self.keys.nodes, json.dumps(node_ids).encode())
                self._published_nodes = node_ids
            except EtcdUnavailableError as exc:
                log.warning("could not publish the node list: %s", exc)
