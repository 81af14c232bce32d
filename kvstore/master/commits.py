"""Durable commit: pushing each node's logged changes to its daemon, and waiting for them.

Guarantee: ``wait`` returns only once every node it is given has confirmed (``durable_seq``)
that its daemon's object table holds the changes up to the sequence named, or once the
deadline passed (then it names the nodes that did not confirm). The daemon confirms after
its table applied the change set and every backend touched synced (an SSD object is in its
on-disk index), so a put answered after ``wait`` survives a master crash (the daemon's
inventory brings it back) and a removal or eviction is never resurrected by one.

Mechanism: the master opens one data-plane connection per node (``transport.data_frames``
hello with the cluster token) and sends COMMIT frames whose body is a ``HeartbeatResponse``
with the node's changes after ``durable_seq`` (``Node.changes_after``, the heartbeat's own
change-set code); the reply's ``length`` is the sequence the daemon's table now holds.
Batching: at most one push per node is in flight; the caller that finds a node idle sends
the push itself (no thread hand-off on an idle master) and every caller that arrives while
it is in flight waits for it, then one of them sends everything logged meanwhile in one
frame: one message per daemon per batch, however many PutEnds run at once. Changes nobody
waits for (evictions in a sweep, tier-move switches, removals a node missed) are pushed in
the background (``kick``): one task per node in a pool of ``MAX_BACKGROUND_PUSHES``
threads, so a stalled node (up to ``BACKGROUND_TIMEOUT_S`` per try) never holds back the
others' pushes. A removal waiting on several nodes (``wait(parallel=True)``: Remove,
RemovePrefix) connects to and waits on each from its own thread, so one slow node does not
delay the confirmations of the others; PutEnd keeps pushing from its own thread (all frames
sent, then all replies read: no hand-off on the put path).

Error handling: a connection that fails (refused, reset, wrong token, a timeout) is closed
and retried after ``RETRY_S`` until the caller's deadline; a node dropped from the state
fails at once. Heartbeats acknowledge the same sequence, so a daemon that cannot take
pushes (an older version) still confirms within one heartbeat interval. Never raises to
its callers.

Threading: a ``Condition`` guards the channels' busy flags and the background set; pushes
run outside it and take the service lock only to read the log (never the other way round).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait as _wait_all

from kvstore import capability
from kvstore._tls import TLSConfig, wrap_client
from kvstore.master import replies
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status

log = logging.getLogger("kvstore.master.commits")

#: Pause before a failed node's connection is tried again (seconds).
RETRY_S = 0.05
#: Longest a waiter sleeps before looking again (a heartbeat may have confirmed meanwhile).
POLL_S = 0.05
#: How long the background pusher gives changes that nobody waits for (one try).
BACKGROUND_TIMEOUT_S = 5.0
#: Threads pushing in the background (one node each at a time) and fanning out removals.
MAX_BACKGROUND_PUSHES = 16


class _Channel:
    """One node's connection and whether a push on it is in flight."""

    __slots__ = ("node", "sock", "busy", "retry_at_s", "request_id", "warned")

    def __init__(self, node) -> None:
        self.node = node
        self.sock: socket.socket | None = None
        self.busy = False
        self.retry_at_s = 0.0
        self.request_id = 0
        self.warned = False

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class CommitPusher:
    """Pushes committed changes of ``state``'s nodes to their daemons (see the module)."""

    def __init__(self, state, lock: threading.Lock, *, token: str | None,
                 tls: TLSConfig | None = None, clock=time.monotonic):
        self._state = state
        self._lock = lock           # the service lock: the state is read only under it
        self._token = token
        self._tls = tls             # None: plain text; else the data planes serve TLS
        self._tls_context = tls.client_context() if tls is not None else None
        self._clock = clock
        self._cond = threading.Condition()
        self._channels: dict[object, _Channel] = {}
        self._kicked: dict[object, int] = {}        # node -> sequence to push in background
        self._in_background: set = set()            # nodes with a background task
        self._stopped = False
        self._background = ThreadPoolExecutor(MAX_BACKGROUND_PUSHES,
                                              thread_name_prefix="kvstore-master-commits")
        self._fanout = ThreadPoolExecutor(MAX_BACKGROUND_PUSHES,
                                          thread_name_prefix="kvstore-master-fanout")

    # -- waiting ----------------------------------------------------------------------------

    def wait(self, needs: dict, timeout_s: float, *, parallel: bool = False) -> list:
        """Push until each node in ``needs`` (node -> sequence) confirmed that sequence, for
        at most ``timeout_s``; return the nodes that did not (empty: all durable). With
        ``parallel``, several nodes are pushed to from one thread each."""
        deadline_s = self._clock() + timeout_s
        pending = {n: s for n, s in needs.items() if n.durable_seq < s}
        while pending:
            if self._stopped:
                return list(pending)
            nodes = self._state.nodes
            failed = [n for n in pending if nodes.get(n.node_id) is not n]
            for node in failed:             # dropped or replaced: it will never confirm
                del pending[node]
            now_s = self._clock()
            if now_s >= deadline_s:
                return failed + list(pending)
            mine = []
            with self._cond:
                for node in pending:
                    channel = self._channels.get(node)
                    if channel is None:
                        channel = self._channels[node] = _Channel(node)
                    if not channel.busy and channel.retry_at_s <= now_s:
                        channel.busy = True
                        mine.append(channel)
                if not mine:
                    self._cond.wait(min(POLL_S, deadline_s - now_s))
            if mine and parallel and len(mine) > 1:
                self._push_each(mine, deadline_s)
            elif mine:
                self._push(mine, deadline_s)
            if failed:
                return failed + [n for n, s in pending.items() if n.durable_seq < s]
            pending = {n: s for n, s in pending.items() if n.durable_seq < s}
        return []

    def _push_each(self, channels: list[_Channel], deadline_s: float) -> None:
        """``_push`` on each channel from its own thread (the first from this one)."""
        others, here = [], channels[:1]
        for channel in channels[1:]:
            try:
                others.append(self._fanout.submit(self._push, [channel], deadline_s))
            except RuntimeError:          # stopping: the pool takes no more work
                here.append(channel)
        self._push(here, deadline_s)
        _wait_all(others)

    def kick(self, nodes) -> None:
        """Push these nodes' new changes in the background (nobody waits for them): one
        task per node, which pushes again while new changes are kicked meanwhile."""
        with self._cond:
            if self._stopped:
                return
            for node in nodes:
                self._kicked[node] = node.seq
                if node not in self._in_background:
                    self._in_background.add(node)
                    self._background.submit(self._push_in_background, node)

    def _push_in_background(self, node) -> None:
        while True:
            with self._cond:
                seq = self._kicked.pop(node, None)
                if seq is None or self._stopped:
                    self._in_background.discard(node)
                    return
            try:
                self.wait({node: seq}, BACKGROUND_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - one node's failure must not end the others'
                log.exception("background commit push to node %s failed", node.node_id)

    def forget(self) -> None:
        """Close the channels of nodes no longer registered (called after a membership
        change, under no lock)."""
        nodes = self._state.nodes
        with self._cond:
            gone = [n for n, c in self._channels.items()
                    if nodes.get(n.node_id) is not n and not c.busy]
            for node in gone:
                self._channels.pop(node).close()

    def stop(self) -> None:
        """Stop pushing: pushes in flight end at once (their sockets are shut down)."""
        with self._cond:
            self._stopped = True
            self._kicked.clear()
            for channel in self._channels.values():
                if channel.sock is not None:
                    try:       # NOTE: wakes a thread blocked on it; close() would not
                        channel.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        self._background.shutdown(wait=True, cancel_futures=True)
        self._fanout.shutdown(wait=True, cancel_futures=True)
        with self._cond:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    # -- pushing ----------------------------------------------------------------------------

    def _push(self, channels: list[_Channel], deadline_s: float) -> None:
        """One push on each channel (all sent, then all replies read); clears ``busy``."""
        try:
            frames = []
            with self._lock:
                state = self._state
                for channel in channels:
                    node = channel.node
                    if node.durable_seq >= node.seq or state.nodes.get(node.node_id) is not node:
                        frames.append(None)
                        continue
                    base_seq = node.durable_seq
                    changes = node.changes_after(base_seq, state.objects,
                                                 state.config.max_changes_per_heartbeat)
                    body = replies.heartbeat(state.master_id, (*changes, (), ()),
                                             base_seq).SerializeToString()
                    secret = node.capability_secret
                    if secret:       # NOTE: the daemon then accepts only signed pushes
                        body += capability.commit_mac(secret, node.node_id, base_seq, body)
                    frames.append((base_seq, changes[1], body, bool(secret)))
            sent = []
            for channel, frame in zip(channels, frames):
                if frame is not None and self._send(channel, frame, deadline_s):
                    sent.append((channel, frame[1]))
            for channel, seq in sent:
                self._receive(channel, seq, deadline_s)
        finally:
            with self._cond:
                for channel in channels:
                    channel.busy = False
                self._cond.notify_all()

    def _send(self, channel: _Channel, frame: tuple, deadline_s: float) -> bool:
        base_seq, _, body, signed = frame
        try:
            if channel.sock is None:
                channel.sock = self._connect(channel.node.data_addr, deadline_s)
            channel.sock.settimeout(max(deadline_s - self._clock(), 0.001))
            channel.request_id += 1
            data_frames.sendmsg_all(channel.sock, [data_frames.encode_commit(
                channel.request_id, base_seq, len(body), signed), body])
            return True
        except (OSError, data_frames.PeerClosedError, _Refused) as exc:
            self._failed(channel, exc)
            return False

    def _receive(self, channel: _Channel, seq: int, deadline_s: float) -> None:
        try:
            channel.sock.settimeout(max(deadline_s - self._clock(), 0.001))
            status, request_id, applied_seq, message = _read_reply(channel.sock)
            if request_id != channel.request_id & 0xFFFFFFFF:
                # NOTE: only the reply to the push just sent confirms anything: another one
                # (left over from an earlier push, were one ever left unread) would confirm
                # changes the daemon may not hold; the connection is out of step: closed
                raise _Refused(f"COMMIT reply names request {request_id}, not "
                               f"{channel.request_id & 0xFFFFFFFF}")
            if status != Status.OK:
                raise _Refused(f"COMMIT refused: {Status(status).name}: {message}")
        except (OSError, data_frames.PeerClosedError, _Refused, ValueError) as exc:
            self._failed(channel, exc)
            return
        node = channel.node
        # NOTE: a daemon behind the push's base applied nothing (a gap) and answers its own
        # sequence; only what it confirms counts. Under the service lock, like the
        # heartbeat's update, so durable_seq never goes back.
        with self._lock:
            if node.durable_seq < applied_seq <= node.seq:
                node.durable_seq = applied_seq
        channel.warned = False

    def _connect(self, address: str, deadline_s: float) -> socket.socket:
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)),
                                        timeout=max(deadline_s - self._clock(), 0.001))
        try:
            data_frames.configure_socket(sock)
            if self._tls is not None:
                sock = wrap_client(sock, self._tls_context, host.strip("[]"), self._tls,
                                   f"the data plane at {address}")
            sock.sendall(data_frames.encode_hello(self._token))
            status, _, _, message = _read_reply(sock)
            if status != Status.OK:
                raise _Refused(f"data-plane handshake refused: {Status(status).name}: "
                               f"{message}")
        except BaseException:
            sock.close()
            raise
        return sock

    def _failed(self, channel: _Channel, exc: BaseException) -> None:
        channel.close()
        channel.retry_at_s = self._clock() + RETRY_S
        if not channel.warned:   # NOTE: once per outage, not once per retry
            channel.warned = True
            log.warning("commit push to node %s (%s) failed: %s; retrying (heartbeats also "
                        "confirm)", channel.node.node_id, channel.node.data_addr, exc)


class _Refused(Exception):
    """The daemon answered with an error status, or a reply to another request."""


def _read_reply(sock: socket.socket) -> tuple[int, int, int, str]:
    """(status, request id, length field, message) of one data-plane reply without
    payload."""
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, _, msg_len, request_id, length = data_frames.REPLY.unpack(header)
    message = data_frames.recv_exact(sock, msg_len).decode(errors="replace") if msg_len else ""
    return status, request_id, length, message
