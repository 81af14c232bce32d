"""Mooncake Store over TCP on loopback, measured the way bench/tcp_compare_bench.py measures
kvstore: 64 KiB put/get p50 and 4 MiB put/get GB/s, client and storage in two processes.

Runs inside a virtualenv holding ``mooncake-transfer-engine-non-cuda==0.3.13.post1``
(``scripts/mooncake_venv.sh`` makes one at .venv-mooncake; its master needs libibverbs1).
Processes: ``mooncake_master`` (rpc port, HTTP metadata server), a storage process that
mounts a segment (``global_segment_size``), and the measuring client, which mounts nothing,
so every byte goes through the transfer engine's TCP transport to the other process.

Called by bench/tcp_compare_bench.py as ``python mooncake_tcp_bench.py --json OUT`` with
``--phase NAME`` per interleaved round; also usable alone. Exit 0 and a JSON object of
sample lists (seconds) per metric.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

MiB = 1 << 20
SMALL = 64 * 1024
BIG = 4 * MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mooncake_master did not listen on {port}")


def make_store(master_port: int, http_port: int, segment_bytes: int):
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", f"http://127.0.0.1:{http_port}/metadata", segment_bytes,
                     256 * MiB, "tcp", "", f"127.0.0.1:{master_port}")
    if rc != 0:
        raise RuntimeError(f"mooncake setup failed: {rc}")
    return store


def storage_main(master_port: int, http_port: int) -> None:
    store = make_store(master_port, http_port, 1024 * MiB)
    print("ready", flush=True)
    sys.stdin.read()   # until the parent closes our stdin
    store.close()


def measure(store, rounds: int, per_round: int) -> dict[str, list[float]]:
    import numpy as np

    small = np.random.default_rng(2).integers(0, 256, SMALL, dtype=np.uint8).tobytes()
    big = np.random.default_rng(1).integers(0, 256, BIG, dtype=np.uint8).tobytes()
    samples: dict[str, list[float]] = {m: [] for m in (
        "put_64KiB", "get_64KiB", "get_into_64KiB", "put_4MiB", "get_4MiB", "get_into_4MiB")}
    # NOTE: get_into reads into memory registered with the transfer engine: Mooncake's
    # zero-copy read (get() returns new bytes)
    out = np.zeros(2 * BIG, dtype=np.uint8)
    out_ptr = out.ctypes.data
    if store.register_buffer(out_ptr, out.nbytes) != 0:
        raise RuntimeError("mooncake register_buffer failed")
    counter = 0
    for r in range(rounds + 1):   # round 0 is a warm-up, not kept
        keep = r > 0
        for metric, value, n in (("64KiB", small, per_round), ("4MiB", big, max(4, per_round // 8))):
            keys = []
            for _ in range(n):
                counter += 1
                key = f"mc/{metric}/{counter}"
                started = time.perf_counter()
                rc = store.put(key, value)
                elapsed = time.perf_counter() - started
                if rc != 0:
                    raise RuntimeError(f"mooncake put {key}: {rc}")
                keys.append(key)
                if keep:
                    samples[f"put_{metric}"].append(elapsed)
            for key in keys:
                started = time.perf_counter()
                got = store.get(key)
                elapsed = time.perf_counter() - started
                if len(got) != len(value):
                    samples.setdefault(f"get_{metric}_errors", []).append(len(got))
                    continue
                if keep:
                    samples[f"get_{metric}"].append(elapsed)
            for key in keys:
                started = time.perf_counter()
                got = store.get_into(key, out_ptr, len(value))
                elapsed = time.perf_counter() - started
                if got != len(value):
                    # NOTE: failures are counted, not fatal: 0.3.13 fails some 4 MiB TCP
                    # reads under load (get: empty bytes; get_into: -707)
                    samples.setdefault(f"get_into_{metric}_errors", []).append(got)
                    continue
                if keep:
                    samples[f"get_into_{metric}"].append(elapsed)
            for key in keys:
                store.remove(key)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=40)
    parser.add_argument("--json", required=True, help="where to write the samples")
    args = parser.parse_args()
    if args.storage:
        storage_main(*args.storage)
        return 0
    bin_dir = os.path.dirname(sys.executable)
    master_port, http_port = free_port(), free_port()
    master = subprocess.Popen(
        [os.path.join(bin_dir, "mooncake_master"), f"--rpc_port={master_port}",
         "--enable_http_metadata_server=true", f"--http_metadata_server_port={http_port}",
         "--http_metadata_server_host=127.0.0.1", "--default_kv_lease_ttl=100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = None
    try:
        wait_port(master_port)
        wait_port(http_port)
        storage = subprocess.Popen([sys.executable, __file__, "--storage", str(master_port),
                                    str(http_port), "--json", "-"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if storage.stdout.readline().strip() != "ready":
            raise RuntimeError("mooncake storage process failed to start")
        store = make_store(master_port, http_port, 0)
        samples = measure(store, args.rounds, args.per_round)
        store.close()
        with open(args.json, "w") as f:
            json.dump(samples, f)
    finally:
        if storage is not None:
            storage.stdin.close()
            try:
                storage.wait(timeout=10)
            except subprocess.TimeoutExpired:
                storage.kill()
        master.terminate()
        master.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
