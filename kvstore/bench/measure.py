"""Measuring primitives of ``kvstore bench``: rates beside a memcpy ceiling, latency
percentiles, a raw loopback TCP ceiling and CPU accounting. No kvstore state is touched."""

from __future__ import annotations

import statistics
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


def loopback_gbps(sizes: list[int], min_time_s: float) -> dict[int, float]:
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
                result[size_bytes] = rate(send_one, size_bytes, min_time_s)
            return result
    finally:
        sink.kill()
        sink.wait()


def _round(fn, round_s: float) -> tuple[int, float]:
    """Call ``fn`` for at least ``round_s`` (and twice); return (calls, elapsed seconds)."""
    num_calls, started_s = 0, time.perf_counter()
    while True:
        fn()
        num_calls += 1
        elapsed_s = time.perf_counter() - started_s
        if num_calls >= 2 and elapsed_s >= round_s:
            return num_calls, elapsed_s


def _round_gbps(fn, bytes_per_call: int, round_s: float) -> float:
    num_calls, elapsed_s = _round(fn, round_s)
    return bytes_per_call * num_calls / elapsed_s / 1e9


def rate(fn, bytes_per_call: int, min_time_s: float, num_rounds: int = 3) -> float:
    """GB/s of ``fn``: the best of ``num_rounds`` rounds of at least ``min_time_s / num_rounds``
    (and 2 calls) each. NOTE: best-of-rounds, for the ceilings too, because the machine may be
    shared: a round that another process interrupted says nothing about our code."""
    fn()  # warm-up
    return max(_round_gbps(fn, bytes_per_call, min_time_s / num_rounds)
               for _ in range(num_rounds))


def rate_beside_memcpy(fn, bytes_per_call: int, min_time_s: float, cpu_probe,
                       num_rounds: int = 3) -> tuple[float, float, float]:
    """(GB/s of ``fn``, GB/s of one memcpy of ``bytes_per_call``, CPU s/GB of ``fn``).

    Rounds of ``fn`` and of the memcpy alternate and the best of each is kept, so the ceiling
    is measured in the same moments as the figure it bounds; CPU is counted in ``fn``'s
    rounds only.
    """
    import numpy as np

    src = np.ones(bytes_per_call, np.uint8)
    dst = np.empty_like(src)
    copy = lambda: np.copyto(dst, src)  # noqa: E731
    fn()
    copy()
    best_gbps = best_copy_gbps = cpu_s = 0.0
    total_calls = 0
    for _ in range(num_rounds):
        cpu_before_s = cpu_probe()
        num_calls, elapsed_s = _round(fn, min_time_s / num_rounds)
        cpu_s += cpu_probe() - cpu_before_s
        total_calls += num_calls
        best_gbps = max(best_gbps, bytes_per_call * num_calls / elapsed_s / 1e9)
        best_copy_gbps = max(best_copy_gbps,
                             _round_gbps(copy, bytes_per_call, min_time_s / num_rounds / 2))
    return best_gbps, best_copy_gbps, cpu_s / (total_calls * bytes_per_call / 1e9)


def latencies_us(fn, num_calls: int) -> tuple[float, float]:
    fn()
    samples = []
    for _ in range(num_calls):
        started_s = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started_s) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


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
