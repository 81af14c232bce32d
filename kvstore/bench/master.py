"""``kvstore bench master``: metadata RPC throughput and latency against a real ``kvstore
master`` (the code of bench/master_bench.py, which now calls this command).

For get_replicas, exists and put_start+put_end, at batch sizes 1, 32 and 1024, from 1 and
from 4 client processes, it reports keys/s and p50/p99 call latency. Two ceilings are measured
in the same run: the floor of each path (an empty Exists round trip from one client: no call
can be faster), the loopback floor (a raw TCP round trip of empty fast-path frames between two
Python processes, no master: what the fast path's single-key calls are bounded by on this
machine) and the master's in-process key rate (request bytes parsed, the service method run,
the reply serialized, with no transport: no RPC can move more keys/s; for Exists and
GetReplicas also through the fast path's wire form, ``kvstore.master.wire``, the fast rows'
ceiling); each row's keys/s is printed as a ratio of the latter. Runs each gRPC mode of the master (the thread pool and
grpc.aio), and each metadata path of the client: gRPC and the framed fast path (``--paths``).
Prints a table, writes ``--json`` and says PASS/MISS against the targets of issue 2
(get_replicas batch 1024 >= 400k keys/s with p50 < 2.5 ms; exists >= 1M keys/s; single-key
p50 < 300 us) and of issue 15 (get_replicas x1024 >= 800k keys/s, exists x1024 >= 3.6M,
single-key p50 <= 50 us); exit status 0 either way: speed is recorded, not asserted.

On a shared machine: the in-process ceiling is timed in thread CPU time, and each cell also
reports the master process's CPU time per call (from ``/proc``) and the key rate per master
CPU-second, ``keys/CPU-s``: figures that another process's load does not move the way it
moves wall-clock rates (cache contention still does).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from kvstore.bench.measure import make_cpu_probe
from kvstore.bench.signals import signals_held

KVSTORE_BIN = Path(sys.executable).with_name("kvstore")
NUM_KEYS = 200_000
VALUE_BYTES = 64 * 1024
BATCHES = (1, 32, 1024)
CLIENTS = (1, 4)


#: ``--tenant``: the cluster token (registration) and the one tenant's (every cell's calls)
CLUSTER_TOKEN = "bench-cluster"
TENANT_TOKEN = "bench-tenant"
TENANTS_TOML = (f'[[tenant]]\nname = "bench"\ntoken = "{TENANT_TOKEN}"\n'
                '[tenant.quota]\ndram = "1024TiB"\n')


def start_master(mode: str, tenants_file: str | None = None,
                 ) -> tuple[subprocess.Popen, str, int]:
    """The master process, its gRPC address and its fast-path port; with
    ``tenants_file``, started with the cluster token and that file."""
    tenant_args = (["--token", CLUSTER_TOKEN, "--tenants", tenants_file] if tenants_file
                   else [])
    proc = subprocess.Popen([str(KVSTORE_BIN), "master", "--port", "0", "--grpc-mode", mode,
                             "--log-level", "WARNING", "--pending-timeout", "1h",
                             "--node-ttl", "1h", "--heartbeat-interval", "10s", *tenant_args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    address = None
    for line in proc.stdout:
        match = re.match(r"^listening on (\S+:\d+)", line.strip())
        if match:
            address = match.group(1)
        match = re.match(r"^fast metadata on \S+:(\d+)", line.strip())
        if match and address:
            return proc, address, int(match.group(1))
    raise RuntimeError("kvstore master exited before listening")


class RawCalls:
    """``call(method name, request message)`` through kvstore.rpc's MasterClient and carrier,
    without the typed verbs' decoding: this benchmark measures the master, not the client."""

    def __init__(self, carrier):
        from kvstore.rpc import MasterClient
        from kvstore.rpc.methods import METHODS
        self._client = MasterClient(carrier)
        self._methods = METHODS

    def call(self, name, request):
        return self._client.call(self._methods[name], request)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._client.close()


def make_client(path: str, address: str, fast_port: int, token: str | None = None,
                reply_spin_s: float = 0.0) -> RawCalls:
    from kvstore.rpc import GrpcCarrier
    from kvstore.rpc.fast_carrier import FastCarrier
    if path == "fast":
        return RawCalls(FastCarrier(address.rsplit(":", 1)[0], fast_port, token=token,
                                    reply_spin_s=reply_spin_s))
    return RawCalls(GrpcCarrier(address, token=token))


def _echo_server(ready) -> None:
    """A raw TCP server shaped like the fast path (a thread per connection, blocking sockets,
    TCP_NODELAY, a buffered reader): reads a REQUEST frame, answers an empty REPLY."""
    import socket
    import threading
    from kvstore.rpc import fast_frames as ff

    listener = socket.create_server(("127.0.0.1", 0))
    ready.put(listener.getsockname()[1])

    def serve(conn) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = conn.makefile("rb", buffering=256 * 1024)
        while len(header := reader.read(ff.REQUEST.size)) == ff.REQUEST.size:
            body_len, _, request_id = ff.REQUEST.unpack(header)
            reader.read(body_len)
            conn.sendall(ff.REPLY.pack(0, ff.OK, request_id))
        conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def loopback_floor(seconds: float) -> float:
    """p50 (us) of a raw TCP round trip on 127.0.0.1 between two processes, in Python at both
    ends, of the fast path's frames with empty bodies: what no fast-path call can beat here
    (two system calls and two wake-ups a round trip, no master)."""
    import socket
    from kvstore.rpc import fast_frames as ff

    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    server = ctx.Process(target=_echo_server, args=(ready,), daemon=True)
    server.start()
    try:
        sock = socket.create_connection(("127.0.0.1", ready.get(timeout=120)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = ff.encode_request(1, 1, b"")
        buffer = bytearray(64)
        latencies = []
        deadline = time.perf_counter() + seconds
        while (now := time.perf_counter()) < deadline:
            sock.sendall(request)
            received = 0
            while received < ff.REPLY.size:
                received += sock.recv_into(memoryview(buffer)[received:])
            latencies.append(time.perf_counter() - now)
        sock.close()
    finally:
        server.terminate()
        server.join()
    latencies.sort()
    return latencies[len(latencies) // 2] * 1e6


def populate(address: str, num_keys: int = NUM_KEYS, tenant: bool = False) -> list[str]:
    from kvstore.v1 import master_pb2 as pb
    keys = [f"bench/model-x/L32/xxh64v1/{i:016x}" for i in range(num_keys)]
    with make_client("grpc", address, 0, CLUSTER_TOKEN if tenant else None) as admin:
        for n in range(4):
            admin.call("RegisterNode", pb.RegisterNodeRequest(node=pb.NodeInfo(
                node_id=f"node{n}", host_id=f"host{n}", data_addr=f"127.0.0.1:{7000 + n}",
                segments=[pb.SegmentInfo(segment_id="dram0", tier=pb.TIER_DRAM,
                                         capacity_bytes=1 << 40, shm_name=f"/kv{n}")])))
    with make_client("grpc", address, 0, TENANT_TOKEN if tenant else None) as client:
        for i in range(0, num_keys, 8192):
            chunk = keys[i:i + 8192]
            client.call("PutStart", pb.PutStartRequest(keys=chunk, sizes=[VALUE_BYTES] * len(chunk),
                                                       client_id="bench"))
            client.call("PutEnd", pb.PutEndRequest(keys=chunk, client_id="bench"))
    return keys


def client_worker(target: tuple, op: str, batch: int, worker: int, seconds: float,
                  start_at: float, out: mp.Queue, num_keys: int = NUM_KEYS,
                  ready: mp.Queue | None = None) -> None:
    """Call ``op`` in a loop for ``seconds`` (starting at wall time ``start_at``); put the
    per-call latencies (seconds) on ``out``. Ignores SIGINT: a Ctrl-C reaches the whole
    process group, and the parent stops its workers itself. Puts its number on ``ready``
    once it runs (its bootstrap is over)."""
    import random

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if ready is not None:
        ready.put(worker)
    from kvstore.v1 import master_pb2 as pb
    rng = random.Random(worker)
    keys = [f"bench/model-x/L32/xxh64v1/{i:016x}" for i in range(num_keys)]
    if op == "get_replicas":
        requests = [pb.GetReplicasRequest(keys=rng.sample(keys, batch)) for _ in range(32)]
    elif op == "exists":
        requests = [pb.ExistsRequest(keys=rng.sample(keys, batch)) for _ in range(32)]
    else:                                      # "empty" (the gRPC floor) and "put"
        requests = [pb.ExistsRequest()]
    method = {"get_replicas": "GetReplicas", "exists": "Exists", "empty": "Exists"}.get(op)
    latencies = []
    with make_client(*target) as client:   # target: make_client's arguments
        call = client.call
        for request in requests[:4]:                       # warm up the channel
            call(method or "Exists", request)
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = time.perf_counter() + seconds
        n = 0
        if op == "put":
            tag = f"put/{worker}/{time.time_ns()}/"
            sizes = [VALUE_BYTES] * batch
            while (now := time.perf_counter()) < deadline:
                chunk = [f"{tag}{n * batch + j}" for j in range(batch)]
                n += 1
                call("PutStart", pb.PutStartRequest(keys=chunk, sizes=sizes, client_id=tag))
                call("PutEnd", pb.PutEndRequest(keys=chunk, client_id=tag))
                latencies.append(time.perf_counter() - now)
        else:
            while (now := time.perf_counter()) < deadline:
                call(method, requests[n % len(requests)])
                n += 1
                latencies.append(time.perf_counter() - now)
    out.put(latencies)


def run_cell(target: tuple, op: str, batch: int, num_clients: int, seconds: float,
             num_keys: int = NUM_KEYS, master_pid: int | None = None) -> dict:
    """``target``: (path, address, fast_port, token, reply_spin_s) as ``make_client`` takes
    them. With
    ``master_pid``, the master's CPU time over the cell's timed window is reported too
    (``measure.make_cpu_probe``: with this process's own, which only waits meanwhile)."""
    ctx = mp.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Queue()
    cpu_probe = make_cpu_probe([master_pid]) if master_pid is not None else None
    start_at = time.time() + 1.5 + 0.3 * num_clients       # lets every process import first
    procs = [ctx.Process(target=client_worker,
                         args=(target, op, batch, w, seconds, start_at, out, num_keys, ready))
             for w in range(num_clients)]
    # NOTE: SIGINT waits until every worker runs its function: a Ctrl-C before a spawned
    # child has read its bootstrap data would stop the parent and leave the child half-fed
    # (a traceback from its bootstrap); the workers inherit it blocked and ignore it
    started = []
    try:
        with signals_held(signal.SIGINT, block_in_children=True):
            for p in procs:
                p.start()
                started.append(p)
            for _ in procs:
                ready.get(timeout=120)
        time.sleep(max(0.0, start_at - time.time()))
        cpu_at_start_s = cpu_probe() if cpu_probe else None
        all_latencies = [out.get(timeout=seconds + 120) for _ in procs]
        cpu_at_end_s = cpu_probe() if cpu_probe else None
    except BaseException:
        for p in started:  # NOTE: on Ctrl-C (or an error) the workers are stopped, not awaited
            p.terminate()
        raise
    finally:
        for p in started:
            p.join()
    merged = sorted(x for lat in all_latencies for x in lat)
    num_calls = len(merged)
    master_cpu_s = (cpu_at_end_s - cpu_at_start_s
                    if cpu_at_start_s is not None and cpu_at_end_s is not None else None)
    return {"op": op, "batch": batch, "clients": num_clients, "calls": num_calls,
            "keys_per_s": num_calls * batch / seconds,
            "master_cpu_us_per_call": (master_cpu_s / num_calls * 1e6
                                       if master_cpu_s is not None and num_calls else None),
            "keys_per_master_cpu_s": (num_calls * batch / master_cpu_s
                                      if master_cpu_s and batch else None),
            "p50_us": merged[num_calls // 2] * 1e6 if merged else None,
            "p99_us": merged[min(num_calls - 1, int(num_calls * 0.99))] * 1e6 if merged else None}


def in_process_ceiling(num_keys: int = NUM_KEYS) -> dict:
    """Keys/s of the master's whole request path for batches of 1024 with no transport:
    parse the request bytes, run the service method, serialize the reply (with the GC
    thresholds the master process uses). No RPC can move keys faster than this.

    NOTE: timed in this thread's CPU time, not wall time: on a shared machine the wall clock
    also counts the time other processes held the core, which is no property of the master."""
    import gc
    import random
    from kvstore.master.config import MasterConfig
    from kvstore.master.service import MasterService
    from kvstore.master.state import MasterState
    from kvstore.master.wire import parse_request
    from kvstore.v1 import master_pb2 as pb
    gc.set_threshold(100_000, 50, 100)
    service = MasterService(MasterState(MasterConfig(), 0.0))
    service.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(
        node_id="n", host_id="h", data_addr="127.0.0.1:1",
        segments=[pb.SegmentInfo(segment_id="d", tier=pb.TIER_DRAM, capacity_bytes=1 << 40)])),
        0.0)
    keys = [f"bench/model-x/L32/xxh64v1/{i:016x}" for i in range(num_keys)]

    def rate(method: str, request_class, payloads: list[bytes], num_keys: int) -> float:
        handler = getattr(service, method)
        started = time.thread_time()
        for payload in payloads:
            handler(request_class.FromString(payload), 1.0).SerializeToString()
        return num_keys / (time.thread_time() - started)

    def wire_rate(handler, payloads: list[bytes], num_keys: int) -> float:
        started = time.thread_time()
        for payload in payloads:
            handler(parse_request(payload), 1.0).SerializeToString()
        return num_keys / (time.thread_time() - started)

    chunks = [keys[i:i + 1024] for i in range(0, num_keys, 1024)]
    starts = [pb.PutStartRequest(keys=c, sizes=[VALUE_BYTES] * len(c), client_id="c")
              .SerializeToString() for c in chunks]
    ends = [pb.PutEndRequest(keys=c, client_id="c").SerializeToString() for c in chunks]
    started = time.thread_time()
    for start, end in zip(starts, ends):
        service.PutStart(pb.PutStartRequest.FromString(start), 0.0).SerializeToString()
        service.PutEnd(pb.PutEndRequest.FromString(end), 0.0).SerializeToString()
    put_rate = num_keys / (time.thread_time() - started)
    batches = [random.Random(i).sample(keys, 1024) for i in range(100)]
    gets = [pb.GetReplicasRequest(keys=b).SerializeToString() for b in batches]
    exists = [pb.ExistsRequest(keys=b).SerializeToString() for b in batches]
    ceiling = {"get_replicas_keys_per_s": rate("GetReplicas", pb.GetReplicasRequest, gets,
                                               1024 * len(batches)),
               "exists_keys_per_s": rate("Exists", pb.ExistsRequest, exists,
                                         1024 * len(batches)),
               "put_keys_per_s": put_rate}
    ceiling["fast_get_replicas_keys_per_s"] = wire_rate(service.get_replicas_wire, gets,
                                                        1024 * len(batches))
    ceiling["fast_exists_keys_per_s"] = wire_rate(service.exists_wire, exists,
                                                  1024 * len(batches))
    return ceiling


_CEILING_KEY = {"get_replicas": "get_replicas_keys_per_s", "exists": "exists_keys_per_s",
                "put": "put_keys_per_s"}
MODES = ("threads", "aio")
PATHS = ("grpc", "fast")


@click.command("master")
@click.option("--quick", is_flag=True, help="Fewer cells, shorter runs.")
@click.option("--modes", default=",".join(MODES), show_default=True,
              help="Comma-separated gRPC modes of the master: threads, aio.")
@click.option("--paths", default=",".join(PATHS), show_default=True,
              help="Comma-separated client metadata paths: grpc, fast.")
@click.option("--seconds", type=click.FloatRange(min=0.05), default=None,
              help="Seconds per cell (default 2, or 0.5 with --quick).")
@click.option("--num-keys", type=click.IntRange(min=1024), default=NUM_KEYS, show_default=True,
              help="Keys stored before the cells run (and sampled by them).")
@click.option("--tenant", is_flag=True,
              help="Start the master with --tenants and make every call as that tenant.")
@click.option("--reply-spin-us", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Fast-path clients poll for each reply this long before blocking (the "
                   "client's own default, ClientConfig.reply_spin_s, is 200).")
@click.option("--json", "json_path", default="bench/out/master_bench.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write every figure.")
def command(quick: bool, modes: str, paths: str, seconds: float | None, num_keys: int,
            tenant: bool, reply_spin_us: float, json_path: str) -> None:
    """Metadata operations per second and latency by batch size, beside the master's ceiling."""
    from tqdm import tqdm

    mode_list = [m for m in modes.split(",") if m]
    path_list = [p for p in paths.split(",") if p]
    for items, allowed, flag in ((mode_list, MODES, "--modes"), (path_list, PATHS, "--paths")):
        if not items or any(item not in allowed for item in items):
            raise click.BadParameter(f"expected some of {', '.join(allowed)}", param_hint=flag)
    seconds = seconds or (0.5 if quick else 2.0)
    batches = (1, 1024) if quick else BATCHES
    clients = (1,) if quick else CLIENTS
    results = {"command": sys.argv, "ceiling_in_process": None, "modes": {},
               "tenant": tenant, "reply_spin_us": reply_spin_us, "loopback_floor_p50_us": None,
               "interrupted": False, "loadavg_at_start": os.getloadavg(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    cells = [(op, batch, n) for op in ("get_replicas", "exists", "put") for batch in batches
             for n in clients]
    progress = tqdm(total=len(mode_list) * len(path_list) * (len(cells) + 1) + 1,
                    desc="bench master", unit="cell", leave=False)
    tenants_dir = tempfile.TemporaryDirectory(prefix="kvstore-bench-")
    tenants_file = None
    if tenant:
        tenants_file = str(Path(tenants_dir.name) / "tenants.toml")
        Path(tenants_file).write_text(TENANTS_TOML)
    try:
        _measure(results, mode_list, path_list, cells, seconds, num_keys, progress,
                 tenants_file, reply_spin_us / 1e6)
    except KeyboardInterrupt:
        # NOTE: like `bench transfer`: what was measured is printed and written, exit 130
        results["interrupted"] = True
        progress.write(f"\ninterrupted: "
                       f"{sum(len(m['rows']) for m in results['modes'].values())} cell(s) "
                       "measured so far")
    finally:
        progress.close()
        tenants_dir.cleanup()
    for mode, data in results["modes"].items():
        _print_mode(mode, data)
    checks = []
    for mode, data in results["modes"].items():
        if len(data["rows"]) < len(cells):
            continue  # interrupted: an incomplete mode is not judged
        by = {(r["op"], r["batch"], r["clients"]): r for r in data["rows"]}
        best_get = max((r for k, r in by.items() if k[0] == "get_replicas" and k[1] == 1024),
                       key=lambda r: r["keys_per_s"])
        best_exists = max((r for k, r in by.items() if k[0] == "exists" and k[1] == 1024),
                          key=lambda r: r["keys_per_s"])
        single = by[("get_replicas", 1, 1)]
        single_exists = by[("exists", 1, 1)]
        checks += [
            (mode, "get_replicas x1024 >= 400k keys/s, p50 < 2.5 ms",
             best_get["keys_per_s"] >= 400_000 and by[("get_replicas", 1024, 1)]["p50_us"] < 2500),
            (mode, "exists x1024 >= 1M keys/s", best_exists["keys_per_s"] >= 1_000_000),
            (mode, "single-key get_replicas p50 < 300 us", single["p50_us"] < 300),
            (mode, "(issue 15) get_replicas x1024 >= 800k keys/s",
             best_get["keys_per_s"] >= 800_000),
            (mode, "(issue 15) exists x1024 >= 3.6M keys/s",
             best_exists["keys_per_s"] >= 3_600_000),
            (mode, "(issue 15) single-key get_replicas and exists p50 <= 50 us",
             single["p50_us"] <= 50 and single_exists["p50_us"] <= 50),
        ]
    if results["loopback_floor_p50_us"] is not None:
        print(f"\nloopback floor (raw TCP round trip, no master): p50 "
              f"{results['loopback_floor_p50_us']:.1f} us; fast-path clients' reply spin "
              f"{reply_spin_us:g} us")
    results["loadavg_at_end"] = os.getloadavg()
    print(f"\nload average (1/5/15 min) at start {results['loadavg_at_start']}, "
          f"at end {results['loadavg_at_end']} on {os.cpu_count()} cores")
    for mode, what, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  [{mode}] {what}")
    results["checks"] = [{"mode": m, "target": w, "pass": ok} for m, w, ok in checks]
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {json_path}")
    if results["interrupted"]:
        raise SystemExit(130)


def _measure(results: dict, mode_list, path_list, cells, seconds: float, num_keys: int,
             progress, tenants_file: str | None = None, reply_spin_s: float = 0.0) -> None:
    """Fill ``results`` (the ceiling, then each mode's rows as they are measured, so a
    Ctrl-C keeps every finished cell); each master started is stopped, on error too. With
    ``tenants_file`` the masters have tenants and every client uses a tenant's token."""
    ceiling = in_process_ceiling(num_keys)
    results["ceiling_in_process"] = ceiling
    progress.update(1)
    results["loopback_floor_p50_us"] = floor_us = loopback_floor(seconds)
    progress.write(f"loopback floor (raw TCP round trip of empty fast-path frames, Python at "
                   f"both ends, 1 client): p50 {floor_us:.1f} us")
    progress.write(f"in-process ceiling (request bytes -> reply bytes, no transport, batch "
                   f"1024): get_replicas {ceiling['get_replicas_keys_per_s']:,.0f} keys/s, "
                   f"exists {ceiling['exists_keys_per_s']:,.0f} keys/s, put_start+put_end "
                   f"{ceiling['put_keys_per_s']:,.0f} keys/s")
    if "fast_exists_keys_per_s" in ceiling:
        progress.write(f"in-process ceiling of the fast path's wire form (kvstore.master.wire, "
                       f"batch 1024): get_replicas "
                       f"{ceiling['fast_get_replicas_keys_per_s']:,.0f} keys/s, exists "
                       f"{ceiling['fast_exists_keys_per_s']:,.0f} keys/s")
    for mode, path in [(m, p) for m in mode_list for p in path_list]:
        proc, address, fast_port = start_master(mode, tenants_file)
        target = (path, address, fast_port, TENANT_TOKEN if tenants_file else None,
                  reply_spin_s)
        try:
            populate(address, num_keys, tenants_file is not None)
            floor = run_cell(target, "empty", 0, 1, seconds, num_keys, proc.pid)
            progress.update(1)
            data = results["modes"][f"{mode}/{path}"] = {"floor_p50_us": floor["p50_us"],
                                                         "rows": []}
            for op, batch, n in cells:
                row = run_cell(target, op, batch, n, seconds, num_keys, proc.pid)
                key = _CEILING_KEY[op]
                if path == "fast":
                    key = f"fast_{key}" if f"fast_{key}" in ceiling else key
                row["pct_of_ceiling"] = 100 * row["keys_per_s"] / ceiling[key]
                data["rows"].append(row)
                progress.update(1)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _print_mode(mode: str, data: dict) -> None:
    print(f"\nmaster {mode}: floor (empty Exists, 1 client) p50 {data['floor_p50_us']:.0f} us")
    print(f"{'op':<14}{'batch':>6}{'clients':>8}{'keys/s':>14}{'%ceiling':>9}"
          f"{'p50 us':>10}{'p99 us':>10}{'master CPU us/call':>20}{'keys/CPU-s':>14}")
    for r in data["rows"]:
        cpu_us, per_cpu_s = r.get("master_cpu_us_per_call"), r.get("keys_per_master_cpu_s")
        cpu = (f"{cpu_us:>20.0f}{per_cpu_s:>14,.0f}" if cpu_us is not None and per_cpu_s
               else f"{'':>34}")
        print(f"{r['op']:<14}{r['batch']:>6}{r['clients']:>8}{r['keys_per_s']:>14,.0f}"
              f"{r['pct_of_ceiling']:>8.1f}%{_us(r['p50_us'])}{_us(r['p99_us'])}{cpu}")


def _us(value) -> str:
    return f"{'':>10}" if value is None else f"{value:>10.0f}"
