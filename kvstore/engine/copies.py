"""One-thread strided copies for the connectors' CPU passes over the KV.

``copy_one_thread(dst, src)`` is ``dst.copy_(src)`` for CPU tensors of one element size,
run by numpy's ``copyto`` on the calling thread. NOTE: why not torch's copy: its intra-op
threads split every copy and wait at a barrier for each other, so on a machine whose cores
other processes hold, each parallel copy waits for a descheduled thread's time slice (the
PD demo's strided load copy of 32 MiB: 0.12 GB/s on torch's 2 threads, 0.92 GB/s on 1 and
1.3 GB/s through numpy, load 13; bench/RESULTS.md "PD demo: the connector's copies"). A
cold copy of tens of MiB is bound by memory bandwidth, which one core nearly saturates
here, so a second thread gains little even on a quiet machine. The copy releases the GIL.
"""

from __future__ import annotations

import numpy as np
import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_one_thread(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` on the calling thread for two CPU tensors of one dtype and shape
    (any strides); any other pair (another device, a dtype conversion, broadcasting) goes
    through ``dst.copy_(src)`` itself, with its errors."""
    if dst.device.type != "cpu" or src.device.type != "cpu" or dst.dtype != src.dtype or \
            dst.shape != src.shape:
        dst.copy_(src)
        return
    as_int = _SAME_SIZE_INT[dst.element_size()]
    # NOTE: numpy has no bfloat16; the bits travel as same-size integers
    np.copyto(dst.view(as_int).numpy(), src.view(as_int).numpy(), casting="no")
