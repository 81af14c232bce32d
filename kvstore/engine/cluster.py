"""A kvstore cluster on this machine: ``kvstore master`` and ``kvstore daemon`` processes on
loopback, for the demo and the examples.

Each server is started with the ``kvstore`` console script on port 0; its address is read from
the ``listening on HOST:PORT`` line it prints. ``LocalCluster`` is a context manager: leaving it
(normally, on an exception or on Ctrl-C) terminates the daemon, then the master (SIGTERM, then
SIGKILL after a grace period) and waits for both, so no server outlives the demo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kvstore._errors import KVStoreError

_LISTENING_RE = re.compile(r"^listening on (\S+):(\d+)\s*$")


def kvstore_executable() -> str:
    """The ``kvstore`` console script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("kvstore")
    if beside.exists():
        return str(beside)
    found = shutil.which("kvstore")
    if found is None:
        raise KVStoreError("the `kvstore` console script is not installed (pip install -e .)")
    return found


class ServerHandle:
    """One server process; ``address`` is ``HOST:PORT`` as the server printed it."""

    def __init__(self, args: list[str], *, start_timeout_s: float = 60.0):
        self.args = [kvstore_executable(), *args]
        self.log = tempfile.NamedTemporaryFile(prefix="kvstore-demo-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.address = self._wait_listening(start_timeout_s)
        # keep reading stdout so a chatty server never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_listening(self, timeout_s: float) -> str:
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                match = _LISTENING_RE.match(line.strip())
                if match:
                    found.append(f"{match.group(1)}:{match.group(2)}")
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not found:
            self.stop()
            raise KVStoreError(f"`{' '.join(self.args[1:])}` printed no 'listening on' line in "
                               f"{timeout_s:.0f}s; its log:\n{self.log_text()}")
        return found[0]

    def _drain(self) -> None:
        for _ in self.proc.stdout:  # type: ignore[union-attr]
            pass

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate and reap the process (idempotent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace_s)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


class LocalCluster:
    """A master and one daemon with ``dram`` of DRAM, on 127.0.0.1."""

    def __init__(self, *, dram: str = "2GiB"):
        self.dram = dram
        self.master: ServerHandle | None = None
        self.daemon: ServerHandle | None = None

    @property
    def address(self) -> str:
        """The master's ``HOST:PORT`` (what clients ``connect`` to)."""
        if self.master is None:
            raise KVStoreError("cluster is not started")
        return self.master.address

    def start(self) -> "LocalCluster":
        started = time.perf_counter()
        try:
            self.master = ServerHandle(["master", "--host", "127.0.0.1", "--port", "0"])
            self.daemon = ServerHandle(["daemon", "--master", self.master.address, "--host",
                                        "127.0.0.1", "--port", "0", "--dram", self.dram])
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started
        return self

    def stop(self) -> None:
        """Stop the daemon first (it deregisters from a live master), then the master."""
        for server in (self.daemon, self.master):
            if server is not None:
                server.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
