"""An idle process holding a NIXL agent costs (almost) no CPU: its progress thread sleeps in
poll() instead of busy-polling (kvstore/transport/nixl_lib.py, PROGRESS_POLL_TIMEOUT_US).

Measured as the time the process's threads were runnable (on a CPU or waiting for one:
/proc/PID/task/*/schedstat), not as CPU time: a spinning thread is runnable all the time
whatever the machine's load, so the measure does not shrink on a loaded machine the way CPU
time does. Before the fix an idle ``kvstore daemon --nixl`` was runnable ~1.0 s per second
(one spinning thread); after, ~0.01.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from servers import ServerProcess

from kvstore.rpc import grpc_client
from kvstore.transport import nixl_installed

pytestmark = pytest.mark.skipif(not nixl_installed(), reason="NIXL is not installed "
                                "(make test installs it: requirements-nixl.txt)")
WINDOW_S = 3.0
#: runnable seconds per second allowed while idle: a spinning thread alone scores ~1.0
MAX_RUNNABLE_FRACTION = 0.2

if not os.path.exists("/proc/self/schedstat"):
    pytest.skip("this kernel has no /proc/PID/schedstat", allow_module_level=True)


def runnable_s(pid: int) -> float:
    """Seconds the threads of ``pid`` spent on a CPU or waiting in a run queue so far."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                on_cpu_ns, waiting_ns, _ = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue    # a thread that ended meanwhile
        total_ns += int(on_cpu_ns) + int(waiting_ns)
    return total_ns / 1e9


def runnable_fraction(pid: int, window_s: float = WINDOW_S) -> float:
    start_s, start_wall_s = runnable_s(pid), time.monotonic()
    time.sleep(window_s)
    return (runnable_s(pid) - start_s) / (time.monotonic() - start_wall_s)


def test_idle_nixl_daemon_uses_no_core():
    with ServerProcess(["master", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "64MiB", "--nixl",
                           "--node-id", "nixl-idle"]) as daemon:
        with grpc_client(master.address) as client:
            deadline_s = time.monotonic() + 60
            while not any(n.node_id == "nixl-idle" and n.nixl_metadata
                          for n in client.list_nodes()):
                assert time.monotonic() < deadline_s, "the daemon never registered"
                time.sleep(0.05)
        fraction = runnable_fraction(daemon.proc.pid)
        assert fraction < MAX_RUNNABLE_FRACTION, (
            f"an idle --nixl daemon was runnable {fraction:.2f} s per second (a busy-polling "
            f"progress thread?)")


def test_idle_client_agent_uses_no_core():
    """The client's agent has the same progress thread (nixl_lib.new_agent)."""
    code = textwrap.dedent("""
        import sys
        from kvstore.transport.nixl_lib import new_agent
        handle = new_agent("client")
        print("ready", flush=True)
        sys.stdin.read()
        handle.release()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        fraction = runnable_fraction(proc.pid)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert fraction < MAX_RUNNABLE_FRACTION, (
        f"an idle client agent was runnable {fraction:.2f} s per second")
