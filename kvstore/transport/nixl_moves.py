"""Posting and polling the nixl transport's transfers: one NIXL transfer per node, created
(descriptor lists, ``initialize_xfer``), posted, polled until done or the deadline, and each
item's result set from its node's outcome.

``NixlMoves`` is a part of ``nixl.NixlTransport`` (a mixin: it uses the transport's lock,
agent, node metadata and ``_forget_node``), split off so each module keeps one job: this one
the transfers, ``nixl`` the items, their local memory and the nodes.

Errors, per item (never raised, except ClosedError after ``close()``): ``TransferError``
naming the node when a transfer cannot be created or started, or NIXL reports it failed (the
node's metadata is then dropped: a restarted daemon is a new agent);
``TransferTimeoutError`` past the deadline (the items' staging buffers and spans are then
marked abandoned: the transfer may still land in them).
"""

from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING

from kvstore._deadline import Deadline
from kvstore._errors import TransferError, TransferTimeoutError

if TYPE_CHECKING:
    from kvstore.transport.nixl import _Item

# NOTE: polling (``poll_sleep_s``): spin this long (a small transfer completes within
# microseconds), then sleep a fraction of the time already waited, up to the cap: a transfer
# is seen done at most ~1/8 of its time late (plus the OS's timer slack, ~50 us), with a
# logarithmic number of wake-ups; a fixed doubling step to 1 ms could add 1 ms to a 1 ms
# transfer (bench/RESULTS.md, "NIXL transport beside raw NIXL of the same batch").
_SPIN_S = 200e-6
_SLEEP_FRACTION = 1 / 8
_MAX_SLEEP_S = 1e-3


def poll_sleep_s(waited_s: float) -> float:
    """How long to sleep before the next completion check, ``waited_s`` after the post: 0
    while spinning, then ``_SLEEP_FRACTION`` of the wait so far, at most ``_MAX_SLEEP_S``."""
    if waited_s < _SPIN_S:
        return 0.0
    return min(_MAX_SLEEP_S, waited_s * _SLEEP_FRACTION)


class NixlMoves:
    """The transfer half of ``NixlTransport`` (see the module)."""

    def _create_all(self, op: str, node_to_items: dict[str, list[_Item]],
                    results: list[BaseException | None],
                    ) -> dict[str, tuple[list[_Item], object]]:
        """Each node's transfer of its items still without a result, created, not posted
        (a node whose creation fails is left to ``_post``, which reports it)."""
        created = {}
        for node_id, node_items in node_to_items.items():
            todo = [item for item in node_items if results[item.index] is None]
            if todo:
                try:
                    created[node_id] = (todo, self._create(op, node_id, todo))
                except TransferError:
                    pass
        return created

    def _release_xfers(self, xfers: list[object]) -> None:
        """Release transfers created and never posted."""
        with self._lock:
            for xfer in xfers:
                try:
                    xfer.release()
                except Exception:  # noqa: BLE001 - the agent may be gone already
                    pass

    def _move(self, op: str, node_to_items: dict[str, list[_Item]],
              results: list[BaseException | None], deadline: Deadline,
              created: dict[str, object]) -> None:
        """Post one transfer per node (``created``: made beforehand for exactly its items),
        then poll them all until done or the deadline."""
        pending: dict[str, object] = {}
        for node_id, node_items in node_to_items.items():
            try:
                pending[node_id] = self._post(op, node_id, node_items, created.pop(node_id, None))
            except TransferError as exc:
                self._fail(node_items, results, exc)
        posted_s = time.monotonic()
        while pending:
            for node_id, xfer in list(pending.items()):
                with self._lock:
                    state = self._handle.agent.check_xfer_state(xfer) if self._handle else "ERR"
                if state == "PROC":
                    continue
                del pending[node_id]
                self._finish(op, node_id, xfer, state, node_to_items[node_id], results)
            if not pending:
                return
            if deadline.expired():
                for node_id in pending:
                    self._fail(node_to_items[node_id], results, TransferTimeoutError(
                        f"nixl {node_id}: {op.lower()} of {len(node_to_items[node_id])} "
                        f"range(s) not done before the deadline"), abandoned=True)
                return
            sleep_s = poll_sleep_s(time.monotonic() - posted_s)
            if sleep_s > 0:
                time.sleep(sleep_s)

    def _post(self, op: str, node_id: str, node_items: list[_Item],
              xfer: object | None = None) -> object:
        """Post the node's transfer (``xfer``, made by ``_create`` for exactly these items,
        or made now); its handle. Raises TransferError."""
        if xfer is None:
            xfer = self._create(op, node_id, node_items)
        with self._lock:
            handle = self._agent()
            try:
                state = handle.agent.transfer(xfer)
            except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
                raise TransferError(f"nixl {node_id}: cannot start the {op.lower()}: "
                                    f"{exc}") from exc
        if state == "ERR":
            raise TransferError(f"nixl {node_id}: NIXL refused the {op.lower()}")
        return xfer

    def _create(self, op: str, node_id: str, node_items: list[_Item]) -> object:
        """Create the node's transfer of ``node_items`` without posting it; its handle.
        Raises TransferError."""
        info = self._node_to_info.get(node_id)
        if info is None:
            raise TransferError(f"nixl {node_id}: the node publishes no NIXL agent")
        local = [(item.local_address, item.target.length, 0) for item in node_items]
        remote = [(item.remote_address, item.target.length,
                   info.segments[item.target.segment_id].device_id) for item in node_items]
        mem_type = info.segments[node_items[0].target.segment_id].mem_type
        with self._lock:
            handle = self._agent()
            try:
                if info.agent_name not in handle.remote_names:
                    handle.agent.add_remote_agent(info.agent_metadata)
                    handle.remote_names.add(info.agent_name)
                return handle.agent.initialize_xfer(
                    op, handle.agent.get_xfer_descs(local, "DRAM"),
                    handle.agent.get_xfer_descs(remote, mem_type), info.agent_name)
            except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
                raise TransferError(f"nixl {node_id}: cannot start the {op.lower()}: "
                                    f"{exc}") from exc

    def _finish(self, op: str, node_id: str, xfer: object, state: str,
                node_items: list[_Item], results: list[BaseException | None]) -> None:
        with self._lock:
            try:
                xfer.release()
            except Exception:  # noqa: BLE001 - a failed transfer's handle may refuse
                pass
        if state != "DONE":
            self._fail(node_items, results, TransferError(
                f"nixl {node_id}: {op.lower()} of {len(node_items)} range(s) failed "
                f"(NIXL state {state}; the node may have died)"))
            self._forget_node(node_id)
            return
        if op == "READ":
            for item in node_items:
                if item.staging is not None:
                    ctypes.memmove(item.buffer_address, item.local_address,
                                   item.target.length)

    @staticmethod
    def _fail(node_items: list[_Item], results: list[BaseException | None],
              error: TransferError, *, abandoned: bool = False) -> None:
        for item in node_items:
            results[item.index] = error
            if abandoned and item.staging is not None:
                item.staging.abandoned = True
            if abandoned and item.span is not None:
                item.span.abandoned = True
            if abandoned and item.entry is not None:
                item.entry.abandoned = True   # NOTE: never evicted: it may still land
