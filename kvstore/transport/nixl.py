"""NIXL transport: one-sided READ/WRITE between caller buffers and daemons' registered segments.

A ``--nixl`` daemon registers its DRAM segment with a NIXL agent (UCX backend) and publishes
the agent's metadata through the master (``nixl_meta``). This transport learns it through
``nodes`` (``{node_id: nixl_metadata}``, the client's ListNodes), loads it into its own agent
once per daemon process, and moves bytes without the daemon's CPU: a get is a READ into the
caller's buffer, a put a WRITE into the allocated range after the daemon checked its
capability (``nixl_checks``: one round trip per node and batch, one CHECK_WRITES request where
the daemon serves it, overlapped with placing the local memory). UCX picks the wire: RDMA,
or CMA/TCP on one host.

Local memory: the caller's buffer itself when it lies in memory registered with
``register_memory`` (an engine's KV cache, once) or, from ``nixl_spans.DIRECT_MIN_BYTES`` on,
when it is writable (registered on first use and kept registered, its memory held alive, in a
bounded cache: ``nixl_regcache``); otherwise a staging buffer (``nixl_staging``) it is copied
through. A batch is one NIXL transfer per node, polled until the deadline.

Errors: ``TransferError`` naming the node for a node without NIXL, an unregistered segment, a
range outside it, a write the daemon refused (its status and reason) or a transfer NIXL
reports failed (the node's metadata is then dropped and fetched again: a restarted daemon is
a new agent); ``TransferTimeoutError`` past the deadline (that transfer's staging buffers and
spans are never reused or deregistered: it may still land); ``InvalidArgumentError`` for a
buffer of the wrong size; ``ConfigError`` with NIXL's reason when NIXL is missing or a
registration fails (never a silent fallback); ``ClosedError`` after ``close()``. Thread-safe:
one lock serializes calls into the agent (sync mode NONE); copies run outside it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from kvstore._deadline import Deadline
from kvstore._errors import ClosedError, ConfigError, KVStoreError, TransferError
from kvstore.transport import byte_views, nixl_meta
from kvstore.transport.base import Target, Transport
from kvstore.transport.nixl_checks import WriteChecks
from kvstore.transport.nixl_spans import Span, direct_spans, register_spans, release_spans
from kvstore.transport.nixl_lib import AgentHandle, new_agent, nixl_available
from kvstore.transport.nixl_moves import NixlMoves
from kvstore.transport.nixl_regcache import (DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES,
                                             RegistrationCache)
from kvstore.transport.nixl_staging import StagingPool, StagingBuffer

NodeDirectory = Callable[[], Mapping[str, bytes]]
log = logging.getLogger("kvstore.transport.nixl")

#: a node absent from the directory is asked for again at most this often
REFRESH_INTERVAL_S = 1.0


class _Item:
    """One range of a batch: its index, its Target and the local memory it moves through."""

    __slots__ = ("index", "target", "view", "buffer_address", "local_address",
                 "remote_address", "staging", "span", "entry")

    def __init__(self, index: int, target: Target, view: memoryview, buffer_address: int,
                 remote_address: int):
        self.index, self.target, self.view = index, target, view
        self.buffer_address = buffer_address     # the caller's buffer
        self.remote_address = remote_address
        self.local_address = 0                   # the caller's buffer or the staging buffer
        self.staging: StagingBuffer | None = None
        self.span: Span | None = None            # registered for this call (nixl_spans)
        self.entry = None                        # a cached registration (nixl_regcache)


class NixlTransport(NixlMoves, Transport):
    """Reads and writes registered segments of NIXL-enabled daemons with one-sided transfers.

    Reachable targets: a node whose published metadata lists the target's segment.
    ``staging_bytes`` is the staging buffer registered at the agent's creation; the pool keeps
    at most ``max_idle_staging_bytes`` of buffers between transfers. Caller buffers
    registered for a call stay registered (and alive) in a cache of at most
    ``registration_cache_bytes`` / ``registration_cache_entries`` (0 entries: registered
    for each call only). ``token`` and ``tls`` open the daemons' data planes for the write
    checks (``nixl_checks``).
    """

    name = "nixl"

    def __init__(self, *, nodes: NodeDirectory | None = None, token: str | None = None,
                 tls=None, staging_bytes: int = 16 * 1024 * 1024,
                 max_idle_staging_bytes: int = 256 * 1024 * 1024,
                 registration_cache_bytes: int = DEFAULT_MAX_BYTES,
                 registration_cache_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic):
        self._nodes = nodes
        self._staging_bytes = staging_bytes
        self._max_idle_staging_bytes = max_idle_staging_bytes
        self._clock = clock
        self._lock = threading.Lock()          # the agent and the caches below
        self._handle: AgentHandle | None = None
        self._staging: StagingPool | None = None
        self._node_to_info: dict[str, nixl_meta.NodeNixlInfo | None] = {}
        self._refreshed_at_s = float("-inf")
        self._regions: list[tuple[int, int, object, object]] = []  # start, end, descs, owner
        self._cache = RegistrationCache(max_bytes=registration_cache_bytes,
                                        max_entries=registration_cache_entries)
        self._closed = False
        self._checks = WriteChecks(token=token, tls=tls)

    # ---- public ---------------------------------------------------------------------------
    def can_reach(self, target: Target) -> bool:
        """True if the target's node publishes NIXL metadata listing its segment and NIXL
        imports here. NOTE: the first sight of a node asks ``nodes`` (one ListNodes), and a
        node that registered less than ``REFRESH_INTERVAL_S`` after the last ask is not seen
        until the next one."""
        info = self._info(target.node_id)
        return info is not None and target.segment_id in info.segments and nixl_available()

    def write(self, target: Target, src: memoryview, *, timeout_s: float) -> None:
        self._raise_first(self.write_many([(target, src)], timeout_s=timeout_s))

    def read_into(self, target: Target, dst: memoryview, *, timeout_s: float) -> None:
        self._raise_first(self.read_many([(target, dst)], timeout_s=timeout_s))

    def write_many(self, items: Sequence[tuple[Target, memoryview]], *,
                   timeout_s: float) -> list[BaseException | None]:
        return self._run("WRITE", items, Deadline.after(timeout_s))

    def read_many(self, items: Sequence[tuple[Target, memoryview]], *,
                  timeout_s: float) -> list[BaseException | None]:
        return self._run("READ", items, Deadline.after(timeout_s))

    def register_memory(self, buffer: memoryview) -> object:
        """Register ``buffer`` (kept alive until ``close`` or ``deregister_memory``) so that
        transfers from or into any part of it skip the staging copy. Returns the registration.
        Raises ConfigError with NIXL's reason when NIXL refuses it."""
        view = memoryview(buffer).cast("B") if not isinstance(buffer, memoryview) else buffer
        array = np.frombuffer(view, dtype=np.uint8)
        start = array.ctypes.data
        with self._lock:
            handle = self._agent()
            descs = handle.register(start, array.nbytes)
            self._regions.append((start, start + array.nbytes, descs, array))
        return descs

    def deregister_memory(self, registration: object) -> None:
        """Release a registration made by ``register_memory``. Idempotent."""
        with self._lock:
            kept = [r for r in self._regions if r[2] is not registration]
            if len(kept) != len(self._regions) and self._handle is not None:
                self._handle.deregister(registration)
            self._regions = kept

    def close(self) -> None:
        """Release the staging pool, every registration and the agent. Idempotent."""
        with self._lock:
            self._closed = True
            handle, self._handle = self._handle, None
            self._staging, self._regions = None, []
            self._cache.clear()   # NOTE: the agent's release deregisters them
            self._node_to_info.clear()
        self._checks.close()
        if handle is not None:
            handle.release()

    # ---- nodes ----------------------------------------------------------------------------
    def _info(self, node_id: str) -> nixl_meta.NodeNixlInfo | None:
        """The node's published NIXL metadata; asks ``nodes`` on a miss (rate-limited)."""
        if node_id in self._node_to_info:
            return self._node_to_info[node_id]
        if self._nodes is None or self._clock() - self._refreshed_at_s < REFRESH_INTERVAL_S:
            return None
        self._refreshed_at_s = self._clock()
        try:
            published = self._nodes()
        except KVStoreError as exc:
            # NOTE: not cached: the node is asked for again after REFRESH_INTERVAL_S
            log.warning("nixl: cannot list the nodes' NIXL agents: %s", exc)
            return None
        infos = {nid: nixl_meta.unpack(data, nid) for nid, data in published.items()}
        with self._lock:
            self._node_to_info.update(infos)
        return infos.get(node_id)

    def _forget_node(self, node_id: str) -> None:
        """Drop a node's metadata (a failed transfer: the daemon may have restarted)."""
        with self._lock:
            info = self._node_to_info.pop(node_id, None)
            if info is not None and self._handle is not None and \
                    info.agent_name in self._handle.remote_names:
                self._handle.remote_names.discard(info.agent_name)
                try:
                    self._handle.agent.remove_remote_agent(info.agent_name)
                except Exception:  # noqa: BLE001 - NIXL may already have dropped it
                    pass
        self._refreshed_at_s = float("-inf")

    # ---- transfers ------------------------------------------------------------------------
    def _run(self, op: str, items: Sequence[tuple[Target, memoryview]],
             deadline: Deadline) -> list[BaseException | None]:
        """Validate, stage, post one transfer per node, poll; one result per item."""
        results: list[BaseException | None] = [None] * len(items)
        node_to_items: dict[str, list[_Item]] = {}
        for index, (target, buffer) in enumerate(items):
            try:
                item = self._prepare(op, index, target, buffer)
            except Exception as exc:  # noqa: BLE001 - reported per item
                results[index] = exc
                continue
            if item is not None:
                node_to_items.setdefault(target.node_id, []).append(item)
        if not node_to_items:
            return results
        spans: list[Span] = []
        taken: list = []    # cache entries used by this call (nixl_regcache)
        created: dict[str, tuple[list[_Item], object]] = {}   # node -> items, unposted xfer
        try:
            # NOTE: a WRITE's checks travel while its local memory is registered or copied
            checks = {node_id: self._checks.send(
                node_id, [i.target for i in node_items], deadline,
                batched=getattr(self._node_to_info.get(node_id), "batched_checks", False))
                for node_id, node_items in node_to_items.items()} if op == "WRITE" else {}
            spans = self._place(node_to_items, results, taken)
            if op == "WRITE":
                self._stage_sources(node_to_items, results)
                # NOTE: each node's transfer is created while its checks travel (descriptor
                # lists and initialize_xfer: ~40-90 us a batch); it is posted only if the
                # daemon allowed exactly those ranges, else made anew for the allowed ones
                created = self._create_all(op, node_to_items, results)
                for node_id, pending in checks.items():
                    for item, refusal in zip(node_to_items[node_id],
                                             self._checks.receive(pending)):
                        if refusal is not None and results[item.index] is None:
                            results[item.index] = refusal
            ready = {node_id: [i for i in node_items if results[i.index] is None]
                     for node_id, node_items in node_to_items.items()}
            xfers = {}
            for node_id, (node_items, xfer) in list(created.items()):
                if node_items == ready[node_id]:
                    xfers[node_id] = xfer
                    del created[node_id]
            self._move(op, {node_id: node_items for node_id, node_items in ready.items()
                            if node_items}, results, deadline, xfers)
        finally:
            self._release_xfers([xfer for _, xfer in created.values()])
            self._release_staging(node_to_items, spans, taken)
        return results

    def _place(self, node_to_items: dict[str, list[_Item]], results: list[BaseException | None],
               taken: list) -> list[Span]:
        """Give every item outside registered memory its local memory: its own buffer,
        registered earlier (the cache) or now (``nixl_spans``; cached when it fits), or a
        staging buffer. An item whose registration NIXL refuses gets NIXL's reason
        (ConfigError) as its result. Returns the spans registered for this call only; appends
        the cache entries it uses to ``taken`` (given back by ``_release_staging``)."""
        unplaced = [item for node_items in node_to_items.values() for item in node_items
                    if item.local_address == 0]
        if not unplaced:
            return []
        spans = direct_spans(unplaced)
        with self._lock:
            handle = self._agent()
            fresh: list[Span] = []
            for span in spans:
                entry = self._cache.take(span.start, span.end)
                if entry is None:
                    fresh.append(span)
                    continue
                taken.append(entry)
                for item in span.items:
                    item.local_address, item.entry = item.buffer_address, entry
            for span, exc in register_spans(handle, fresh):
                for item in span.items:
                    results[item.index] = exc
            spans = [span for span in fresh if span.descs is not None]
            for span in spans:
                for item in span.items:
                    item.span, item.local_address = span, item.buffer_address
            # NOTE: the call's spans share one descriptor list: cached together or not at all
            if spans and all(self._cache.fits(span.length) for span in spans) and \
                    len({id(span.descs) for span in spans}) == 1:
                entries, evicted = self._cache.add(spans)
                taken += entries
                for span, entry in zip(spans, entries):
                    for item in span.items:
                        item.span, item.entry = None, entry
                for descs in evicted:
                    handle.deregister(descs)
                spans = []
            for item in unplaced:
                if item.local_address == 0 and results[item.index] is None:
                    try:
                        item.staging = self._pool().take(item.target.length)
                    except ConfigError as exc:
                        results[item.index] = exc
                        continue
                    item.local_address = item.staging.address  # a WRITE's copy: _stage_sources
        return spans

    @staticmethod
    def _stage_sources(node_to_items: dict[str, list[_Item]],
                       results: list[BaseException | None]) -> None:
        """Copy each staged WRITE source into its staging buffer."""
        for node_items in node_to_items.values():
            for item in node_items:
                if item.staging is not None and results[item.index] is None:
                    ctypes.memmove(item.local_address, item.buffer_address, item.target.length)

    def _prepare(self, op: str, index: int, target: Target, buffer: memoryview) -> _Item | None:
        """Check one item and give it local memory; None for an empty range (nothing moves)."""
        view = byte_views.as_bytes_view(buffer, target.length, writable=op == "READ")
        if self._closed:
            raise ClosedError(f"nixl {target.node_id}: transport is closed")
        info = self._info(target.node_id)
        if info is None:
            raise TransferError(f"nixl {target.node_id}: the node publishes no NIXL agent")
        segment = info.segments.get(target.segment_id)
        if segment is None:
            raise TransferError(f"nixl {target.node_id}: segment {target.segment_id!r} is not "
                                f"registered with NIXL")
        if target.offset < 0 or target.length < 0 or \
                target.offset + target.length > segment.size_bytes:
            raise TransferError(
                f"nixl {target.node_id}: range [{target.offset}, +{target.length}) is outside "
                f"segment {target.segment_id!r} of {segment.size_bytes} bytes")
        if target.length == 0:
            return None
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        item = _Item(index, target, view, address, segment.address + target.offset)
        if self._registered(address, target.length):
            item.local_address = address   # otherwise placed by _place
        return item

    def _registered(self, address: int, length: int) -> bool:
        return any(start <= address and address + length <= end
                   for start, end, _, _ in self._regions)

    def _release_staging(self, node_to_items: dict[str, list[_Item]], spans: list[Span],
                         taken: list) -> None:
        """Give every staging buffer of the batch back (an abandoned one is kept aside) and
        deregister the call's spans (an abandoned one stays registered until the agent is
        released: its transfer may still use it) and give back the cache entries ``taken``."""
        with self._lock:
            if self._handle is not None:
                release_spans(self._handle, spans)
            pool = self._staging
            for node_items in node_to_items.values():
                for item in node_items:
                    if item.staging is not None and pool is not None:
                        pool.give(item.staging)
            evicted = [descs for entry in taken for descs in self._cache.give(entry)]
            if self._handle is not None:
                for descs in evicted:
                    self._handle.deregister(descs)

    # ---- agent ----------------------------------------------------------------------------
    def _agent(self) -> AgentHandle:
        """The agent, created on first use (caller holds the lock)."""
        if self._closed:
            raise ClosedError("nixl: transport is closed")
        if self._handle is None:
            self._handle = new_agent("client")
        return self._handle

    def _pool(self) -> StagingPool:
        """The staging pool, created with the agent (caller holds the lock)."""
        handle = self._agent()
        if self._staging is None:
            self._staging = StagingPool(handle, initial_bytes=self._staging_bytes,
                                        max_idle_bytes=self._max_idle_staging_bytes)
        return self._staging

    @staticmethod
    def _raise_first(results: list[BaseException | None]) -> None:
        if results[0] is not None:
            raise results[0]
