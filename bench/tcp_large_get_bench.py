"""Where a 4 MiB TCP get's time goes: its stages, first and repeated reads, for several trees
side by side, beside the loopback ceiling measured in the same run.

Per tree (``--python``, repeatable: e.g. /work/base2/.venv/bin/python and this tree's) one
child runs a real ``kvstore master`` and ``kvstore daemon`` on loopback and one client with
``transport="tcp"`` (metadata over the fast path); rounds interleave the trees
(bench/_rounds.py). Stages, each timed ``--per-round`` times per round:

- ``ceiling N conn``: a raw 4 MiB read split evenly over N loopback TCP connections in
  parallel (N = 1, 2, 4, 8), to a Python thread per connection in another process
  (``sendall`` / ``recv_into``): no kvstore code; the floor of any 4 MiB TCP get.
- ``get_replicas``: ``MasterClient.get_replicas_leased`` of one key (a master round trip).
- ``keyed refused``: a KEYED_READ of the key with the limit a first get sends (below
  2 stripes): what the daemon answers a value it does not serve at home (TOO_LARGE), or,
  in a tree whose daemon serves large keyed reads, the whole read.
- ``tcp read``: ``TcpTransport.read_into`` of the object's range (striped: 4 x 1 MiB);
  ``tcp read N stripes``: the same with N stripes of 4 MiB / N (a transport of its own).
- ``checksum``: XXH3 of 4 MiB (every tcp read is verified).
- ``new bytes``: ``new_bytes`` of 4 MiB with every page written (what ``get`` allocates).
- ``get first`` / ``get_into first``: the client call on keys never read (home read or the
  master); ``get again`` / ``get_into again``: the same keys again (the location cache).

Prints per stage the median over rounds of each round's p50 (with the range) in ms and the
GB/s of that p50, per tree, and the load average; writes bench/out/tcp_large_get.json.

    .venv/bin/python bench/tcp_large_get_bench.py --python /work/base2/.venv/bin/python \
        --python .venv/bin/python [--rounds 3] [--per-round 24]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _rounds  # noqa: E402
from _daemon_ready import wait_registered  # noqa: E402

SIZE = 4 << 20
STREAMS = 4
#: the connection counts the ceiling and the striped read are measured with
WAYS = (1, 2, 4, 8)
REQUEST_BYTES = 8


def _serve_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = memoryview(bytearray(SIZE))
    request = bytearray(REQUEST_BYTES)
    while True:
        view, got = memoryview(request), 0
        while got < REQUEST_BYTES:
            n = conn.recv_into(view[got:])
            if n == 0:
                return
            got += n
        conn.sendall(payload[:int.from_bytes(request, "little")])


def _ceiling_server(port_queue) -> None:
    """Accept connections; each: for every 8-byte request (a length), that many bytes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port_queue.put(listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def ceiling_fns(executor):
    """{connections: one raw 4 MiB read split evenly over that many connections in
    parallel}, the server process and the sockets."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=_ceiling_server, args=(queue,), daemon=True)
    proc.start()
    port = queue.get(timeout=30)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(max(WAYS))]
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(SIZE))

    def fetch(sock, view) -> None:
        sock.sendall(len(view).to_bytes(REQUEST_BYTES, "little"))
        got = 0
        while got < len(view):
            got += sock.recv_into(view[got:])

    def split(ways: int):
        part = SIZE // ways

        def once(_i) -> None:
            futures = [executor.submit(fetch, socks[s], buf[s * part:(s + 1) * part])
                       for s in range(1, ways)]
            fetch(socks[0], buf[:part])
            for future in futures:
                future.result()
        return once
    return {ways: split(ways) for ways in WAYS}, proc, socks


def child(per_round: int) -> dict:
    """One tree's run: p50 seconds per stage."""
    import concurrent.futures

    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess
    from kvstore.client.checksum import checksum
    from kvstore.client.values import new_bytes
    from kvstore.transport import keyed_read
    from kvstore.transport.tcp import TcpTransport

    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(1024 << 20)])
    executor = concurrent.futures.ThreadPoolExecutor(max(WAYS) - 1)
    ceilings, proc, socks = ceiling_fns(executor)
    samples: dict[str, list[float]] = {}
    try:
        with kvstore.connect(master.address, transport="tcp", lease_ttl_s=1.0,
                             metadata="fast") as store:
            wait_registered(store, 10)
            value = np.random.default_rng(4).integers(0, 256, SIZE, dtype=np.uint8)
            out = np.empty_like(value)
            out_view = memoryview(out).cast("B")
            store.put("large/read", value)
            tcp = next(t for t in store._transfers.transports if t.name == "tcp")
            master_client = store._master

            def replicas():
                return master_client.get_replicas_leased(
                    ["large/read"], client_host_id="elsewhere", lease_ttl_s=1.0,
                    deadline=store._deadline(None))

            home = store._home
            nodes = home._current(store._deadline(None)) if home is not None else None

            def keyed(_i) -> None:
                node = nodes.nodes[0]
                conn, _ = tcp._pool.acquire(node.data_addr, node.node_id,
                                            store._deadline(None))
                conn.set_deadline(store._deadline(None))
                keyed_read.read_keyed(
                    conn, [((nodes.key_prefix + "large/read").encode(),
                            node.keyed_read_capability, home._largest_bytes)],
                    lambda index, size: out_view[:size])
                tcp._pool.release(conn)

            def fresh_bytes(_i) -> None:
                _, view = new_bytes(SIZE)
                view[:] = out_view

            def copy(_i) -> None:
                out_view[:] = memoryview(value).cast("B")

            target = [replicas()[0][0].targets[0]]
            stages = {f"ceiling {ways} conn": fn for ways, fn in ceilings.items()}
            # the client's striped read with other stripe counts (4 is the default)
            transports = {ways: TcpTransport(tcp._pool.token, num_streams=ways,
                                             stripe_min_bytes=SIZE // ways)
                          for ways in WAYS if ways != STREAMS}
            for ways, other in transports.items():
                stages[f"tcp read {ways} stripes"] = \
                    lambda i, other=other: other.read_into(target[0], out_view, timeout_s=5.0)
            stages.update({
                "get_replicas": lambda i: replicas(),
                "tcp read": lambda i: tcp.read_into(target[0], out_view, timeout_s=5.0),
                "checksum": lambda i: checksum(out_view),
                "copy (reused dst)": copy,
                "new bytes + copy": fresh_bytes,
            })
            if nodes is not None and nodes.nodes:
                stages["keyed refused"] = keyed
            for fn in stages.values():
                fn(-1)
            for name, fn in stages.items():
                target[0] = replicas()[0][0].targets[0]
                bucket = samples.setdefault(name, [])
                for i in range(per_round):
                    started = time.perf_counter()
                    fn(i)
                    bucket.append(time.perf_counter() - started)
            calls = {"get": lambda k: store.get(k), "get_into": lambda k: store.get_into(k, out)}
            for op, call in calls.items():
                keys = [f"large/{op}/{i}" for i in range(per_round)]
                for key in keys:
                    store.put(key, value)
                call(keys[0])     # warm-up (first read of keys[0])
                for phase in ("first", "again"):
                    bucket = samples.setdefault(f"{op} {phase}", [])
                    for key in keys[1:]:
                        started = time.perf_counter()
                        result = call(key)
                        bucket.append(time.perf_counter() - started)
                    if op == "get" and result != value.tobytes():
                        raise RuntimeError("get returned wrong bytes")
                if op == "get_into" and not np.array_equal(out, value):
                    raise RuntimeError("get_into returned wrong bytes")
                store.remove_prefix(f"large/{op}/", force=True)
            stats = store.stats()
            for other in transports.values():
                other.close()
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        executor.shutdown()
        for server in (daemon, master):
            server.close()
    row = {name: statistics.median(s) for name, s in samples.items()}
    row["home_reads"] = stats.get("home_reads")
    row["location_cache"] = stats.get("location_cache")
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    _rounds.add_flags(parser, str(HERE / "out" / "tcp_large_get.json"))
    parser.add_argument("--per-round", type=int, default=24)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.per_round)))
        return 0
    pythons = args.python or [sys.executable]
    runs, loads = _rounds.run_rounds(__file__, pythons, args.rounds,
                                     ["--per-round", str(args.per_round)])
    names = [n for n in runs[pythons[0]][0] if isinstance(runs[pythons[0]][0][n], float)]
    print(f"\n4 MiB over tcp: {args.rounds} rounds x {args.per_round}; load before each run "
          f"{[' '.join(x) for x in loads]}, now {' '.join(_rounds.load_average())}\n")
    header = "".join(f"{_rounds.tree_name(p) + ' ms':>24}{'GB/s':>8}" for p in pythons)
    print(f"{'stage (median p50 over rounds)':32}{header}")
    for name in names:
        cells = ""
        for python in pythons:
            values = [run[name] * 1e3 for run in runs[python] if name in run]
            if not values:
                cells += f"{'n/a':>24}{'':>8}"
                continue
            cells += f"{_rounds.spread(values, 8, 3):>24}{SIZE / statistics.median(values) / 1e6:8.2f}"
        print(f"{name:32}{cells}")
    for python in pythons:
        last = runs[python][-1]
        print(f"{_rounds.tree_name(python)}: home reads {last.get('home_reads')}, "
              f"location cache {last.get('location_cache')}")
    _rounds.write_json(args.json, runs, loads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
