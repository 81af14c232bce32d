"""Measuring primitives of ``kvstore bench``: rates beside a memcpy ceiling, latency
percentiles, a raw loopback TCP ceiling and CPU accounting. No kvstore state is touched."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

_SINK_CODE = """
import socket, struct, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buffer = memoryview(bytearray(int(sys.argv[1])))
while True:
    header = conn.recv(8, socket.MSG_WAITALL)
    if len(header) < 8:
        break
    (length,) = struct.unpack("<Q", header)
    received = 0
    while received < length:
        received += conn.recv_into(buffer[received:length])
    conn.sendall(b"k")
"""

@dataclasses.dataclass(frozen=True)
class Budget:
    """How long one measurement runs: ``duration_s`` seconds, or (when ``total_bytes`` is set)
    until that many bytes moved; split over ``num_rounds`` rounds of at least 2 calls."""

    duration_s: float = 0.25
    total_bytes: int | None = None
    num_rounds: int = 3

    def round_done(self, num_calls: int, elapsed_s: float, bytes_per_call: int) -> bool:
        if num_calls < 2:
            return False
        if self.total_bytes is not None:
            return num_calls * bytes_per_call >= self.total_bytes / self.num_rounds
        return elapsed_s >= self.duration_s / self.num_rounds


def percentiles_us(samples_s: list[float]) -> dict[str, float]:
    """p50/p90/p99 in microseconds of per-call seconds (nearest rank; {} when empty)."""
    if not samples_s:
        return {}
    ordered = sorted(samples_s)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))] * 1e6
    return {"p50_us": rank(0.50), "p90_us": rank(0.90), "p99_us": rank(0.99)}


def loopback_gbps(sizes: list[int], budget: Budget) -> dict[int, float]:
    """Raw Python TCP over loopback to another process (sendall / recv_into, one stream):
    the ceiling a single tcp stream of ours can approach, in GB/s per size."""
    import socket
    import struct
    import subprocess
    import sys

    sink = subprocess.Popen([sys.executable, "-c", _SINK_CODE, str(max(sizes))],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result = {}
            for size_bytes in sizes:
                payload = memoryview(bytearray(size_bytes))
                header = struct.pack("<Q", size_bytes)

                def send_one():
                    sock.sendall(header)
                    sock.sendall(payload)
                    sock.recv(1)
                result[size_bytes] = rate(send_one, size_bytes, budget)
            return result
    finally:
        sink.kill()
        sink.wait()


def _round(fn, bytes_per_call: int, budget: Budget) -> tuple[int, float, list[float]]:
    """Call ``fn`` until ``budget`` says the round is done; (calls, elapsed s, per-call s)."""
    samples, started_s = [], time.perf_counter()
    while True:
        call_started_s = time.perf_counter()
        fn()
        now_s = time.perf_counter()
        samples.append(now_s - call_started_s)
        if budget.round_done(len(samples), now_s - started_s, bytes_per_call):
            return len(samples), now_s - started_s, samples


def rate(fn, bytes_per_call: int, budget: Budget) -> float:
    """GB/s of ``fn``: the best of the budget's rounds. NOTE: best-of-rounds, for the ceilings
    too, because the machine may be shared: a round that another process interrupted says
    nothing about our code."""
    fn()  # warm-up
    best_gbps = 0.0
    for _ in range(budget.num_rounds):
        num_calls, elapsed_s, _ = _round(fn, bytes_per_call, budget)
        best_gbps = max(best_gbps, bytes_per_call * num_calls / elapsed_s / 1e9)
    return best_gbps


class ColdCopy:
    """Single-thread memcpy (numpy copyto) with the access pattern of a case: ``num_items``
    copies of ``size_bytes`` per call, each between a distinct pair of buffers, cycling
    through ``working_set_bytes`` (the case's distinct values: a batch's worth), so the
    ceiling is as cold or as hot in the caches as the case it bounds. One pair of arrays is
    allocated and touched on first use and reused (grown when needed) by later calls."""

    def __init__(self) -> None:
        self._src = self._dst = None

    def fn(self, size_bytes: int, num_items: int = 1, working_set_bytes: int = 0):
        import numpy as np

        num_slots = max(num_items, working_set_bytes // size_bytes, 1)
        need_bytes = num_slots * size_bytes
        if self._src is None or self._src.nbytes < need_bytes:
            self._src = np.ones(need_bytes, np.uint8)
            self._dst = np.ones(need_bytes, np.uint8)
        src, dst = self._src, self._dst
        state = {"slot": 0}

        def copy() -> None:
            slot = state["slot"]
            for _ in range(num_items):
                offset = slot * size_bytes
                np.copyto(dst[offset:offset + size_bytes], src[offset:offset + size_bytes])
                slot = (slot + 1) % num_slots
            state["slot"] = slot
        return copy


@dataclasses.dataclass
class Figure:
    """One measurement: GB/s of the call, GB/s of its memcpy ceiling in the same moments,
    CPU seconds per GB, and p50/p90/p99 of the call's latency in microseconds."""

    gbps: float
    memcpy_gbps: float
    cpu_s_per_gb: float
    latency_us: dict[str, float]
    link_gbps: float | None = None   # the link ceiling's rounds, when one was given


def rate_beside_memcpy(fn, size_bytes: int, num_items: int, budget: Budget, cpu_probe,
                       ceiling: ColdCopy, working_set_bytes: int = 0, link=None) -> Figure:
    """``fn`` (moving ``num_items`` values of ``size_bytes`` per call, cycling through
    ``working_set_bytes`` of distinct values) beside a memcpy of the same pattern and, when
    ``link`` is given (a call moving the same bytes over the row's link without kvstore: raw
    NIXL), beside that too. Rounds of ``fn``, of the memcpy and of ``link`` alternate and the
    best of each is kept, so the ceilings are measured in the same moments as the figure they
    bound; CPU and latency are counted in ``fn``'s rounds only."""
    bytes_per_call = size_bytes * num_items
    copy = ceiling.fn(size_bytes, num_items, working_set_bytes)
    fn()
    copy()
    if link is not None:
        link()
    best_gbps = best_copy_gbps = best_link_gbps = cpu_s = 0.0
    samples: list[float] = []
    copy_budget = dataclasses.replace(budget, duration_s=budget.duration_s / 2,
                                      total_bytes=None if budget.total_bytes is None
                                      else budget.total_bytes // 2)
    for _ in range(budget.num_rounds):
        cpu_before_s = cpu_probe()
        num_calls, elapsed_s, round_samples = _round(fn, bytes_per_call, budget)
        cpu_s += cpu_probe() - cpu_before_s
        samples += round_samples
        best_gbps = max(best_gbps, bytes_per_call * num_calls / elapsed_s / 1e9)
        copy_calls, copy_s, _ = _round(copy, bytes_per_call, copy_budget)
        best_copy_gbps = max(best_copy_gbps, bytes_per_call * copy_calls / copy_s / 1e9)
        if link is not None:
            link_calls, link_s, _ = _round(link, bytes_per_call, copy_budget)
            best_link_gbps = max(best_link_gbps, bytes_per_call * link_calls / link_s / 1e9)
    return Figure(best_gbps, best_copy_gbps, cpu_s / (len(samples) * bytes_per_call / 1e9),
                  percentiles_us(samples), best_link_gbps if link is not None else None)


def make_cpu_probe(pids: list[int]):
    """A function returning CPU seconds (user + system) used so far by this process and by
    ``pids`` (our master and daemon). NOTE: CPU per GB barely depends on what else runs on
    the machine, unlike GB/s, so it is the figure to compare across busy runs."""
    import os
    import resource

    ticks_per_s = os.sysconf("SC_CLK_TCK")

    def probe() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        total_s = usage.ru_utime + usage.ru_stime
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total_s += (int(fields[11]) + int(fields[12])) / ticks_per_s
            except (OSError, IndexError, ValueError):
                pass
        return total_s
    return probe


def disk_gbps(directory: str, sizes: list[int], budget: Budget) -> tuple[dict, bool]:
    """The disk's own bandwidth in ``directory`` with the SSD tier's I/O pattern: requests of
    STREAM_CHUNK_BYTES (1 MiB) in whole 4 KiB blocks, STREAM_DEPTH (4) in flight on a thread
    pool (``kvstore.daemon.aligned_io`` streams), O_DIRECT where the filesystem allows it
    (else buffered, as the tier falls back), no fsync (the data path issues none; the
    commit's sync is the put's, not the disk's), cycling through a file of 4 values or 64 MiB.
    Returns ``({size: {"put": write GB/s, "get": read GB/s}}, direct)``; the file is removed."""
    import mmap
    import os
    from concurrent.futures import ThreadPoolExecutor

    from kvstore.daemon.aligned_io import (BLOCK_BYTES, STREAM_CHUNK_BYTES, STREAM_DEPTH,
                                           open_direct)

    path = os.path.join(directory, f"kvstore-bench-disk-{os.getpid()}.tmp")
    request_bytes = min(STREAM_CHUNK_BYTES, -(-max(sizes) // BLOCK_BYTES) * BLOCK_BYTES)
    buffer = mmap.mmap(-1, request_bytes)          # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(request_bytes))
    fd, direct = open_direct(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    pool = ThreadPoolExecutor(STREAM_DEPTH)
    try:
        figures = {}
        for size_bytes in sizes:
            call_bytes = -(-size_bytes // BLOCK_BYTES) * BLOCK_BYTES
            file_bytes = max(4 * call_bytes, 64 << 20)
            os.posix_fallocate(fd, 0, file_bytes)
            state = {"offset": 0}

            def one_call(io) -> None:
                offset = state["offset"]
                if offset + call_bytes > file_bytes:
                    offset = 0
                starts = range(0, call_bytes, request_bytes)
                # NOTE: every request shares the one buffer: its bytes do not matter here
                list(pool.map(lambda done: io(fd, memoryview(buffer)[
                    :min(request_bytes, call_bytes - done)], offset + done), starts))
                state["offset"] = offset + call_bytes

            write = rate(lambda: one_call(lambda f, b, o: os.pwritev(f, [b], o)), size_bytes,
                         budget)
            state["offset"] = 0
            read = rate(lambda: one_call(lambda f, b, o: os.preadv(f, [b], o)), size_bytes,
                        budget)
            figures[size_bytes] = {"put": write, "get": read}
        return figures, direct
    finally:
        pool.shutdown()
        os.close(fd)
        os.unlink(path)
        buffer.close()
