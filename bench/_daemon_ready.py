"""Waits a benchmark does before it times anything: the daemon registered and its DRAM
segments allocated. Plain Python with no kvstore import, so a bench driving another tree's
interpreter (``--python``) can use it too.

NOTE: a daemon allocates its segments in the background after it starts listening
(``posix_fallocate``, ~1 s per GiB here); a bench that starts timing before that ends
measures the allocation competing with its puts (seen: batched put figures off by
tens of percent).
"""

from __future__ import annotations

import os
import time

SHM_DIR = "/dev/shm"
_MIN_SEGMENT_BYTES = 64 << 20     # rings and small objects are not segments


def wait_registered(store, timeout_s: float = 30.0) -> None:
    """Until the master lists a node (RuntimeError past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not store.stats()["master"]["num_nodes"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no daemon registered within {timeout_s:g} s")
        time.sleep(0.05)


def wait_allocated(timeout_s: float = 120.0) -> None:
    """Until every kvstore shm segment in /dev/shm has all its blocks allocated
    (RuntimeError naming the ones still short past ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        short = []
        for entry in os.scandir(SHM_DIR):
            if entry.name.startswith("kvstore-") and entry.is_file():
                st = entry.stat()
                if st.st_size >= _MIN_SEGMENT_BYTES and st.st_blocks * 512 < st.st_size:
                    short.append(entry.name)
        if not short:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"shm segments not allocated within {timeout_s:g} s: {short}")
        time.sleep(0.1)
