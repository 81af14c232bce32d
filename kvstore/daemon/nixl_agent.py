"""The daemon's NIXL agent (``kvstore daemon --nixl``): registers the node's DRAM segments once
at start and gives the metadata the node publishes through the master
(``NodeInfo.nixl_metadata``, format in ``kvstore.transport.nixl_meta``).

Clients then READ and WRITE those segments one-sided (``kvstore.transport.nixl``); the
daemon's CPU takes no part. Only mapped DRAM segments are registered: SSD segments stay on
the data plane, HBM segments are not registered yet. ``close()`` deregisters and destroys the
agent; the daemon calls it on stop before its segments are unmapped, whether or not the
master is reachable. Errors: ``ConfigError`` with NIXL's reason when NIXL is missing, the
agent cannot be created or a registration fails (the daemon then does not start).
"""

from __future__ import annotations

import numpy as np

from kvstore.daemon.backends import Backend, MappedBackend
from kvstore.tiers import Tier
from kvstore.transport import nixl_meta
from kvstore.transport.nixl_lib import AgentHandle, new_agent


class DaemonNixlAgent:
    """One agent per daemon process, holding the registrations of its DRAM segments."""

    def __init__(self, segments: list[Backend]):
        self._handle: AgentHandle | None = new_agent("daemon")
        registered: dict[str, nixl_meta.RemoteSegment] = {}
        try:
            for segment in segments:
                if segment.tier != Tier.DRAM or not isinstance(segment, MappedBackend):
                    continue
                address = np.frombuffer(segment.mapping_view, dtype=np.uint8).ctypes.data
                self._handle.register(address, segment.size_bytes)
                registered[segment.segment_id] = nixl_meta.RemoteSegment(
                    address, segment.size_bytes, "DRAM", 0)
        except BaseException:
            self.close()
            raise
        self.metadata = nixl_meta.pack(nixl_meta.NodeNixlInfo(
            self._handle.name, registered, self._handle.agent.get_agent_metadata(),
            batched_checks=True))
        self.segment_ids = sorted(registered)

    @property
    def agent_name(self) -> str:
        return self._handle.name if self._handle is not None else ""

    def close(self) -> None:
        """Deregister the segments and destroy the agent. Idempotent; never raises."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.release()
