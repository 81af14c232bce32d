"""The raw-NIXL ceiling of ``kvstore bench transfer``'s nixl rows: one NIXL agent of this
process, one registered buffer, one WRITE or READ per call into or out of the daemon's
registered segment, polled to DONE; no kvstore code on the path (no transport, no master, no
checksum). Same two processes and the same UCX wire as the nixl transport, so the ratio says
what kvstore adds.

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
    """Raw NIXL: one agent, one registered buffer, one transfer per call, polled to DONE."""

    def __init__(self, agent_metadata: bytes, remote_address: int, size_bytes: int):
        from kvstore.transport.nixl_lib import new_agent

        self.handle = new_agent("bench")
        self.buffer = np.ones(size_bytes, dtype=np.uint8)
        self.handle.register(self.buffer.ctypes.data, size_bytes)
        agent = self.handle.agent
        self.remote_name = agent.add_remote_agent(agent_metadata)
        self.local = agent.get_xfer_descs([(self.buffer.ctypes.data, size_bytes, 0)], "DRAM")
        self.remote = agent.get_xfer_descs([(remote_address, size_bytes, 0)], "DRAM")
        self.backend = None

    def run(self, op: str) -> None:
        """One ``op`` ("WRITE" or "READ"); RuntimeError if it ends other than DONE."""
        agent = self.handle.agent
        xfer = agent.initialize_xfer(op, self.local, self.remote, self.remote_name)
        state = agent.transfer(xfer)
        while state == "PROC":
            state = agent.check_xfer_state(xfer)
        if state != "DONE":
            raise RuntimeError(f"raw NIXL {op} ended {state}")
        self.backend = agent.query_xfer_backend(xfer)
        xfer.release()

    def close(self) -> None:
        self.handle.release()


def raw_nixl_gbps(master_addr: str, token: str | None, node, sizes: list[int],
                  budget: Budget, tls=None) -> dict[int, dict[str, float]]:
    """``{size: {"put": GB/s of WRITE, "get": GB/s of READ}}`` between this process and
    ``node`` (a NodeStatus) by raw NIXL. Raises click.ClickException when the node publishes
    no NIXL agent, kvstore.TransferError (from the put of the pinned range) or RuntimeError (a transfer that
    failed) when NIXL does not work between the two."""
    import kvstore
    from kvstore.rpc import grpc_client
    from kvstore.transport import nixl_meta

    info = nixl_meta.unpack(node.nixl_metadata, node.node_id)
    if info is None:
        raise click.ClickException(f"nixl: node {node.node_id} publishes no NIXL agent (start "
                                   "its daemon with --nixl)")
    key = f"bench/raw-nixl/{time.time_ns()}"
    with kvstore.connect(master_addr, token=token, transport="nixl", tls=tls) as store:
        store.put(key, np.zeros(max(sizes), np.uint8), near_node=node.node_id, hard_pin=True)
        try:
            with grpc_client(master_addr, token=token, tls=tls) as client:
                results, lease_id = client.get_replicas_leased([key])
                if lease_id:
                    client.release_leases([lease_id])
            target = results[0].targets[0]
            address = info.segments[target.segment_id].address + target.offset
            figures = {}
            for size_bytes in sizes:
                raw = RawNixl(info.agent_metadata, address, size_bytes)
                try:
                    figures[size_bytes] = {
                        "put": rate(lambda: raw.run("WRITE"), size_bytes, budget),
                        "get": rate(lambda: raw.run("READ"), size_bytes, budget)}
                finally:
                    raw.close()
            return figures
        finally:
            store.unpin(key)
            store.remove(key, force=True)
