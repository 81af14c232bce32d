"""Durable commit (issue 10): what a put costs, and the round trips the two designs add.

Against a real master process and daemon process on this host (shm, fast metadata path):
  - 64 KiB ``put`` p50/p99 (one key per call) and ``batch_put`` of 128 x 64 KiB in GB/s:
    run it from a tree before the change and from one after it, interleaved;
  - the pieces the two designs of the issue are made of: a master round trip (Exists, the
    cost of PutEnd's wire), a daemon data-plane round trip (PING), and the two sent together
    and both awaited (the critical path of "the client commits to the daemons in parallel
    with PutEnd"). The master-forwards design adds one daemon round trip after PutEnd's
    work, measured whole by the put p50 difference.
Prints a table and writes bench/out/commit_bench.json (facts: tree, load average).
``--master-arg`` passes a flag to the master: ``--master-arg=--no-client-commit`` measures
the master-pushed design, the default the client-parallel one (a tree whose master lacks
the flag fails to start: give it only to trees that have it). The script runs against the
tree of the Python that runs it, so one copy measures any tree:
``cd TREE && .venv/bin/python /path/to/commit_bench.py``.

``--designs`` (this tree only) runs three clusters at once, one per design (client commit
through the daemon's commit ring, client commit by CLIENT_COMMIT frame with the daemon's
``--no-commit-ring``, master push), and alternates every put and batch between them, so all
see the same load: the figures for choosing between the designs on a shared machine.
``--daemon-arg`` passes a flag to the daemon (``--daemon-arg=--no-commit-ring``).

    .venv/bin/python bench/commit_bench.py [--puts 2000] [--batches 40] [--rounds 3]
        [--master-arg=--no-client-commit] [--json PATH]
    .venv/bin/python bench/commit_bench.py --designs [--puts 2000] [--batches 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import time
from pathlib import Path

import kvstore
from kvstore._process import ServerProcess
from kvstore.bench.report import source_tree
from kvstore.rpc import connect_master
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op

OUT_DIR = Path(__file__).resolve().parent / "out"
VALUE_BYTES = 64 * 1024
BIG_BYTES = 4 << 20
BATCH = 128


def _put_latency_us(store, num_puts: int) -> tuple[float, float]:
    value = os.urandom(VALUE_BYTES)
    samples = []
    for i in range(num_puts):
        started = time.perf_counter()
        store.put(f"lat/{time.monotonic_ns()}/{i}", value)
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def _batch_gbps(store, num_batches: int) -> float:
    values = [os.urandom(VALUE_BYTES) for _ in range(BATCH)]
    started = time.perf_counter()
    for b in range(num_batches):
        keys = [f"batch/{time.monotonic_ns()}/{b}/{i}" for i in range(BATCH)]
        results = store.batch_put(keys, values)
        assert all(r is None for r in results), results[:3]
    return num_batches * BATCH * VALUE_BYTES / (time.perf_counter() - started) / 1e9


def _big_gbps(store, num_puts: int) -> float:
    """4 MiB puts, one per call: GB/s of the median put."""
    value = os.urandom(BIG_BYTES)
    samples = []
    for i in range(num_puts):
        started = time.perf_counter()
        store.put(f"big/{time.monotonic_ns()}/{i}", value)
        samples.append(time.perf_counter() - started)
    return BIG_BYTES / statistics.median(samples) / 1e9


def _data_plane(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    data_frames.configure_socket(sock)
    sock.sendall(data_frames.encode_hello(None))
    _read_reply(sock)
    return sock


def _read_reply(sock: socket.socket) -> None:
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    msg_len = data_frames.REPLY.unpack(header)[2]
    if msg_len:
        data_frames.recv_exact(sock, msg_len)


def _round_trips_us(master_address: str, daemon_address: str, count: int) -> dict:
    """p50 of a master round trip, a daemon PING, and both sent at once (both awaited)."""
    client, _ = connect_master(master_address, metadata="fast")
    sock = _data_plane(daemon_address)
    ping = data_frames.encode_request(Op.PING, b"", 1, 0, 0)
    master_us, daemon_us, both_us = [], [], []
    try:
        for _ in range(count):
            started = time.perf_counter()
            client.exists(["k"])
            master_us.append((time.perf_counter() - started) * 1e6)
            started = time.perf_counter()
            sock.sendall(ping)
            _read_reply(sock)
            daemon_us.append((time.perf_counter() - started) * 1e6)
            started = time.perf_counter()
            sock.sendall(ping)            # the client's commit to the daemon, then PutEnd
            client.exists(["k"])
            _read_reply(sock)
            both_us.append((time.perf_counter() - started) * 1e6)
    finally:
        sock.close()
        client.close()
    return {"master_rtt_p50_us": statistics.median(master_us),
            "daemon_rtt_p50_us": statistics.median(daemon_us),
            "parallel_p50_us": statistics.median(both_us)}


#: design -> (master flags, daemon flags). NOTE: "ring" is the client commit through the
#: daemon's commit ring for shm puts (the default), "frame" the same design with
#: --no-commit-ring (one CLIENT_COMMIT frame per daemon per batch).
DESIGN_FLAGS = {"client ring": ([], []), "client frame": ([], ["--no-commit-ring"]),
                "master push": (["--no-client-commit"], [])}


def _designs(args) -> None:
    """Both designs of this tree, every operation alternated between their clusters."""
    stack = contextlib.ExitStack()
    stores = {}
    with stack:
        for name, (flags, daemon_flags) in DESIGN_FLAGS.items():
            master = stack.enter_context(ServerProcess(
                ["master", "--host", "127.0.0.1", "--port", "0", *flags]))
            stack.enter_context(ServerProcess(
                ["daemon", "--master", master.address, "--host", "127.0.0.1", "--port", "0",
                 "--dram", "1GiB", *daemon_flags]))
            stores[name] = stack.enter_context(kvstore.connect(master.address,
                                                               transport="auto"))
            stores[name].put("warm", b"w" * VALUE_BYTES)
        small, big = os.urandom(VALUE_BYTES), os.urandom(BIG_BYTES)
        batch_values = [os.urandom(VALUE_BYTES) for _ in range(BATCH)]
        samples = {name: {"put": [], "batch": [], "big": []} for name in stores}
        loads = [Path("/proc/loadavg").read_text().split()[0]]
        for i in range(args.puts):
            for name, store in stores.items():
                started = time.perf_counter()
                store.put(f"lat/{i}", small)
                samples[name]["put"].append(time.perf_counter() - started)
        for b in range(args.batches):
            for name, store in stores.items():
                keys = [f"batch/{b}/{j}" for j in range(BATCH)]
                started = time.perf_counter()
                assert all(r is None for r in store.batch_put(keys, batch_values))
                samples[name]["batch"].append(time.perf_counter() - started)
            for name, store in stores.items():
                started = time.perf_counter()
                store.put(f"big/{b}", big)
                samples[name]["big"].append(time.perf_counter() - started)
        loads.append(Path("/proc/loadavg").read_text().split()[0])
    rows = {name: {"put_p50_us": statistics.median(s["put"]) * 1e6,
                   "batch_put_gbps": BATCH * VALUE_BYTES / statistics.median(s["batch"]) / 1e9,
                   "put_4mib_gbps": BIG_BYTES / statistics.median(s["big"]) / 1e9}
            for name, s in samples.items()}
    print(f"tree: {source_tree()}  designs alternated per operation, load {' -> '.join(loads)}")
    print(f"{'design':>14} {'put p50 us':>11} {'batch GB/s':>11} {'4MiB GB/s':>11}")
    for name, r in rows.items():
        print(f"{name:>14} {r['put_p50_us']:11.0f} {r['batch_put_gbps']:11.2f} "
              f"{r['put_4mib_gbps']:11.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"tree": source_tree(), "designs": rows, "loadavg": loads},
                                    indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--master-arg", action="append", default=[],
                        help="a flag for the master (repeatable)")
    parser.add_argument("--daemon-arg", action="append", default=[],
                        help="a flag for the daemon (repeatable)")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "commit_bench.json")
    parser.add_argument("--designs", action="store_true",
                        help="both designs of this tree, alternated per operation")
    args = parser.parse_args()
    if args.designs:
        _designs(args)
        return
    rows = []
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                        *args.master_arg]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                           "--port", "0", "--dram", "1GiB", *args.daemon_arg]) as daemon:
        with kvstore.connect(master.address, transport="auto") as store:
            store.put("warm", b"w" * VALUE_BYTES)
            for _ in range(args.rounds):
                p50, p99 = _put_latency_us(store, args.puts)
                gbps = _batch_gbps(store, args.batches)
                big = _big_gbps(store, 30)
                store.remove_prefix("lat/")
                store.remove_prefix("batch/")
                store.remove_prefix("big/")
                trips = _round_trips_us(master.address, daemon.address, 500)
                rows.append({"put_p50_us": p50, "put_p99_us": p99, "batch_put_gbps": gbps,
                             "put_4mib_gbps": big,
                             **trips, "loadavg": Path("/proc/loadavg").read_text().split()[:3]})
    print(f"tree: {source_tree()}  master flags: {' '.join(args.master_arg) or '(defaults)'}"
          f"  daemon flags: {' '.join(args.daemon_arg) or '(defaults)'}")
    print(f"{'put p50 us':>11} {'put p99 us':>11} {'batch GB/s':>11} {'4MiB GB/s':>11} "
          f"{'master rtt':>11} "
          f"{'daemon rtt':>11} {'both, par.':>11}  load")
    for r in rows:
        print(f"{r['put_p50_us']:11.0f} {r['put_p99_us']:11.0f} {r['batch_put_gbps']:11.2f} "
              f"{r['put_4mib_gbps']:11.2f} "
              f"{r['master_rtt_p50_us']:11.0f} {r['daemon_rtt_p50_us']:11.0f} "
              f"{r['parallel_p50_us']:11.0f}  {' '.join(r['loadavg'])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"tree": source_tree(), "master_args": args.master_arg,
                                     "daemon_args": args.daemon_arg,
                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
