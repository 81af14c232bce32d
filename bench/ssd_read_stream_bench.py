"""A get's SSD read stream alone: how soon its first piece is sent and when it ends (issue 9, 9s2).

Each ``--trees`` entry (a repository root with a built .venv) runs, in turn, ``--rounds``
times, under its own interpreter: an ``SsdBackend`` (direct I/O) in a fresh directory under
``--dir``, its pre-write awaited, 16 objects of ``--size`` random bytes written, then
``--gets`` reads of them in turn through ``read_stream`` (the daemon's READ path without the
request parse), each piece handed to ``sendall`` on a socket whose other end is a separate
process that receives the whole object and answers one byte. Per read: ms to the first
piece sent, and to the answer. Prints the p50s and GB/s per run, writes
bench/out/ssd_read_stream.json. No ceiling: compare the trees of one round, interleaved;
the disk's own read ceiling is bench/ssd_bench.py's.

    .venv/bin/python bench/ssd_read_stream_bench.py --trees /work/base2,. --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT_PATH = Path(__file__).resolve().parent / "out" / "ssd_read_stream.json"
NUM_OBJECTS = 16


def _receiver(sock: socket.socket, size: int) -> None:
    """Receive objects of ``size`` bytes and answer each with one byte, until EOF."""
    buffer = bytearray(1 << 20)
    while True:
        received = 0
        while received < size:
            num_bytes = sock.recv_into(buffer)
            if not num_bytes:
                return
            received += num_bytes
        sock.sendall(b"k")


def worker(args: argparse.Namespace) -> dict:
    from kvstore.daemon.ssd import SsdBackend
    directory = tempfile.mkdtemp(dir=args.dir, prefix="read-stream-")
    ssd = SsdBackend("ssd0", (NUM_OBJECTS + 8) * args.size, directory=directory,
                     node_id="bench")
    try:
        if ssd.prewriter is not None:
            ssd.prewriter.done.wait(300)
        data = memoryview(bytearray(os.urandom(args.size)))
        for i in range(NUM_OBJECTS):
            ssd.write_from(i * args.size, data)
        sender, receiver = socket.socketpair()
        for sock in (sender, receiver):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        pid = os.fork()
        if pid == 0:
            sender.close()
            _receiver(receiver, args.size)
            os._exit(0)
        receiver.close()
        firsts, totals = [], []
        for i in range(args.gets):
            start = time.perf_counter()
            first: list[float] = []

            def drain(piece: memoryview) -> None:
                if not first:
                    first.append(time.perf_counter() - start)
                sender.sendall(piece)
            ssd.read_stream((i % NUM_OBJECTS) * args.size, args.size, drain)
            sender.recv(1)
            totals.append(time.perf_counter() - start)
            firsts.append(first[0])
        sender.close()
        os.waitpid(pid, 0)
    finally:
        ssd.close()
        shutil.rmtree(directory, ignore_errors=True)
    return {"first_piece_ms_p50": statistics.median(firsts) * 1e3,
            "get_ms_p50": statistics.median(totals) * 1e3,
            "get_ms_p25": sorted(totals)[len(totals) // 4] * 1e3,
            "gbps_p50": args.size / statistics.median(totals) / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", default=".", help="comma-separated repository roots, "
                        "each with a built .venv, run in turn each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gets", type=int, default=80)
    parser.add_argument("--size", type=int, default=4 << 20, help="bytes per object")
    parser.add_argument("--dir", default="/var/tmp", help="where the temporary SSD "
                        "directories go (a disk, not tmpfs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.worker).write_text(json.dumps(worker(args)))
        return 0
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(1, args.rounds + 1):
            for tree in (Path(t).resolve() for t in args.trees.split(",")):
                out = Path(scratch) / f"{round_}-{tree.name}.json"
                load = open("/proc/loadavg").read().split()[:3]
                subprocess.run([str(tree / ".venv" / "bin" / "python"),
                                str(Path(__file__).resolve()), "--worker", str(out),
                                "--gets", str(args.gets), "--size", str(args.size),
                                "--dir", args.dir], check=True, cwd=tree, timeout=600)
                row = {"tree": str(tree), "round": round_, "load_avg": load,
                       **json.loads(out.read_text())}
                runs.append(row)
                print(f"{tree.name:>10} round {round_} load {load[0]:>5}: first piece sent "
                      f"{row['first_piece_ms_p50']:.2f} ms, get p50 {row['get_ms_p50']:.2f} "
                      f"ms (p25 {row['get_ms_p25']:.2f}) = {row['gbps_p50']:.2f} GB/s",
                      flush=True)
    OUT_PATH.parent.mkdir(exist_ok=True)
    OUT_PATH.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
