"""Where a small TCP transfer's time goes: a per-stage timeline of 64 KiB get and put over the
tcp transport, beside the floors measured in the same run.

Against a real ``kvstore master`` and ``kvstore daemon`` on loopback, one client with
``transport="tcp"`` (metadata over the fast path). Each stage is timed on its own, many times,
interleaved round by round so load drifts hit every stage alike:

- ``socket floor``: a raw request/reply of 64 KiB over one loopback TCP connection to a
  Python thread in another process (``recv_into``/``sendall``): a round trip plus two kernel
  copies, with no kvstore code; the floor of any TCP get.
- ``master rtt``: ``store.exists`` of an absent key (one fast-path round trip to the master).
- ``get_replicas``: the client's ``MasterClient.get_replicas_leased`` of one key.
- ``tcp read``: ``TcpTransport.read_into`` of the object's range (one data-plane round trip).
- ``checksum``: XXH3 of 64 KiB (what the client verifies every tcp read with).
- ``get_into``, ``get``: the whole client call; ``put``: the whole client put
  (PutStart, the tcp write, PutEnd with its durable commit).
- ``tcp write``: ``TcpTransport.write`` of 64 KiB into a range a PutStart allocated.

Prints p50 / p90 per stage (microseconds) and the load average, and writes
bench/out/tcp_timeline.json.

    .venv/bin/python bench/tcp_timeline_bench.py [--rounds 20] [--per-round 50]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kvstore
from kvstore._process import ServerProcess
from kvstore.client.checksum import checksum

from _daemon_ready import wait_registered

OUT_DIR = Path(__file__).resolve().parent / "out"
SMALL_BYTES = 64 * 1024


def _socket_server(port_queue, size: int) -> None:
    """One connection: for every 26-byte request, reply 16 bytes of header + ``size`` bytes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port_queue.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = memoryview(bytearray(16 + size))
    request = bytearray(26)
    while True:
        view, got = memoryview(request), 0
        while got < 26:
            n = conn.recv_into(view[got:])
            if n == 0:
                return
            got += n
        conn.sendall(payload)


def socket_floor_fn(size: int):
    """A callable doing one raw 64 KiB request/reply, and the server process to stop."""
    queue = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=_socket_server,
                                                        args=(queue, size), daemon=True)
    proc.start()
    sock = socket.create_connection(("127.0.0.1", queue.get(timeout=30)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(16 + size))
    request = b"\0" * 26

    def once(_i: int) -> None:
        sock.sendall(request)
        got = 0
        while got < len(buf):
            got += sock.recv_into(buf[got:])
    return once, proc, sock


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=50)
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(256 << 20)])
    floor, floor_proc, floor_sock = socket_floor_fn(SMALL_BYTES)
    samples: dict[str, list[float]] = {}
    try:
        with kvstore.connect(master.address, transport="tcp", lease_ttl_s=1.0,
                             metadata="fast") as store:
            wait_registered(store, 10)
            value = np.random.default_rng(1).integers(0, 256, SMALL_BYTES, dtype=np.uint8)
            out = np.empty_like(value)
            store.put("timeline/read", value)
            tcp = next(t for t in store._transfers.transports if t.name == "tcp")
            master_client = store._master

            def read_target():
                # NOTE: asked again every round: the read capability in it expires with the
                # 1 s lease, after which the daemon refuses the READ
                return master_client.get_replicas_leased(
                    ["timeline/read"], client_host_id="elsewhere", lease_ttl_s=1.0,
                    deadline=store._deadline(None))[0][0].targets[0]
            target = [read_target()]
            # a PENDING range of our own, written again and again (a write is idempotent),
            # revoked and started again each round so the pending timeout never reclaims it
            write_key = ["timeline/write/0"]

            def start_write_range() -> object:
                (slot,) = master_client.put_start([write_key[0]], [SMALL_BYTES],
                                                  client_id=store.client_id)
                return slot[0]
            write_target = [start_write_range()]
            put_counter = [0]

            def put(_i: int) -> None:
                put_counter[0] += 1
                store.put(f"timeline/put/{put_counter[0]}", value)

            def get_replicas(_i: int) -> None:
                master_client.get_replicas_leased(["timeline/read"], client_host_id="x",
                                                  lease_ttl_s=1.0,
                                                  deadline=store._deadline(None))

            out_view = memoryview(out).cast("B")
            src_view = memoryview(value).cast("B")
            stages = {
                "socket floor": floor,
                "master rtt (exists)": lambda i: store.exists("timeline/none"),
                "get_replicas": get_replicas,
                "tcp read": lambda i: tcp.read_into(target[0], out_view, timeout_s=5.0),
                "tcp write": lambda i: tcp.write(write_target[0], src_view, timeout_s=5.0),
                "checksum": lambda i: checksum(out_view),
                "get_into": lambda i: store.get_into("timeline/read", out),
                "get": lambda i: store.get("timeline/read"),
                "put": put,
            }
            for fn in stages.values():   # warm-up
                fn(-1)
            for _ in range(args.rounds):
                target[0] = read_target()
                for name, fn in stages.items():
                    bucket = samples.setdefault(name, [])
                    for i in range(args.per_round):
                        started = time.perf_counter()
                        fn(i)
                        bucket.append(time.perf_counter() - started)
                store.remove_prefix("timeline/put/", force=True)
                master_client.put_revoke([write_key[0]], client_id=store.client_id)
                write_key[0] = f"timeline/write/{len(samples['put'])}"
                write_target[0] = start_write_range()
    finally:
        floor_sock.close()
        floor_proc.terminate()
        for server in (daemon, master):
            server.close()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    rows = {name: {"p50_us": statistics.median(s) * 1e6,
                   "p90_us": float(np.percentile(s, 90)) * 1e6} for name, s in samples.items()}
    print(f"\n64 KiB over tcp, {args.rounds} rounds x {args.per_round}; load {load_before} -> "
          f"{load_after}\n")
    print(f"{'stage':24}{'p50 us':>10}{'p90 us':>10}")
    for name, row in rows.items():
        print(f"{name:24}{row['p50_us']:10.1f}{row['p90_us']:10.1f}")
    OUT_DIR.mkdir(exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_before": load_before, "load_after": load_after, "stages": rows,
              "python": sys.executable, "pid": os.getpid()}
    (OUT_DIR / "tcp_timeline.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
