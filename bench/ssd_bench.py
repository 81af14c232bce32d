"""SSD tier and big-segment start benchmark (issue 9).

1. The disk's own ceiling, measured in the same run: a sequential O_DIRECT write then read of
   a file of ``--disk-mib`` in the SSD directory, in 8 MiB requests one at a time, and in
   1 MiB requests with 4 in flight (the SSD tier's own pattern), each into freshly
   preallocated (unwritten) extents, then both again over the same, now written, blocks;
   the best of them is the ceiling. The daemon's puts start once its data file is
   pre-written (where the tree pre-writes it).
   Beside it, per value size, the ceiling of a durable put (``synced``): objects of that
   size written as the SSD tier writes them (1 MiB requests, 4 in flight) over written
   extents, each followed by a 64-byte index record and the fdatasync of the data file and
   the index at once, as every put must before it is acknowledged (``SsdBackend.sync``).
   The 70% target is checked against both for single puts; the synced one is their
   like-for-like ceiling (the streaming one syncs once per ``--disk-mib``); a batch syncs
   once per call, so batches are checked against the streaming one.
2. SSD put/get GB/s through ``kvstore.connect`` (tcp: the SSD tier is served over the data
   plane) against a real master and daemon (``--ssd DIR:SIZE``), per value size, beside (1):
   one key per call, and ``batch_put``/``batch_get_into`` of ``--batch`` keys per call (one
   PutStart, PutEnd and durable commit per batch, as an engine storing a request's blocks).
   ``--ssd-codec lz4`` runs the daemon with the codec, ``--compressible`` puts values lz4 can
   shrink (a repeated pattern) instead of random bytes.
3. Daemon start (process start to ``listening on``) and a new client process's first 4 MiB
   put into the DRAM tier, for each ``--dram-gib`` size that fits in /dev/shm with room left.

``--trees A,B`` (repository roots, each with a built .venv) runs (1) and (2) for each tree
in turn, ``--rounds`` times, interleaved: the ceilings are measured right before each
tree's puts, which run in a worker under that tree's own interpreter (its master, daemon
and client); (3) runs for this tree only.

Prints a table, writes bench/out/ssd.json, and prints PASS/MISS for the targets (SSD put/get
>= 70% of the disk's own bandwidth for 4 MiB+; 8 GiB daemon listens within 3 s; first 4 MiB
put <= 20 ms). Exit 0 either way: speed is recorded, not asserted.

    .venv/bin/python bench/ssd_bench.py --dir /nvme/kvstore-bench --dram-gib 1,8,16
    .venv/bin/python bench/ssd_bench.py --trees /work/base2,. --total-mib 512 --rounds 3 \
        --sizes 4194304,16777216 --dram-gib ''
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import kvstore
from kvstore._process import ServerProcess
from kvstore.daemon.aligned_io import open_direct

OUT_PATH = Path(__file__).resolve().parent / "out" / "ssd.json"
MIB = 1 << 20
REQUEST_BYTES = 8 * MIB


def _sequential_gbps(fd: int, num_bytes: int, request_bytes: int, depth: int) -> tuple:
    """(write GB/s, read GB/s) of ``num_bytes`` in ``request_bytes`` requests, ``depth`` in
    flight (the write includes one fdatasync at the end)."""
    buffers = []
    for _ in range(depth):
        buffer = mmap.mmap(-1, request_bytes)
        buffer.write(np.random.default_rng(0).integers(0, 256, request_bytes,
                                                       np.uint8).tobytes())
        buffers.append(buffer)
    offsets = range(0, num_bytes, request_bytes)
    with ThreadPoolExecutor(depth) as pool:
        start = time.perf_counter()
        list(pool.map(lambda i: os.pwritev(fd, [buffers[i % depth]], offsets[i]),
                      range(len(offsets))))
        os.fdatasync(fd)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(lambda i: os.preadv(fd, [buffers[i % depth]], offsets[i]),
                      range(len(offsets))))
        read_s = time.perf_counter() - start
    return num_bytes / write_s / 1e9, num_bytes / read_s / 1e9


def disk_ceiling(directory: str, num_bytes: int) -> dict:
    """Sequential O_DIRECT write then read of one file (buffered if O_DIRECT is refused):
    8 MiB requests one at a time, then 1 MiB requests 4 in flight; the better is kept."""
    path = os.path.join(directory, "disk-ceiling.tmp")
    fd, direct = open_direct(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    try:
        os.posix_fallocate(fd, 0, num_bytes)
        one = _sequential_gbps(fd, num_bytes, REQUEST_BYTES, 1)
        os.ftruncate(fd, 0)
        os.posix_fallocate(fd, 0, num_bytes)        # fresh (unwritten) extents again
        four = _sequential_gbps(fd, num_bytes, MIB, 4)
        # NOTE: and over the same blocks again, now written: no extent conversion per
        # write (what a data file pre-written with zeros gives its puts, 9s)
        rewrite = max(_sequential_gbps(fd, num_bytes, REQUEST_BYTES, 1),
                      _sequential_gbps(fd, num_bytes, MIB, 4))
    finally:
        os.close(fd)
        os.unlink(path)
    return {"direct_io": direct, "bytes": num_bytes,
            "write_gbps": max(one[0], four[0], rewrite[0]),
            "read_gbps": max(one[1], four[1], rewrite[1]),
            "qd1_8mib": {"write_gbps": one[0], "read_gbps": one[1]},
            "qd4_1mib": {"write_gbps": four[0], "read_gbps": four[1]},
            "written_extents": {"write_gbps": rewrite[0], "read_gbps": rewrite[1]}}


def synced_ceiling(directory: str, size: int, num_bytes: int) -> float:
    """GB/s of durable puts of ``size`` bytes, no client in the way: each object written
    in 1 MiB requests, 4 in flight, over extents written before, then a 64-byte index
    record appended and the data file and the index fdatasync'ed at once (what
    ``SsdBackend.sync`` does before a put is acknowledged)."""
    count = max(2, num_bytes // size)
    span = count * size
    path = os.path.join(directory, "disk-synced.tmp")
    index_path = os.path.join(directory, "disk-synced.index")
    fd, _ = open_direct(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    index_fd = os.open(index_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_TRUNC, 0o600)
    buffers = [mmap.mmap(-1, MIB) for _ in range(4)]
    for buffer in buffers:
        buffer.write(np.random.default_rng(1).integers(0, 256, MIB, np.uint8).tobytes())
    record = b"r" * 64
    try:
        os.posix_fallocate(fd, 0, span)
        with ThreadPoolExecutor(4) as pool:
            def write_object(offset: int) -> None:
                pieces = range(offset, offset + size, MIB)
                list(pool.map(lambda i: os.pwritev(fd, [memoryview(buffers[i % 4])[
                    :min(MIB, offset + size - pieces[i])]], pieces[i]), range(len(pieces))))
            for offset in range(0, span, size):       # written once: no conversions below
                write_object(offset)
            os.fdatasync(fd)
            start = time.perf_counter()
            for offset in range(0, span, size):
                write_object(offset)
                os.write(index_fd, record)
                data_synced = pool.submit(os.fdatasync, fd)
                os.fdatasync(index_fd)
                data_synced.result()
            elapsed_s = time.perf_counter() - start
    finally:
        os.close(fd)
        os.close(index_fd)
        os.unlink(path)
        os.unlink(index_path)
    return span / elapsed_s / 1e9


def _value(size: int, compressible: bool) -> np.ndarray:
    """Random bytes (lz4 cannot shrink them), or a repeated 16-byte pattern (it can)."""
    if compressible:
        return np.frombuffer((b"kv-cache block  " * (size // 16 + 1))[:size], np.uint8)
    return np.random.default_rng(size).integers(0, 256, size, np.uint8)


def _wait_prewritten(daemon: ServerProcess, timeout_s: float = 300.0) -> None:
    """Until the daemon's log says its fresh data file is pre-written (a tree without the
    pre-writer, kvstore/daemon/ssd_prewrite.py: at once), so puts do not share the disk
    with the zeros."""
    try:
        import kvstore.daemon.ssd_prewrite  # noqa: F401 - only whether this tree has it
    except ImportError:
        return
    deadline = time.monotonic() + timeout_s
    while "pre-writ" not in daemon.stderr():
        if time.monotonic() > deadline:
            sys.exit(f"the daemon's data file was not pre-written within {timeout_s:.0f} s")
        time.sleep(0.1)


def ssd_rows(directory: str, sizes: list[int], total_bytes: int, batch: int,
             codec: str = "none", compressible: bool = False) -> list[dict]:
    rows = []
    shutil.rmtree(directory, ignore_errors=True)   # NOTE: a fresh store: no keys of a past run
    # NOTE: room for every size's objects, twice (single and batched calls): removed objects
    # stay leased after their get, so reusing the space would evict instead of measuring
    ssd_bytes = int(2 * total_bytes * len(sizes) * 1.1) + 64 * MIB
    # NOTE: --promote off: a get must read the SSD tier, not start copies to DRAM that
    # compete with the next gets for the disk (as `kvstore bench transfer --ssd` does)
    with ServerProcess(["master", "--port", "0", "--promote", "off"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "16MiB",
                           "--ssd", f"{directory}:{ssd_bytes}", "--no-reap-orphans",
                           *(("--ssd-codec", codec) if codec != "none" else ())]) as daemon, \
            kvstore.connect(master.address, transport="tcp") as store:
        _wait_prewritten(daemon)
        for size in sizes:
            count = max(2, total_bytes // size)
            value = _value(size, compressible)
            row = {"size_bytes": size, "count": count, "codec": codec,
                   "compressible": compressible}
            for mode, step in (("single", 1), ("batch", batch)):
                keys = [f"bench/{mode}/{size}/{i}" for i in range(count)]
                groups = [keys[i:i + step] for i in range(0, count, step)]
                start = time.perf_counter()
                for group in groups:
                    errors = store.batch_put(group, [value] * len(group), tier="ssd")
                    assert not any(errors), errors
                put_s = time.perf_counter() - start
                outs = [np.empty(size, np.uint8) for _ in range(step)]
                start = time.perf_counter()
                for group in groups:
                    store.batch_get_into(group, outs[:len(group)])
                get_s = time.perf_counter() - start
                assert all(np.array_equal(out, value) for out in outs)
                prefix = "" if mode == "single" else "batch_"
                row[f"{prefix}put_gbps"] = size * count / put_s / 1e9
                row[f"{prefix}get_gbps"] = size * count / get_s / 1e9
            rows.append(row)
    return rows


FIRST_PUT = r"""
import sys, time, numpy as np, kvstore
store = kvstore.connect(sys.argv[1], transport="shm")
value = np.ones(4 << 20, np.uint8)
start = time.perf_counter(); store.put("first", value); first = time.perf_counter() - start
start = time.perf_counter(); store.put("second", value); second = time.perf_counter() - start
print(first, second); store.close()
"""


def start_rows(sizes_gib: list[int], prefault: bool) -> list[dict]:
    rows = []
    for size_gib in sizes_gib:
        free = shutil.disk_usage("/dev/shm").free
        if prefault and free < (size_gib + 2) << 30:
            rows.append({"dram_gib": size_gib, "skipped": f"/dev/shm has {free >> 30} GiB "
                                                         f"free, need {size_gib + 2}"})
            continue
        with ServerProcess(["master", "--port", "0"]) as master:
            start = time.perf_counter()
            daemon = ServerProcess(["daemon", "--master", master.address, "--dram",
                                    f"{size_gib}GiB", "--prefault" if prefault else
                                    "--no-prefault"])
            listen_s = time.perf_counter() - start
            try:
                out = subprocess.run([sys.executable, "-c", FIRST_PUT, master.address],
                                     check=True, capture_output=True, text=True).stdout
                first_s, second_s = map(float, out.split())
            finally:
                daemon.close()
        rows.append({"dram_gib": size_gib, "prefault": prefault, "listen_s": listen_s, "first_put_ms": first_s * 1e3,
                     "second_put_ms": second_s * 1e3})
    return rows


def _tree_rows(tree: Path, args: argparse.Namespace, directory: str, sizes: list[int],
               json_path: Path) -> list[dict]:
    """``ssd_rows`` run by ``tree``'s own interpreter (its kvstore: master, daemon, client)."""
    command = [str(tree / ".venv" / "bin" / "python"), str(Path(__file__).resolve()),
               "--worker", str(json_path), "--dir", directory, "--sizes",
               ",".join(map(str, sizes)), "--total-mib", str(args.total_mib), "--batch",
               str(args.batch), "--ssd-codec", args.ssd_codec,
               *(("--compressible",) if args.compressible else ())]
    subprocess.run(command, check=True, cwd=tree, timeout=1800)
    return json.loads(json_path.read_text())


def _ceilings(directory: str, args: argparse.Namespace, sizes: list[int]) -> dict:
    disk = disk_ceiling(directory, args.disk_mib * MIB)
    disk["synced_gbps"] = {str(size): synced_ceiling(directory, size, args.disk_mib * MIB)
                           for size in sizes}
    return disk


def _print_runs(runs: list[dict], batch: int) -> None:
    print(f"{'tree':>12} {'round':>5} {'load':>5} {'value':>8} {'calls':>8} {'put GB/s':>9} "
          f"{'% disk':>7} {'% synced':>8} {'get GB/s':>9} {'% disk':>7}")
    for run in runs:
        disk = run["disk"]
        print(f"{run['tree_name']:>12} {run['round']:>5} {run['load_avg'][0]:>5}: disk "
              f"({'O_DIRECT' if disk['direct_io'] else 'buffered'}) write "
              f"{disk['write_gbps']:.2f} GB/s, read {disk['read_gbps']:.2f} (8 MiB x1: "
              f"{disk['qd1_8mib']['write_gbps']:.2f} / {disk['qd1_8mib']['read_gbps']:.2f}; "
              f"1 MiB x4: {disk['qd4_1mib']['write_gbps']:.2f} / "
              f"{disk['qd4_1mib']['read_gbps']:.2f}; written extents: "
              f"{disk['written_extents']['write_gbps']:.2f} / "
              f"{disk['written_extents']['read_gbps']:.2f}); synced per object: " +
              ", ".join(f"{int(size) // MIB if int(size) >= MIB else int(size) // 1024}"
                        f"{'Mi' if int(size) >= MIB else 'Ki'} {gbps:.2f}"
                        for size, gbps in disk["synced_gbps"].items()))
        for row in run["ssd"]:
            synced = disk["synced_gbps"][str(row["size_bytes"])]
            for mode, prefix in (("single", ""), (f"batch {batch}", "batch_")):
                put = row[prefix + "put_gbps"]
                # NOTE: a batch syncs once per call, not per object: no synced ceiling
                of_synced = f"{100 * put / synced:7.0f}%" if not prefix else f"{'-':>8}"
                print(f"{run['tree_name']:>12} {run['round']:>5} {'':>5} "
                      f"{row['size_bytes'] // 1024:>6}Ki {mode:>8} {put:9.2f} "
                      f"{100 * put / disk['write_gbps']:6.0f}% {of_synced} "
                      f"{row[prefix + 'get_gbps']:9.2f} "
                      f"{100 * row[prefix + 'get_gbps'] / disk['read_gbps']:6.0f}%")


def _print_verdicts(runs: list[dict]) -> None:
    """PASS/MISS of the 70% target per tree, round, size and mode, against the streaming
    ceiling and against the synced one."""
    for run in runs:
        disk = run["disk"]
        for row in run["ssd"]:
            if row["size_bytes"] < 4 * MIB:
                continue
            synced = disk["synced_gbps"][str(row["size_bytes"])]
            for op, ceiling in (("put", disk["write_gbps"]), ("get", disk["read_gbps"])):
                for mode, prefix in (("", ""), (" batched", "batch_")):
                    value = row[f"{prefix}{op}_gbps"]
                    verdicts = [f"{'PASS' if value >= 0.7 * ceiling else 'MISS'} vs disk"]
                    if op == "put" and not prefix:
                        verdicts.append(f"{'PASS' if value >= 0.7 * synced else 'MISS'} "
                                        f"vs synced")
                    print(f"{run['tree_name']} round {run['round']}: ssd "
                          f"{row['size_bytes'] // MIB}MiB{mode} {op} >= 70%: "
                          f"{', '.join(verdicts)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="SSD directory (default: a temporary one)")
    parser.add_argument("--disk-mib", type=int, default=1024)
    parser.add_argument("--total-mib", type=int, default=512, help="bytes put per value size")
    parser.add_argument("--sizes", default="65536,1048576,4194304,16777216")
    parser.add_argument("--batch", type=int, default=8, help="keys per batched call")
    parser.add_argument("--dram-gib", default="1,8", help="DRAM sizes for the start test")
    parser.add_argument("--no-prefault", action="store_true",
                        help="start test daemons with --no-prefault (pages allocated only "
                             "where touched: for sizes the host's memory cannot spare)")
    parser.add_argument("--skip-ssd", action="store_true", help="only the start test")
    parser.add_argument("--ssd-codec", default="none", choices=("none", "lz4"),
                        help="the daemon's --ssd-codec")
    parser.add_argument("--compressible", action="store_true",
                        help="values lz4 can shrink (a repeated pattern) instead of random")
    parser.add_argument("--trees", default=".", help="comma-separated repository roots, each "
                        "with a built .venv, run in turn each round (default: this one)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over --trees")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.worker:
        rows = ssd_rows(os.path.join(args.dir, "store"), sizes, args.total_mib * MIB,
                        args.batch, args.ssd_codec, args.compressible)
        Path(args.worker).write_text(json.dumps(rows))
        return 0
    directory = args.dir or tempfile.mkdtemp(prefix="kvstore-ssd-bench-", dir="/var/tmp")
    os.makedirs(directory, exist_ok=True)
    trees = [Path(tree).resolve() for tree in args.trees.split(",")]
    runs = []
    if not args.skip_ssd:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(1, args.rounds + 1):
                for number, tree in enumerate(trees):
                    load = open("/proc/loadavg").read().split()[:3]
                    disk = _ceilings(directory, args, sizes)
                    rows = _tree_rows(tree, args, directory, sizes,
                                      Path(tmp) / f"{round_}-{number}.json")
                    runs.append({"tree": str(tree), "tree_name": tree.name or str(tree),
                                 "round": round_, "load_avg": load,
                                 "load_after": open("/proc/loadavg").read().split()[:3],
                                 "disk": disk, "ssd": rows})
    starts = start_rows([int(s) for s in args.dram_gib.split(",") if s], not args.no_prefault)
    OUT_PATH.parent.mkdir(exist_ok=True)
    OUT_PATH.write_text(json.dumps({"directory": directory, "runs": runs, "start": starts},
                                   indent=2))
    print(f"codec {args.ssd_codec}, {'compressible' if args.compressible else 'random'} "
          f"values; % disk: of the best streaming write (read) ceiling of the same run; "
          f"% synced: of durable puts of that size with no client (synced per object)")
    _print_runs(runs, args.batch)
    for row in starts:
        if "skipped" in row:
            print(f"DRAM {row['dram_gib']} GiB: skipped ({row['skipped']})")
        else:
            print(f"DRAM {row['dram_gib']} GiB{'' if row['prefault'] else ' (--no-prefault)'}: "
                  f"listening after {row['listen_s']:.2f} s, first "
                  f"4 MiB put {row['first_put_ms']:.1f} ms (second {row['second_put_ms']:.1f} ms)")
    _print_verdicts(runs)
    for row in starts:
        if row.get("dram_gib") == 8 and "listen_s" in row:
            print(f"{'PASS' if row['listen_s'] <= 3 else 'MISS'} 8 GiB daemon listens <= 3 s")
        if "first_put_ms" in row:
            print(f"{'PASS' if row['first_put_ms'] <= 20 else 'MISS'} {row['dram_gib']} GiB "
                  f"first 4 MiB put <= 20 ms")
    if args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
