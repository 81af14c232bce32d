"""``FailoverCarrier``: a ``kvstore.rpc`` carrier that follows a cluster's leader.

Below ``MasterClient`` like the other carriers; above a real carrier (gRPC or the fast path)
to the master it currently trusts, which it replaces when that master fails or is replaced.

Rules:
- Which master: ``etcd://`` specs read the leader key (``cluster.wait_for_leader``); plain
  lists take the addresses in turn, moving on after a failure.
- Fencing: every request carries the highest epoch this carrier has seen; a reply with an
  older epoch comes from a deposed leader and is dropped (``ConnectionLostError``: the call
  policy sends it again, to the leader etcd names now). So a paused-then-resumed master can
  never change a daemon's table or answer a client.
- Following: after a failure (``ConnectionLostError``, or any error of a carrier that was
  replaced meanwhile) the next call looks the leader up again. With ``watch_s`` (daemons
  and clients), a thread follows the leader key through etcd's watch stream
  (``watch.KeyWatch``) and reads it as soon as it changes (a backstop read every
  ``WATCHED_POLL_S`` while the stream is open, every ``watch_s`` while it is not), switching
  when a newer leader is there and calling the ``on_change`` callbacks (the daemon
  heartbeats at once, so a new leader hears from it within milliseconds of its election).
- ``resends``: the call policy keeps sending a retryable call (any call refused with
  ``NotServingError``) until its deadline, pausing ``RETRY_PAUSE_S`` between tries.

Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from kvstore._errors import ClosedError, KVStoreError, MasterUnavailableError
from kvstore.ha.cluster import ClusterKeys, MasterInfo, MasterSpec, read_leader, wait_for_leader
from kvstore.ha.etcd import EtcdClient, EtcdUnavailableError
from kvstore.ha.watch import KeyWatch
from kvstore.rpc.carrier import Carrier
from kvstore.rpc.errors import ConnectionLostError
from kvstore.rpc.methods import Method

log = logging.getLogger("kvstore.ha")

#: Pause between two tries of one call while the cluster has no serving leader.
RETRY_PAUSE_S = 0.1
#: Backstop read of the leader key while the watch stream is open (it wakes the reader).
WATCHED_POLL_S = 2.0


class FailoverCarrier(Carrier):
    """See the module docstring. ``connect(info)`` opens a real carrier to one master."""

    failover = True

    def __init__(self, spec: MasterSpec, connect: Callable[[MasterInfo], Carrier], *,
                 watch_s: float | None = None, etcd_timeout_s: float = 1.0):
        self.spec = spec
        self._connect = connect
        self._etcd = (EtcdClient(spec.etcd_url, timeout_s=etcd_timeout_s) if spec.is_etcd
                      else None)
        self._keys = ClusterKeys(spec.cluster) if spec.is_etcd else None
        self._lock = threading.Lock()
        self._inner: Carrier | None = None
        self._info: MasterInfo | None = None
        self._next_address = 0
        self.epoch = 0                      # the highest epoch seen in a reply
        self._on_change: list[Callable[[], None]] = []
        self._closed = threading.Event()
        self._leader_moved = threading.Event()    # set by the watch stream (and close)
        self.name = "grpc"
        self._watcher = None
        if watch_s is not None and self._etcd is not None:
            self._watcher = threading.Thread(target=self._watch, args=(watch_s,), daemon=True,
                                             name="kvstore-leader-watch")
            self._watcher.start()

    @property
    def address(self) -> str:
        info = self._info
        return info.grpc_address if info is not None else self.spec.describe()

    def position(self) -> tuple[int, int]:
        """Where calls go now: (epoch seen, address turn); see ``moved_since``."""
        return self.epoch, self._next_address

    def moved_since(self, position: tuple[int, int], deadline) -> bool:
        """True once calls go to another master than at ``position``: a leader of a newer
        epoch is in etcd (looked for until ``deadline``), or a plain list moved on. Used to
        decide that an interrupted put may be sent again whole."""
        epoch, turn = position
        if self._etcd is None:
            return self._next_address != turn
        try:
            leader = wait_for_leader(self._etcd, self._keys, min_epoch=epoch + 1,
                                     timeout_s=deadline.timeout_s())
        except KVStoreError:
            return False
        return leader.epoch > epoch

    def on_change(self, callback: Callable[[], None]) -> None:
        self._on_change.append(callback)

    # ---- calls -----------------------------------------------------------------------------

    def start(self, method: Method, request: Any, timeout_s: float):
        inner, info = self._current(timeout_s)
        if self.epoch:
            request.epoch = self.epoch
        try:
            pending = inner.start(method, request, timeout_s)
        except KVStoreError as exc:
            raise self._failed(info, exc) from exc
        return _FencedReply(self, pending, info)

    def _current(self, timeout_s: float) -> tuple[Carrier, MasterInfo]:
        with self._lock:
            if self._closed.is_set():
                raise ClosedError("the master client is closed")
            if self._inner is not None:
                return self._inner, self._info
            info = self._locate(timeout_s)
            inner = self._connect(info)
            self._inner, self._info, self.name = inner, info, inner.name
            return inner, info

    def _locate(self, timeout_s: float) -> MasterInfo:
        if self._etcd is None:
            address = self.spec.addresses[self._next_address % len(self.spec.addresses)]
            return MasterInfo("", address, None, 0)
        return wait_for_leader(self._etcd, self._keys, min_epoch=self.epoch,
                               timeout_s=max(timeout_s, 0.0))

    def _failed(self, info: MasterInfo, exc: KVStoreError) -> KVStoreError:
        """Forget ``info``'s master after ``exc``; the error for the call policy."""
        with self._lock:
            replaced = self._info is not info
            # NOTE: a timeout too: a paused (SIGSTOPped) leader answers nothing, and the
            # next try must look the leader up again rather than wait on it once more
            if not replaced and isinstance(exc, MasterUnavailableError):
                self._drop()
                self._next_address += 1
        if replaced and not isinstance(exc, ConnectionLostError):
            lost = ConnectionLostError(f"master {info.grpc_address} was replaced by a new "
                                       f"leader during the call: {exc}")
            return lost
        return exc

    def _checked(self, info: MasterInfo, reply: Any) -> Any:
        epoch = getattr(reply, "epoch", 0)
        if epoch < self.epoch:
            with self._lock:
                if self._info is info:
                    self._drop()
            raise ConnectionLostError(
                f"master {info.grpc_address} answered with epoch {epoch}, older than the "
                f"{self.epoch} already seen: a deposed leader; its answer is ignored")
        if epoch > self.epoch:            # rare (once per leader): the lock keeps it a max
            with self._lock:
                self.epoch = max(self.epoch, epoch)
        return reply

    def _drop(self) -> None:
        if self._inner is not None:
            self._inner.close()
        self._inner = self._info = None

    # ---- following the leader key ----------------------------------------------------------

    def _watch(self, period_s: float) -> None:
        stream = KeyWatch(self.spec.etcd_url, self._keys.leader, self._leader_moved.set,
                          name="kvstore-leader-stream").start()
        try:
            while not self._closed.is_set():
                self._leader_moved.wait(WATCHED_POLL_S if stream.healthy else period_s)
                self._leader_moved.clear()
                if self._closed.is_set():
                    return
                self._follow()
        finally:
            stream.close()

    def _follow(self) -> None:
        """Read the leader key; switch (and call back) when a newer leader is there."""
        try:
            leader = read_leader(self._etcd, self._keys)
        except EtcdUnavailableError:
            return        # keep the current master: it serves until its lease ends
        current = self._info
        if leader is None or leader.epoch <= self.epoch or (
                current is not None and current.epoch == leader.epoch):
            return
        log.info("cluster %s: new leader %s (epoch %d)", self.spec.cluster,
                 leader.grpc_address, leader.epoch)
        with self._lock:
            self._drop()
        for callback in self._on_change:
            callback()

    def close(self) -> None:
        self._closed.set()
        self._leader_moved.set()
        with self._lock:
            self._drop()


class _FencedReply:
    __slots__ = ("_carrier", "_pending", "_info")

    def __init__(self, carrier: FailoverCarrier, pending, info: MasterInfo):
        self._carrier, self._pending, self._info = carrier, pending, info

    def result(self) -> Any:
        try:
            reply = self._pending.result()
        except KVStoreError as exc:
            raise self._carrier._failed(self._info, exc) from exc
        return self._carrier._checked(self._info, reply)
