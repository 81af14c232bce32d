"""Helpers of the master HA tests: ``HaCluster`` runs N ``kvstore master --etcd`` processes
of one cluster and M daemons that follow its leader through ``etcd://``; ``LoadWorker`` is a
separate client process putting and getting through the cluster while a test breaks it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from servers import ServerProcess

from kvstore.ha.cluster import ClusterKeys, MasterInfo, read_leader
from kvstore.ha.etcd import EtcdClient, EtcdUnavailableError

#: The election TTL the tests run with (the default): a dead leader's key lasts this long.
ELECTION_TTL_S = 3


class HaCluster:
    """``num_masters`` masters and ``num_daemons`` daemons of cluster ``name`` on ``etcd``."""

    def __init__(self, etcd, *, name: str = "ha", num_masters: int = 2, num_daemons: int = 1,
                 dram: str = "64MiB", master_args: tuple[str, ...] = ()):
        self.etcd_server, self.name = etcd, name
        self.etcd = EtcdClient(etcd.url)
        self.keys = ClusterKeys(name)
        self.spec = f"etcd://127.0.0.1:{etcd.client_port}/{name}"
        self.masters: list[ServerProcess] = []
        self.daemons: list[ServerProcess] = []
        try:
            for _ in range(num_masters):
                self.masters.append(self.start_master(*master_args))
            self.wait_leader(min_epoch=1)
            for _ in range(num_daemons):
                self.daemons.append(ServerProcess(
                    ["daemon", "--master", self.spec, "--host", "127.0.0.1", "--port", "0",
                     "--dram", dram]))
        except BaseException:
            self.close()
            raise

    def start_master(self, *args: str) -> ServerProcess:
        return ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", "--etcd",
                              self.etcd_server.url, "--cluster", self.name,
                              "--election-ttl", str(ELECTION_TTL_S), *args])

    def wait_leader(self, *, min_epoch: int, timeout_s: float = 30.0) -> MasterInfo:
        """The leader of epoch >= ``min_epoch`` once etcd names one (polling etcd: another
        process's state, no clock to advance)."""
        end_s = time.monotonic() + timeout_s
        while True:
            try:
                leader = read_leader(self.etcd, self.keys)
                if leader is not None and leader.epoch >= min_epoch:
                    return leader
            except EtcdUnavailableError:
                pass
            if time.monotonic() > end_s:
                raise AssertionError(f"no leader of epoch >= {min_epoch} within {timeout_s}s; "
                                     f"masters' logs: {[m.stderr()[-1500:] for m in self.masters]}")
            time.sleep(0.05)

    def master_of(self, leader: MasterInfo) -> ServerProcess:
        return next(m for m in self.masters if m.address == leader.grpc_address)

    def close(self) -> None:
        for process in [*self.daemons, *self.masters]:
            if process.proc.poll() is None:
                try:
                    os.kill(process.proc.pid, signal.SIGCONT)   # a test may have stopped it
                except ProcessLookupError:
                    pass
            process.close(grace_s=5)


WORKER_SCRIPT = r"""
import json, sys, threading, time
import numpy as np
import kvstore

spec, worker, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = kvstore.connect(spec, timeout_s=30)

def control():
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    stopping.set()

def value(i):
    return np.random.default_rng(worker * 1_000_003 + i).integers(0, 256, size, np.uint8).tobytes()

stopping = threading.Event()
threading.Thread(target=control, daemon=True).start()
acked, i = [], 0
def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n"); sys.stdout.flush()
while not stopping.is_set():
    key = f"ha/{worker}/{i}"
    try:
        store.put(key, value(i))
        acked.append(i)
        emit(event="acked", key=key, i=i, t=time.time())
    except kvstore.KVStoreError as exc:
        emit(event="put_error", key=key, t=time.time(), error=str(exc)[:300])
    if acked:
        j = acked[(i * 7919) % len(acked)]
        try:
            got = store.get(f"ha/{worker}/{j}")
            if got != value(j):
                emit(event="wrong", key=f"ha/{worker}/{j}")
        except kvstore.KVStoreError as exc:
            emit(event="get_error", key=f"ha/{worker}/{j}", t=time.time(), error=str(exc)[:300])
    i += 1
store.close()
emit(event="done", n=len(acked))
"""


class LoadWorker:
    """A client process putting ``ha/WORKER/i`` (deterministic values) and reading back
    what it put, each outcome one JSON line (``events``)."""

    def __init__(self, spec: str, worker: int, value_bytes: int = 16 * 1024):
        self.worker, self.value_bytes = worker, value_bytes
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, spec, str(worker),
                                      str(value_bytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.events.append(json.loads(line))
                self._changed.notify_all()

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate, timeout_s: float = 60.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.events), timeout_s):
                raise AssertionError(f"worker {self.worker}: condition not met in {timeout_s}s; "
                                     f"last events {self.events[-5:]}; stderr "
                                     f"{self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def of(self, event: str) -> list[dict]:
        return [e for e in list(self.events) if e["event"] == event]

    def stop(self) -> None:
        try:
            self.send("stop")
        except BrokenPipeError:
            pass
        self.wait_for(lambda events: any(e["event"] == "done" for e in events), 60)
        self.proc.wait(timeout=30)
