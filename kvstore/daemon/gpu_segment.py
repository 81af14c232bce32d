"""An HBM segment: a CUDA buffer served over the data plane through a pinned staging buffer.

torch is imported here only, and only when the daemon is given ``--gpu``. Each connection
thread gets its own pinned staging buffer of ``STAGING_BYTES``; a range larger than that
moves in chunks (socket <-> staging <-> device). Same-host clients do not map HBM segments
(no ``shm_name``); a later NIXL transport can read them one-sided.
"""

from __future__ import annotations

import socket
import threading

from kvstore._errors import ConfigError
from kvstore.daemon.segments import Segment
from kvstore.tiers import Tier
from kvstore.transport import data_frames

STAGING_BYTES = 8 * 1024 * 1024


class GpuSegment(Segment):
    tier = Tier.HBM

    def __init__(self, segment_id: str, size_bytes: int, *, device: str):
        try:
            import torch
        except ImportError as exc:
            raise ConfigError("--gpu: torch is not installed") from exc
        if not torch.cuda.is_available():
            raise ConfigError("--gpu: not supported on this build: torch.cuda is unavailable "
                              "(CPU-only torch, or no GPU visible)")
        try:
            torch_device = torch.device(device)
            if torch_device.type != "cuda":
                raise ConfigError(f"--gpu: {device!r} is not a CUDA device (e.g. cuda:0)")
            self._buffer = torch.empty(size_bytes, dtype=torch.uint8, device=torch_device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            raise ConfigError(f"--gpu: cannot allocate {size_bytes} bytes on {device}: "
                              f"{exc}") from exc
        super().__init__(segment_id, size_bytes)
        self._torch = torch
        self._local = threading.local()

    def _staging(self):
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._torch.empty(STAGING_BYTES, dtype=self._torch.uint8, pin_memory=True)
            self._local.staging = staging
            self._local.view = memoryview(staging.numpy())
        return staging, self._local.view

    def recv_range(self, sock: socket.socket, offset: int, length: int) -> None:
        staging, view = self._staging()
        for start in range(0, length, STAGING_BYTES):
            num_bytes = min(STAGING_BYTES, length - start)
            data_frames.recv_exact_into(sock, view[:num_bytes])
            self._buffer[offset + start:offset + start + num_bytes].copy_(staging[:num_bytes])

    def send_range(self, sock: socket.socket, header: bytes, offset: int, length: int) -> None:
        staging, view = self._staging()
        sock.sendall(header)
        for start in range(0, length, STAGING_BYTES):
            num_bytes = min(STAGING_BYTES, length - start)
            staging[:num_bytes].copy_(self._buffer[offset + start:offset + start + num_bytes])
            sock.sendall(view[:num_bytes])

    def close(self) -> None:
        self._buffer = None
