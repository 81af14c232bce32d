"""Helpers of the client and cluster tests: a real cluster of processes, and a second client
process (a "peer") driven over stdin/stdout.

``Cluster`` starts one ``kvstore master`` and N ``kvstore daemon`` processes on 127.0.0.1
(port 0) and waits until the master lists every daemon. ``Peer`` runs ``PEER_SCRIPT`` in its
own Python process: a separate client with its own KVStore, answering one JSON line per
command, so tests can put from one process and get from another.
"""

from __future__ import annotations

import _posixshmem
import json
import subprocess
import sys
import time

import numpy as np

from servers import ServerProcess

import kvstore
from raw_master import RawMaster
from kvstore.v1 import master_pb2


def payload(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (the same in every process)."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class Cluster:
    """One master process and ``num_daemons`` daemon processes. Close with ``close()``."""

    def __init__(self, *, num_daemons: int = 2, dram: str = "256MiB",
                 master_args: tuple[str, ...] = (), token: str | None = None,
                 daemon_args: tuple[str, ...] = ()):
        token_args = ["--token", token] if token else []
        self.master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                                     *token_args, *master_args])
        self.address = self.master.address
        self.token = token
        self.daemons: list[ServerProcess] = []
        try:
            for _ in range(num_daemons):
                self.daemons.append(ServerProcess(
                    ["daemon", "--master", self.address, "--host", "127.0.0.1", "--port", "0",
                     "--dram", dram, *token_args, *daemon_args]))
            self.wait_nodes(num_daemons)
        except BaseException:
            self.close()
            raise

    def wait_nodes(self, num_nodes: int, timeout_s: float = 20.0) -> None:
        """Wait until the master lists ``num_nodes`` nodes (daemons register asynchronously)."""
        master = RawMaster.over_grpc(self.address, token=self.token)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                reply = master.call("ListNodes", master_pb2.ListNodesRequest())
                if len(reply.nodes) >= num_nodes:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(reply.nodes)} of {num_nodes} daemons "
                                       f"registered; stderr: {[d.stderr() for d in self.daemons]}")
                time.sleep(0.05)  # polling another process's readiness: no clock to advance
        finally:
            master.close()

    def kill_daemon(self, index: int) -> None:
        """SIGKILL daemon ``index`` (a crash) and unlink the shm segments it can no longer
        unlink itself, so killed daemons leave nothing behind in /dev/shm. Mappings that
        clients hold stay valid until they unmap."""
        daemon = self.daemons[index]
        master = RawMaster.over_grpc(self.address, token=self.token)
        try:
            nodes = master.call("ListNodes", master_pb2.ListNodesRequest()).nodes
        finally:
            master.close()
        names = [segment.shm_name for node in nodes
                 if node.data_addr == daemon.address for segment in node.segments
                 if segment.shm_name]
        daemon.kill()
        from kvstore._loc_table import table_name
        names += [table_name(name) for name in names if table_name(name)]   # their tables
        for name in names:
            try:
                _posixshmem.shm_unlink(name)
            except FileNotFoundError:
                pass

    def connect(self, **options) -> "kvstore.KVStore":
        return kvstore.connect(self.address, token=self.token, **options)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()
        self.master.close()


PEER_SCRIPT = r"""
import json, sys
import numpy as np
import xxhash
import kvstore

def payload(size, seed):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()

store = kvstore.connect(sys.argv[1], transport=sys.argv[2])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "put":
            store.put(cmd["key"], payload(cmd["size"], cmd["seed"]))
            answer = {"ok": True}
        elif cmd["op"] == "get":
            data = store.get(cmd["key"])
            answer = {"ok": True, "size": len(data), "xxh3": xxhash.xxh3_64_intdigest(data)}
        elif cmd["op"] == "stats":
            answer = {"ok": True, "transfers": store.stats()["transfers"]}
        else:
            answer = {"ok": False, "error": "unknown op"}
    except kvstore.KVStoreError as exc:
        answer = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)}
    print(json.dumps(answer), flush=True)
store.close()
"""


class Peer:
    """A second client process connected to ``address`` with ``transport``."""

    def __init__(self, address: str, transport: str):
        self.proc = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, address, transport],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer client exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
