"""``kvstore bench``: transfer bandwidth and latency between this process and a daemon process.

Two levels, both across processes: ``transport`` (the shm/tcp transports against fixed ranges
of the daemon's segment: the data path alone) and ``client`` (``kvstore.connect`` put/get:
master round trips, allocation and checksums included). For each (level, transport, size,
single|batched, put|get) it reports GB/s (1 GB = 1e9 bytes); for 64 KiB single it also reports
p50/p99 latency. A single-thread memcpy of the bytes each call moves, measured in rounds
interleaved with the figure's own (same moments, same load), is printed beside it as the
ceiling (``% memcpy``); for tcp rows, raw Python TCP over loopback to another process (one
stream) is printed too (``loopbk``). ``cpu s/GB`` is the CPU time of this process plus our
master and daemon per GB moved: unlike GB/s it hardly depends on what else runs, so it
compares busy runs. The 1-minute load average at the end is recorded. The measuring
primitives live in ``kvstore.transport.measure``.

Without ``--master`` it starts its own ``kvstore master`` and ``kvstore daemon`` processes on
127.0.0.1 (port 0) and stops them at the end; with ``--master`` it measures an existing
cluster (first node listed) and writes only to ranges it allocated through ``put`` (client
level) — the transport level needs a private daemon and is skipped.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click

from kvstore._units import format_size, parse_size
from kvstore.transport.measure import (
    latencies_us,
    loopback_gbps,
    make_cpu_probe,
    rate_beside_memcpy,
)

DEFAULT_SIZES = ("64KiB", "1MiB", "4MiB", "16MiB", "64MiB")
BATCH_BYTES = 64 * 1024 * 1024        # a batch moves about this much (at most 128 items)
MAX_BATCH_ITEMS = 128
LATENCY_SIZE_BYTES = 64 * 1024


def batch_items(size_bytes: int) -> int:
    return max(1, min(MAX_BATCH_ITEMS, BATCH_BYTES // size_bytes))


class _Server:
    """One ``kvstore`` server subprocess; its address is read from its ``listening on`` line."""

    def __init__(self, args: list[str], start_timeout_s: float = 60.0):
        import subprocess
        import sys

        kvstore_bin = Path(sys.executable).with_name("kvstore")
        self.proc = subprocess.Popen([str(kvstore_bin), *args], stdout=subprocess.PIPE,
                                     text=True)
        deadline_s = time.monotonic() + start_timeout_s
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                return
            if time.monotonic() > deadline_s:
                break
        self.close()
        raise click.ClickException(f"kvstore {args[0]} did not start")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class _Cluster:
    """A master and a daemon process of our own, on loopback."""

    def __init__(self, dram_bytes: int):
        self.master = _Server(["master", "--port", "0", "--log-level", "WARNING"])
        try:
            self.daemon = _Server(["daemon", "--master", self.master.address, "--dram",
                                   str(dram_bytes), "--log-level", "WARNING"])
        except BaseException:
            self.master.close()
            raise

    def close(self) -> None:
        self.daemon.close()
        self.master.close()


def _first_node(master_addr: str, token: str | None):
    from kvstore.master.rpc_client import MasterClient
    from kvstore.v1 import master_pb2

    with MasterClient(master_addr, token=token) as client:
        nodes = client.call("ListNodes", master_pb2.ListNodesRequest()).nodes
    if not nodes:
        raise click.ClickException(f"master {master_addr} lists no storage node")
    return nodes[0]


def transport_cases(node, kinds, sizes, token, min_time_s, progress, cpu_probe):
    """Rows for the transport level: fixed ranges at the start of the node's first segment."""
    import numpy as np

    from kvstore.transport import make_transports
    from kvstore.transport.base import Target

    segment = next(s for s in node.segments if s.shm_name)
    rows = []
    for kind in kinds:
        transport = make_transports(kind, token=token)[0]
        for size_bytes in sizes:
            num_items = batch_items(size_bytes)
            src = np.random.default_rng(0).integers(0, 256, size_bytes * num_items, np.uint8)
            dst = np.empty_like(src)
            targets = [Target(node.node_id, node.host_id, node.data_addr, segment.segment_id,
                              segment.shm_name, i * size_bytes, size_bytes)
                       for i in range(num_items)]
            srcs = [memoryview(src[i * size_bytes:(i + 1) * size_bytes]) for i in range(num_items)]
            dsts = [memoryview(dst[i * size_bytes:(i + 1) * size_bytes]) for i in range(num_items)]
            _check(transport.write_many(list(zip(targets, srcs)), timeout_s=60))
            put_one = lambda: transport.write(targets[0], srcs[0], timeout_s=60)  # noqa: E731
            get_one = lambda: transport.read_into(targets[0], dsts[0], timeout_s=60)  # noqa: E731
            put_many = lambda: _check(transport.write_many(list(zip(targets, srcs)), timeout_s=60))  # noqa: E731,E501
            get_many = lambda: _check(transport.read_many(list(zip(targets, dsts)), timeout_s=60))  # noqa: E731,E501
            rows += _measure("transport", kind, size_bytes, num_items, put_one, get_one,
                             put_many, get_many, min_time_s, progress, cpu_probe)
            if not np.array_equal(src, dst):
                raise click.ClickException(f"{kind}: bytes read differ from bytes written")
        transport.close()
    return rows


def client_cases(master_addr, kinds, sizes, token, min_time_s, progress, cpu_probe):
    """Rows for the client level: kvstore.connect put/get with fresh keys per put."""
    import itertools

    import numpy as np

    import kvstore

    rows = []
    counter = itertools.count()
    for kind in kinds:
        store = kvstore.connect(master_addr, token=token, transport=kind)
        for size_bytes in sizes:
            num_items = batch_items(size_bytes)
            src = np.random.default_rng(1).integers(0, 256, size_bytes, np.uint8)
            outs = [np.empty(size_bytes, np.uint8) for _ in range(num_items)]
            prefix = f"bench/{time.time_ns()}/{kind}/{size_bytes}"
            keys = [f"{prefix}/fixed/{i}" for i in range(num_items)]
            store.batch_put(keys, [src] * num_items)

            # NOTE: fresh keys per put (a second put of a key is a no-op); they are removed
            # after the case, and the master evicts old ones if a case outgrows the pool.
            def put_one():
                store.put(f"{prefix}/{next(counter)}", src)

            def put_many():
                batch = [f"{prefix}/{next(counter)}" for _ in range(num_items)]
                _check(store.batch_put(batch, [src] * num_items))

            get_one = lambda: store.get_into(keys[0], outs[0])  # noqa: E731
            get_many = lambda: _check(store.batch_get_into(keys, outs))  # noqa: E731
            rows += _measure("client", kind, size_bytes, num_items, put_one, get_one,
                             put_many, get_many, min_time_s, progress, cpu_probe)
            if not np.array_equal(outs[-1], src):
                raise click.ClickException(f"client {kind}: bytes read differ from bytes put")
            store.remove_prefix(prefix, force=True)
        store.close()
    return rows


def _check(results) -> None:
    """Raise the first per-item error of a batch (items are None or a count on success)."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _measure(level, kind, size_bytes, num_items, put_one, get_one, put_many, get_many,
             min_time_s, progress, cpu_probe):
    rows = []
    # NOTE: gets run first: at the client level the puts may fill the pool and make the
    # master evict the objects the gets read
    for mode, op, fn, num_bytes in (("single", "get", get_one, size_bytes),
                                    ("batch", "get", get_many, size_bytes * num_items),
                                    ("single", "put", put_one, size_bytes),
                                    ("batch", "put", put_many, size_bytes * num_items)):
        gbps, memcpy_gbps, cpu_s_per_gb = rate_beside_memcpy(fn, num_bytes, min_time_s,
                                                              cpu_probe)
        row = {"level": level, "transport": kind, "size_bytes": size_bytes, "mode": mode,
               "batch_items": num_items if mode == "batch" else 1, "op": op, "gbps": gbps,
               "memcpy_gbps": memcpy_gbps, "cpu_s_per_gb": cpu_s_per_gb}
        if size_bytes == LATENCY_SIZE_BYTES and mode == "single":
            row["p50_us"], row["p99_us"] = latencies_us(fn, 300)
        rows.append(row)
        progress.update(1)
    return [rows[2], rows[0], rows[3], rows[1]]  # table order: put/get single, put/get batch


def print_table(rows, loopback_by_size) -> None:
    header = (f"{'level':<9} {'transport':<9} {'size':>10} {'mode':<6} {'items':>5} {'op':<4}"
              f" {'GB/s':>7} {'memcpy':>7} {'%memcpy':>7} {'loopbk':>7} {'cpu s/GB':>8} "
              f"{'p50 us':>8} {'p99 us':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ceiling = row["memcpy_gbps"]
        p50 = f"{row['p50_us']:.0f}" if "p50_us" in row else ""
        p99 = f"{row['p99_us']:.0f}" if "p99_us" in row else ""
        loopback = loopback_by_size.get(row["size_bytes"])
        loopback_text = f"{loopback:.2f}" if loopback is not None and row["transport"] == "tcp" \
            else ""
        print(f"{row['level']:<9} {row['transport']:<9} {format_size(row['size_bytes']):>10} "
              f"{row['mode']:<6} {row['batch_items']:>5} {row['op']:<4} {row['gbps']:>7.2f} "
              f"{ceiling:>7.2f} {100 * row['gbps'] / ceiling:>6.0f}% {loopback_text:>7} "
              f"{row['cpu_s_per_gb']:>8.3f} {p50:>8} {p99:>8}")


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return None


@click.command("bench")
@click.option("--master", "master_addr", default=None, metavar="HOST:PORT",
              help="Measure this cluster (client level only). Default: start a local one.")
@click.option("--token", envvar="KVSTORE_TOKEN", default=None, help="[env KVSTORE_TOKEN]")
@click.option("--transports", default="shm,tcp", show_default=True,
              help="Comma-separated transports to measure.")
@click.option("--levels", default="transport,client", show_default=True,
              help="Comma-separated: transport (data path), client (kvstore.connect).")
@click.option("--sizes", default=",".join(DEFAULT_SIZES), show_default=True,
              help="Comma-separated value sizes.")
@click.option("--min-time", "min_time_s", default=0.5, show_default=True, type=float,
              help="Seconds per measurement (best of 3 rounds, at least 2 calls each).")
@click.option("--json", "json_path", default="bench/out/transfer.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the results.")
def command(master_addr, token, transports, levels, sizes, min_time_s, json_path):
    """Measure put/get bandwidth and latency over each transport; print a table, write JSON."""
    from tqdm import tqdm

    kinds = [k for k in transports.split(",") if k]
    level_list = [v for v in levels.split(",") if v]
    size_list = [parse_size(s) for s in sizes.split(",") if s]
    if master_addr is not None and "transport" in level_list:
        click.echo("note: --master given: skipping the transport level (needs its own daemon)",
                   err=True)
        level_list.remove("transport")
    cluster = None
    if master_addr is None:
        largest_batch = max(s * batch_items(s) for s in size_list)
        cluster = _Cluster(dram_bytes=max(4 * largest_batch, 2 * 1024**3))
        master_addr = cluster.master.address
    try:
        loopback_by_size = loopback_gbps(size_list, min_time_s) if "tcp" in kinds else {}
        node = _first_node(master_addr, token)
        cpu_probe = make_cpu_probe([] if cluster is None else
                                   [cluster.master.proc.pid, cluster.daemon.proc.pid])
        total = 4 * len(kinds) * len(size_list) * len(level_list)
        rows = []
        with tqdm(total=total, desc="bench", unit="case", leave=False) as progress:
            if "transport" in level_list:
                rows += transport_cases(node, kinds, size_list, token, min_time_s, progress,
                                        cpu_probe)
            if "client" in level_list:
                rows += client_cases(master_addr, kinds, size_list, token, min_time_s, progress,
                                     cpu_probe)
    finally:
        if cluster is not None:
            cluster.close()
    print_table(rows, loopback_by_size)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": platform.node(),
              "loopback_gbps": {str(k): v for k, v in loopback_by_size.items()},
              "loadavg_1m": _loadavg(),
              "rows": rows}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2))
    click.echo(f"wrote {json_path}")
