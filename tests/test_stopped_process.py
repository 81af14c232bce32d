"""tests/stopped_process.py, which the durability tests stop daemons with: when
``stop_process`` returns every thread of the process is stopped (``os.kill(SIGSTOP)`` alone
returns before that, and a daemon then still confirmed a push: the intermittent failure of
test_durable_commit's stalled put, issue 10), the process answers nothing until SIGCONT and
then answers what was sent meanwhile, and a process that is gone is a clear error."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from crash_servers import daemon_process, data_plane, master_process
from stopped_process import stop_process, stopped, thread_states

from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status


def test_a_stopped_daemon_runs_no_thread_and_answers_only_after_sigcont():
    with master_process() as master, daemon_process(master, "--dram", "16MiB") as daemon:
        pid = daemon.proc.pid
        sock = data_plane(daemon.address)
        try:
            with stopped(pid):
                states = thread_states(pid)
                assert len(states) > 1 and set(states) <= set("Tt"), states
                sock.sendall(data_frames.encode_request(Op.PING, b"", 7, 0, 0))
                sock.settimeout(0.3)
                # NOTE: a running daemon answers a PING at once; a stopped one never does
                with pytest.raises(socket.timeout):
                    sock.recv(1)
            sock.settimeout(10)
            status, _, _, request_id, _ = data_frames.REPLY.unpack(
                data_frames.recv_exact(sock, data_frames.REPLY.size))
            assert (status, request_id) == (Status.OK, 7)   # answered once continued
            assert "T" not in thread_states(pid)
        finally:
            sock.close()


def test_stopping_a_process_that_is_gone_fails_naming_it():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while thread_states(proc.pid) not in ("Z", "X"):    # exited, not reaped yet
            assert time.monotonic() < deadline, thread_states(proc.pid)
            time.sleep(0.01)   # another process's exit: no clock of ours to advance
        with pytest.raises(AssertionError, match=f"process {proc.pid} is gone"):
            stop_process(proc.pid)
    finally:
        proc.wait()
