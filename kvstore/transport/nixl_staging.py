"""Registered staging buffers for the NIXL transport: the local end of a transfer whose caller
buffer is not registered.

Buffers come in power-of-two sizes from 64 KiB; ``take`` returns an idle one of the right size
or registers a new one (NIXL registration is not free: for RDMA it pins the pages), ``give``
keeps it for the next transfer while the idle total stays within ``max_idle_bytes`` and
deregisters it otherwise. A buffer marked ``abandoned`` (its transfer passed its deadline and
may still land in it) is never reused: it stays registered, untouched, until the pool's agent
is released. Not thread-safe: the transport calls it under its lock.
"""

from __future__ import annotations

import numpy as np

from kvstore.transport.nixl_lib import AgentHandle

MIN_BUFFER_BYTES = 64 * 1024


class StagingBuffer:
    """One registered buffer: its memory, its address and its registration."""

    __slots__ = ("array", "address", "size_bytes", "descs", "abandoned")

    def __init__(self, handle: AgentHandle, size_bytes: int):
        self.array = np.empty(size_bytes, dtype=np.uint8)
        self.array[::4096] = 0  # NOTE: touch every page now, not inside a transfer
        self.address = self.array.ctypes.data
        self.size_bytes = size_bytes
        self.descs = handle.register(self.address, size_bytes)
        self.abandoned = False


def size_class(length: int) -> int:
    """The buffer size serving ``length`` bytes: the next power of two, at least 64 KiB."""
    return max(MIN_BUFFER_BYTES, 1 << (max(length, 1) - 1).bit_length())


class StagingPool:
    """Idle registered buffers by size, plus the abandoned ones kept until release."""

    def __init__(self, handle: AgentHandle, *, initial_bytes: int, max_idle_bytes: int):
        self._handle = handle
        self._max_idle_bytes = max_idle_bytes
        self._size_to_idle: dict[int, list[StagingBuffer]] = {}
        self._idle_bytes = 0
        self._abandoned: list[StagingBuffer] = []
        if initial_bytes > 0:
            self.give(StagingBuffer(handle, size_class(initial_bytes)))

    def take(self, length: int) -> StagingBuffer:
        """A registered buffer of at least ``length`` bytes (ConfigError if NIXL refuses)."""
        size_bytes = size_class(length)
        idle = self._size_to_idle.get(size_bytes)
        if idle:
            self._idle_bytes -= size_bytes
            return idle.pop()
        return StagingBuffer(self._handle, size_bytes)

    def give(self, buffer: StagingBuffer) -> None:
        """Return a buffer after its transfer finished (or was abandoned)."""
        if buffer.abandoned:
            self._abandoned.append(buffer)
        elif self._idle_bytes + buffer.size_bytes <= self._max_idle_bytes:
            self._size_to_idle.setdefault(buffer.size_bytes, []).append(buffer)
            self._idle_bytes += buffer.size_bytes
        else:
            self._handle.deregister(buffer.descs)
