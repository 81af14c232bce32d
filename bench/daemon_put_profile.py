"""Where one small tcp put's time goes in the master and the daemon: both run as their own
processes under cProfile in every thread (bench/profiled_server.py), a client in this
process does ``--puts`` single puts of ``--size`` bytes (tcp transport, fast metadata
path), then each server writes its threads' profiles; prints the put's p50, the CPU per
put of each process (from /proc), and each thread group's top functions by own time.

Run it with the python of the tree to profile (its servers come from that tree):

    /work/base2/.venv/bin/python bench/daemon_put_profile.py [--puts 3000] [--size 65536]
        [--top 25] [--sort tottime] [--out /tmp/prof]

cProfile slows every Python call, so the figures are for comparing trees and finding which
calls grew, not latencies (bench/tcp_put_cost_bench.py measures those).
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _daemon_ready import wait_registered

HERE = Path(__file__).resolve().parent
_LISTENING = re.compile(r"^listening on (\S+):(\d+)\s*$")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Profiled:
    """One ``kvstore`` server under bench/profiled_server.py."""

    def __init__(self, out_prefix: str, args: list[str]):
        self.out_prefix = out_prefix
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "profiled_server.py"), out_prefix, *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in self.proc.stdout:
            match = _LISTENING.match(line.strip())
            if match:
                self.address = f"{match.group(1)}:{match.group(2)}"
                break
        else:
            self.log.seek(0)
            raise RuntimeError(f"{args[0]} did not start: {self.log.read().decode()[-2000:]}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def dump(self) -> dict[str, pstats.Stats]:
        for path in Path(self.out_prefix).parent.glob(Path(self.out_prefix).name + ".*.prof"):
            path.unlink()
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        found: dict[str, pstats.Stats] = {}
        while time.monotonic() < deadline:
            self.log.seek(0)
            if b"profiles written" in self.log.read():
                break
            time.sleep(0.1)   # NOTE: another process's file: polled, with a long deadline
        for path in Path(self.out_prefix).parent.glob(Path(self.out_prefix).name + ".*.prof"):
            found[path.name.rsplit(".", 2)[1]] = pstats.Stats(str(path))
        return found

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=3000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--out", default=None, help="profile file prefix (default: a temp dir)")
    parser.add_argument("--client-option", action="append", default=[],
                        help="NAME=INT passed to kvstore.connect (e.g. reserve_bytes=67108864)")
    args = parser.parse_args()
    import numpy as np

    import kvstore

    out = args.out or tempfile.mkdtemp(prefix="kvstore-prof-")
    os.makedirs(out, exist_ok=True)
    master = _Profiled(f"{out}/master", ["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = _Profiled(f"{out}/daemon", [
        "daemon", "--master", master.address, "--host", "127.0.0.1", "--port", "0",
        "--dram", str(max(1 << 30, 2 * args.size * (args.puts + 300)))])
    options = {name: int(value) for name, value in
               (option.split("=", 1) for option in args.client_option)}
    try:
        with kvstore.connect(master.address, transport="tcp", metadata="fast",
                             **options) as store:
            wait_registered(store, 10)
            value = np.random.default_rng(1).integers(0, 256, args.size, dtype=np.uint8)
            for i in range(200):
                store.put(f"warm/{i}", value)
            cpu0 = {"master": _cpu_s(master.proc.pid), "daemon": _cpu_s(daemon.proc.pid),
                    "client": time.process_time()}
            times = []
            for i in range(args.puts):
                start = time.perf_counter()
                store.put(f"key/{i}", value)
                times.append(time.perf_counter() - start)
            cpu1 = {"master": _cpu_s(master.proc.pid), "daemon": _cpu_s(daemon.proc.pid),
                    "client": time.process_time()}
        times.sort()
        load = open("/proc/loadavg").read().split()[0]
        print(f"{args.puts} puts of {args.size} B under cProfile: p50 "
              f"{times[len(times) // 2] * 1e6:.0f} us (load {load})")
        for name in ("client", "master", "daemon"):
            print(f"  CPU {name:7s} {(cpu1[name] - cpu0[name]) / args.puts * 1e6:7.1f} us/put")
        for server_name, server in (("master", master), ("daemon", daemon)):
            for group, stats in sorted(server.dump().items()):
                text = io.StringIO()
                stats.stream = text
                stats.sort_stats(args.sort).print_stats(args.top)
                print(f"==== {server_name}: {group} threads (includes the 200 warm-up puts) ====")
                print("\n".join(line for line in text.getvalue().splitlines()
                                if line.strip() and "Ordered by" not in line
                                and "due to restriction" not in line))
    finally:
        daemon.close()
        master.close()


if __name__ == "__main__":
    main()
