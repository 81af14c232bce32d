"""The HBM tier backend: a CUDA buffer, reached through ``read_into``/``write_from``.

torch is imported here only, and only when the daemon is given ``--gpu``; on a machine without
CUDA the daemon fails at start with ConfigError saying so. The data plane moves bytes through
its staging buffer (socket <-> staging <-> device, one ``copy_`` per chunk); tier moves copy
through ``kvstore.daemon.moves``. ``ipc_handle`` gives a same-host process a CUDA IPC handle
of the buffer (``torch.multiprocessing`` reductions), so it can map the memory itself.
"""

from __future__ import annotations

from kvstore._errors import ConfigError
from kvstore.daemon.backends import Backend
from kvstore.tiers import Tier


class GpuBackend(Backend):
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

    def write_from(self, offset: int, src: memoryview) -> None:
        if len(src):
            host = self._torch.frombuffer(src, dtype=self._torch.uint8)
            self._buffer[offset:offset + len(src)].copy_(host)

    def read_into(self, offset: int, dst: memoryview) -> None:
        if len(dst):
            host = self._torch.frombuffer(dst, dtype=self._torch.uint8)
            host.copy_(self._buffer[offset:offset + len(dst)])

    def ipc_handle(self):
        """A picklable CUDA IPC handle of the whole buffer (for a same-host client)."""
        from torch.multiprocessing.reductions import reduce_tensor
        return reduce_tensor(self._buffer)

    def close(self) -> None:
        self._buffer = None
