"""The raw-NIXL ceiling of ``kvstore bench transfer``'s nixl rows: one NIXL agent of this
process, registered buffers, WRITE or READ into or out of the daemon's registered segment,
polled to DONE; no kvstore code on the path (no transport, no master, no checksum). Same two
processes and the same UCX wire as the nixl transport, so the ratio says what kvstore adds.

Same access pattern as the rows it bounds (as the memcpy ceiling, ``measure.ColdCopy``): a
case moves a batch of ``num_items`` distinct values, so the ceiling moves between as many
distinct remote ranges: single calls (``put``/``get``) one value per transfer, cycling through
them; batched calls (``put_batch``/``get_batch``) all of them in one transfer of ``num_items``
descriptors. READs land in as many distinct local buffers (the cases' destinations are
distinct); WRITEs all come from one local value (the client level puts one value to every
key, the hottest source of any case). NOTE: before 2026-12-02 the ceiling moved one value
between one buffer and one range, both hot in the caches, against cases cycling through 16 or
more: 1.15-2.2x less CPU per byte than the same WRITE/READ of the cases' pattern (measured:
bench/RESULTS.md, "NIXL transport beside raw NIXL of the same batch").

The range it transfers to is a hard-pinned object of the bench's own (put through the nixl
transport on the node measured, removed afterwards), so it works against an existing cluster
(``--master``) as well as the bench's own daemon, and never touches another object's bytes.
"""

from __future__ import annotations

import time

import click
import numpy as np

from kvstore.bench.measure import Budget, rate


class RawNixl:
    """Raw NIXL: one agent, registered buffers, transfers polled to DONE.

    ``remote_address`` starts ``num_items`` consecutive remote ranges of ``size_bytes``;
    ``run`` moves one value per call (cycling through them), ``run_batch`` all of them."""

    def __init__(self, agent_metadata: bytes, remote_address: int, size_bytes: int,
                 num_items: int = 1):
        from kvstore.transport.nixl_lib import new_agent

        self.handle = new_agent("bench")
        self.buffer = np.ones(size_bytes, dtype=np.uint8)             # WRITE sources
        self.outs = np.ones(size_bytes * num_items, dtype=np.uint8)   # READ destinations
        self.handle.register(self.buffer.ctypes.data, size_bytes)
        self.handle.register(self.outs.ctypes.data, self.outs.nbytes)
        agent = self.handle.agent
        self.remote_name = agent.add_remote_agent(agent_metadata)
        sources = [(self.buffer.ctypes.data, size_bytes, 0)] * num_items
        outs = [(self.outs.ctypes.data + i * size_bytes, size_bytes, 0)
                for i in range(num_items)]
        remote = [(remote_address + i * size_bytes, size_bytes, 0) for i in range(num_items)]
        self._one = [{"WRITE": agent.get_xfer_descs(sources[i:i + 1], "DRAM"),
                      "READ": agent.get_xfer_descs(outs[i:i + 1], "DRAM"),
                      "remote": agent.get_xfer_descs(remote[i:i + 1], "DRAM")}
                     for i in range(num_items)]
        self._batch = {"WRITE": agent.get_xfer_descs(sources, "DRAM"),
                       "READ": agent.get_xfer_descs(outs, "DRAM"),
                       "remote": agent.get_xfer_descs(remote, "DRAM")}
        self._turn = 0
        self.backend = None

    def run(self, op: str) -> None:
        """One ``op`` ("WRITE" or "READ") of the next value; RuntimeError if it ends other
        than DONE."""
        descs = self._one[self._turn]
        self._turn = (self._turn + 1) % len(self._one)
        self._transfer(op, descs[op], descs["remote"])

    def run_batch(self, op: str) -> None:
        """One ``op`` of all the values in one transfer; RuntimeError as ``run``."""
        self._transfer(op, self._batch[op], self._batch["remote"])

    def _transfer(self, op: str, local, remote) -> None:
        agent = self.handle.agent
        xfer = agent.initialize_xfer(op, local, remote, self.remote_name)
        state = agent.transfer(xfer)
        while state == "PROC":
            state = agent.check_xfer_state(xfer)
        if state != "DONE":
            raise RuntimeError(f"raw NIXL {op} ended {state}")
        self.backend = agent.query_xfer_backend(xfer)
        xfer.release()

    def close(self) -> None:
        self.handle.release()


class RawNixlCeiling:
    """The raw-NIXL ceilings of one run against ``node`` (a NodeStatus): a ``RawNixl`` per
    size, with ``size_to_items[size]`` values per batch (1 where absent), kept open for the
    run so that each row's rounds alternate with raw rounds of the same pattern (``link``,
    for ``measure.rate_beside_memcpy``), plus ``figures`` measured up front (the JSON's
    ``raw_nixl_gbps`` and the plot). ``close()`` releases the agents and removes the pinned
    object. Raises click.ClickException when the node publishes no NIXL agent,
    kvstore.TransferError (from the put of the pinned range) or RuntimeError (a transfer that
    failed) when NIXL does not work between the two."""

    def __init__(self, master_addr: str, token: str | None, node, sizes: list[int],
                 size_to_items: dict[int, int] | None = None, tls=None):
        import kvstore
        from kvstore.rpc import grpc_client
        from kvstore.transport import nixl_meta

        info = nixl_meta.unpack(node.nixl_metadata, node.node_id)
        if info is None:
            raise click.ClickException(f"nixl: node {node.node_id} publishes no NIXL agent "
                                       "(start its daemon with --nixl)")
        self._key = f"bench/raw-nixl/{time.time_ns()}"
        self._items = {size: max(1, (size_to_items or {}).get(size, 1)) for size in sizes}
        self._raws: dict[int, RawNixl] = {}
        self._store = kvstore.connect(master_addr, token=token, transport="nixl", tls=tls)
        try:
            self._store.put(self._key, np.zeros(max(s * n for s, n in self._items.items()),
                                                np.uint8), near_node=node.node_id, hard_pin=True)
            with grpc_client(master_addr, token=token, tls=tls) as client:
                results, lease_id = client.get_replicas_leased([self._key])
                if lease_id:
                    client.release_leases([lease_id])
            target = results[0].targets[0]
            address = info.segments[target.segment_id].address + target.offset
            for size_bytes, num_items in self._items.items():
                self._raws[size_bytes] = RawNixl(info.agent_metadata, address, size_bytes,
                                                 num_items)
        except BaseException:
            self.close()
            raise

    def figures(self, budget: Budget) -> dict[int, dict[str, float]]:
        """``{size: {"put": GB/s of WRITE, "get": GB/s of READ, "put_batch", "get_batch":
        the same of a whole batch per transfer, "items": values per batch}}``."""
        figures = {}
        for size_bytes, raw in self._raws.items():
            batch_bytes = size_bytes * self._items[size_bytes]
            figures[size_bytes] = {
                "put": rate(lambda: raw.run("WRITE"), size_bytes, budget),
                "get": rate(lambda: raw.run("READ"), size_bytes, budget),
                "put_batch": rate(lambda: raw.run_batch("WRITE"), batch_bytes, budget),
                "get_batch": rate(lambda: raw.run_batch("READ"), batch_bytes, budget),
                "items": self._items[size_bytes]}
        return figures

    def link(self, size_bytes: int, num_items: int, mode: str, op: str):
        """The raw call bounding a row (``mode`` "single" or "batch", ``op`` "put" or "get")
        of ``num_items`` values of ``size_bytes`` per call; None for a size or batch this
        ceiling does not have."""
        raw = self._raws.get(size_bytes)
        if raw is None or (mode == "batch" and num_items != self._items[size_bytes]):
            return None
        nixl_op = "WRITE" if op == "put" else "READ"
        if mode == "batch":
            return lambda: raw.run_batch(nixl_op)
        return lambda: raw.run(nixl_op)

    def close(self) -> None:
        """Release the agents, unpin and remove the pinned object. Idempotent."""
        raws, self._raws = list(self._raws.values()), {}
        for raw in raws:
            raw.close()
        store, self._store = self._store, None
        if store is None:
            return
        try:
            if store.exists(self._key):
                store.unpin(self._key)
                store.remove(self._key, force=True)
        finally:
            store.close()
