"""A real etcd for the master HA tests: ``EtcdServer`` starts the ``etcd`` binary on
127.0.0.1 with free ports and a temporary data dir, waits until it answers, and stops it.

etcd is installed by ``scripts/install_etcd.sh`` (``make test`` runs it); where it is not on
PATH the ``etcd`` fixture skips with that reason. ``stop()`` + ``start()`` keep the data dir
and ports: etcd comes back with its keys and leases (an outage, not a new cluster).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ETCD_BIN = shutil.which("etcd")
SKIP_REASON = ("etcd is not installed: run scripts/install_etcd.sh as root (make test does), "
               "or apt-get install etcd-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One single-member etcd. ``url`` is its client URL (http://127.0.0.1:PORT)."""

    def __init__(self):
        self.data_dir = Path(tempfile.mkdtemp(prefix="kvstore-etcd-"))
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None
        self._log = open(self.data_dir / "etcd.log", "ab")
        self.start()

    def start(self, timeout_s: float = 30.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [ETCD_BIN, "--name", "kvstore-test", "--data-dir", str(self.data_dir / "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"kvstore-test={peer}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        end_s = time.monotonic() + timeout_s
        while time.monotonic() < end_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}); log: {self.log()[-2000:]}")
            if self.answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not answer within {timeout_s}s; log: {self.log()[-2000:]}")

    def answers(self) -> bool:
        request = urllib.request.Request(self.url + "/v3/kv/range",
                                         data=json.dumps({"key": "AA=="}).encode())
        try:
            with urllib.request.urlopen(request, timeout=0.5) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return (self.data_dir / "etcd.log").read_text(errors="replace")

    def stop(self) -> None:
        """SIGKILL (an outage: nothing is flushed on purpose) and reap. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
