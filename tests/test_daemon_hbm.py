"""The HBM backend and CUDA-pinned DRAM: run where CUDA is present, skip with the reason
elsewhere (the CPU-only failure of --gpu is tested in tests/test_daemon_ssd.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here (CPU-only torch or no device): HBM and pinned-memory tests "
                "need one", allow_module_level=True)

from kvstore.daemon.backends import ShmBackend  # noqa: E402
from kvstore.daemon.gpu import GpuBackend  # noqa: E402
from kvstore.daemon.moves import copy_range  # noqa: E402


def test_hbm_backend_round_trips_and_moves_to_and_from_dram():
    hbm = GpuBackend("hbm0", 32 << 20, device="cuda:0")
    dram = ShmBackend("dram0", 32 << 20, name_prefix="kvstore-test-hbm")
    try:
        data = np.random.default_rng(0).integers(0, 256, 9 << 20, np.uint8).tobytes()
        hbm.write_from(64, memoryview(data))
        out = bytearray(len(data))
        hbm.read_into(64, memoryview(out))
        assert bytes(out) == data
        copy_range(hbm, 64, dram, 4096, len(data))       # demotion HBM -> DRAM
        assert bytes(dram.view(4096, len(data))) == data
        copy_range(dram, 4096, hbm, 20 << 20, len(data))  # promotion DRAM -> HBM
        hbm.read_into(20 << 20, memoryview(out))
        assert bytes(out) == data
    finally:
        hbm.close()
        dram.close()


@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="no NVIDIA driver device")
def test_dram_segment_is_registered_as_pinned_memory():
    dram = ShmBackend("dram0", 8 << 20, name_prefix="kvstore-test-pin")
    try:
        assert dram.pin_with_cuda()
        host = torch.frombuffer(dram.view(0, 8 << 20), dtype=torch.uint8)
        assert host.is_pinned()
    finally:
        dram.close()
