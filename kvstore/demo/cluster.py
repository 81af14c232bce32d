"""A kvstore cluster on this machine: ``kvstore master`` and ``kvstore daemon`` processes on
loopback, for the demo and the examples.

Each server is a ``kvstore._process.ServerProcess``: the ``kvstore`` console script on port
0, its address read from the ``listening on HOST:PORT`` line it prints. ``LocalCluster`` is a
context manager: leaving it (normally, on an exception or on Ctrl-C) terminates the daemon,
then the master (SIGTERM, then SIGKILL after a grace period) and waits for both, so no
server outlives the demo.
"""

from __future__ import annotations

import time

from kvstore._errors import KVStoreError
from kvstore._process import ServerProcess


class LocalCluster:
    """A master and one daemon with ``dram`` of DRAM, on 127.0.0.1."""

    def __init__(self, *, dram: str = "2GiB"):
        self.dram = dram
        self.master: ServerProcess | None = None
        self.daemon: ServerProcess | None = None

    @property
    def address(self) -> str:
        """The master's ``HOST:PORT`` (what clients ``connect`` to)."""
        if self.master is None:
            raise KVStoreError("cluster is not started")
        return self.master.address

    def start(self) -> "LocalCluster":
        started = time.perf_counter()
        try:
            self.master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
            self.daemon = ServerProcess(["daemon", "--master", self.master.address, "--host",
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
                server.close()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
