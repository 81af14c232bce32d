"""Master failover time (issue 10): from the leader's death to a new leader in etcd, and to a
client's put answered again.

Starts a real etcd (the ``etcd`` binary: scripts/install_etcd.sh), two ``kvstore master
--etcd`` processes of one cluster and one daemon following it through ``etcd://``, and a
client connected through ``etcd://`` in this process. Each round kills the leader (SIGTERM:
it revokes its lease; SIGKILL: its lease must expire, TTL 3 s), then times:
  - ``leader_s``: until etcd names a leader of a newer epoch (read every 10 ms here);
  - ``put_s``: until one put, sent right after the kill through the client that knew the
    old leader, returns (the client must notice, find the new leader, and the new leader
    must have taken over: every daemon re-registered, or --takeover-wait passed).
The killed master is started again as a standby before the next round. Run it with the
python of the tree to measure (each tree's own carrier, election and daemon code run):

    /work/base1/.venv/bin/python bench/ha_takeover_bench.py --rounds 3   # before
    .venv/bin/python bench/ha_takeover_bench.py --rounds 3               # after

Prints a table and writes bench/out/ha_takeover_bench.json (facts: tree, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import kvstore
from kvstore._process import ServerProcess
from kvstore.bench.report import source_tree
from kvstore.ha.cluster import ClusterKeys, read_leader
from kvstore.ha.etcd import EtcdClient, EtcdUnavailableError

OUT_DIR = Path(__file__).resolve().parent / "out"
CLUSTER = "takeover"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Etcd:
    def __init__(self):
        binary = shutil.which("etcd")
        if binary is None:
            raise SystemExit("etcd is not installed: run scripts/install_etcd.sh as root")
        self.dir = tempfile.mkdtemp(prefix="kvstore-bench-etcd-")
        client, peer = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.proc = subprocess.Popen(
            [binary, "--name", "b", "--data-dir", f"{self.dir}/data",
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"b={peer_url}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise SystemExit("etcd did not start")
                time.sleep(0.05)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _master(etcd_url: str) -> ServerProcess:
    return ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", "--etcd", etcd_url,
                          "--cluster", CLUSTER, "--election-ttl", "3"])


def _leader(etcd: EtcdClient, keys: ClusterKeys, min_epoch: int, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            leader = read_leader(etcd, keys)
            if leader is not None and leader.epoch >= min_epoch:
                return leader
        except EtcdUnavailableError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no leader of epoch >= {min_epoch} within {timeout_s}s")
        time.sleep(0.01)


def _round(sig, masters, etcd, keys, store, value, n) -> dict:
    leader = _leader(etcd, keys, 1)
    victim = next(m for m in masters if m.address == leader.grpc_address)
    store.put(f"warm/{sig.name}/{n}", value)          # the client knows this leader
    started = time.monotonic()
    os.kill(victim.proc.pid, sig)
    new = _leader(etcd, keys, leader.epoch + 1)
    leader_s = time.monotonic() - started
    store.put(f"after/{sig.name}/{n}", value)
    put_s = time.monotonic() - started
    victim.close(grace_s=5)
    masters[masters.index(victim)] = _master(etcd.url)   # back as a standby
    return {"signal": sig.name, "round": n, "leader_s": leader_s, "put_s": put_s,
            "new_epoch": new.epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per signal")
    args = parser.parse_args()
    etcd_server = _Etcd()
    masters, daemon = [], None
    try:
        etcd, keys = EtcdClient(etcd_server.url), ClusterKeys(CLUSTER)
        masters = [_master(etcd_server.url), _master(etcd_server.url)]
        _leader(etcd, keys, 1)
        spec = f"etcd://{etcd_server.url[len('http://'):]}/{CLUSTER}"
        daemon = ServerProcess(["daemon", "--master", spec, "--host", "127.0.0.1", "--port",
                                "0", "--dram", "64MiB"])
        value = os.urandom(64 * 1024)
        rows = []
        with kvstore.connect(spec, timeout_s=30) as store:
            store.put("warm/first", value)
            for n in range(args.rounds):
                for sig in (signal.SIGTERM, signal.SIGKILL):   # interleaved
                    rows.append(_round(sig, masters, etcd, keys, store, value, n))
                    print(f"  {rows[-1]['signal']:8s} round {n}: leader {rows[-1]['leader_s']:.3f}s"
                          f"  put {rows[-1]['put_s']:.3f}s", flush=True)
    finally:
        if daemon is not None:
            daemon.close()
        for master in masters:
            master.close(grace_s=5)
        etcd_server.close()
    load = open("/proc/loadavg").read().split()[:3]
    print(f"\ntree {source_tree()}; load {' '.join(load)}")
    print(f"{'signal':8s} {'leader s (min/med/max)':>26s} {'put s (min/med/max)':>26s}")
    summary = {}
    for name in ("SIGTERM", "SIGKILL"):
        mine = [r for r in rows if r["signal"] == name]
        stats = {what: [min(r[what] for r in mine), statistics.median(r[what] for r in mine),
                        max(r[what] for r in mine)] for what in ("leader_s", "put_s")}
        summary[name] = stats
        print(f"{name:8s} {'/'.join(f'{v:.3f}' for v in stats['leader_s']):>26s} "
              f"{'/'.join(f'{v:.3f}' for v in stats['put_s']):>26s}")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "ha_takeover_bench.json").write_text(json.dumps(
        {"tree": source_tree(), "loadavg": load, "rounds": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
