"""Where a real daemon process spends its CPU committing shm puts (issue 10, 10d2): a master
and a daemon (2 GiB DRAM) as processes, the daemon run under this script (``--as-daemon``)
with a cProfile in each of its threads; a client puts over shm (fast metadata path) either
``--mode batch`` (N batches of 128 x 64 KiB) or ``--mode single`` (N single 64 KiB puts).
Prints each daemon thread's CPU (/proc, utime + stime) per key over the timed part (plus
3 s for the heartbeat's re-apply) and, with ``--profile``, writes the daemon's cProfile per
thread group (sorted by own time) to ``--out``.prof.txt. cProfile's overhead inflates the
Python figures; run without ``--profile`` for the CPU figures.

    .venv/bin/python bench/daemon_commit_profile.py --mode batch --n 100 [--profile]
    .venv/bin/python bench/daemon_commit_profile.py --mode single --n 2000 [--profile]
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import glob
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import threading
import time

from _daemon_ready import wait_registered

BATCH = 128
SIZE = 65536


def as_daemon(out: str, profile: bool, argv: list[str]) -> None:
    """Run ``kvstore daemon argv`` in this process; SIGUSR1 snapshots every thread's CPU to
    ``out``.cpuN.json; at exit the per-thread profiles go to ``out``.prof.txt."""
    profiles: list = []
    names: dict[int, str] = {threading.get_native_id(): "MainThread"}

    def hook(frame, event, arg):
        sys.setprofile(None)
        thread = threading.current_thread()
        names[thread.native_id] = thread.name
        if profile:
            prof = cProfile.Profile()
            profiles.append((thread.name, prof))
            prof.enable()

    threading.setprofile(hook)
    snaps = [0]

    def snapshot(*_):
        tick = os.sysconf("SC_CLK_TCK")
        cpu = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu[f"{names.get(int(tid), 'tid')}#{tid}"] = (int(fields[11]) + int(fields[12])) / tick
        snaps[0] += 1
        with open(f"{out}.cpu{snaps[0]}.json", "w") as f:
            json.dump(cpu, f)

    def dump():
        groups: dict[str, pstats.Stats] = {}
        for name, prof in profiles:
            try:
                stats = pstats.Stats(prof)
            except TypeError:      # a thread that never ran Python code
                continue
            group = "-".join(name.split("-")[:3])
            if group in groups:
                groups[group].add(stats)
            else:
                groups[group] = stats
        with open(out + ".prof.txt", "w") as f:
            for group, stats in groups.items():
                text = io.StringIO()
                stats.stream = text
                stats.sort_stats("tottime").print_stats(35)
                f.write(f"===== threads {group}\n{text.getvalue()}\n")

    signal.signal(signal.SIGUSR1, snapshot)
    if profile:
        atexit.register(dump)
    from kvstore.cli import main as kvstore_main
    sys.argv = ["kvstore", *argv]
    kvstore_main()


def drive(mode: str, n: int, out: str, profile: bool) -> None:
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    for path in glob.glob(out + ".cpu*.json"):
        os.remove(path)
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = subprocess.Popen(
        [sys.executable, __file__, "--as-daemon", "--out", out, *(["--profile"] if profile else []),
         "daemon", "--master", master.address, "--host", "127.0.0.1", "--port", "0",
         "--dram", str(2048 << 20)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while "listening on" not in daemon.stdout.readline():
            if daemon.poll() is not None:
                raise RuntimeError("the daemon exited before listening")
        with kvstore.connect(master.address, transport="shm", lease_ttl_s=1.0,
                             metadata="fast") as store:
            wait_registered(store, 10)
            value = np.random.default_rng(2).integers(0, 256, SIZE, dtype=np.uint8)
            for w in range(10):
                store.batch_put([f"w/{w}/{j}" for j in range(BATCH)], [value] * BATCH)
            for w in range(200):
                store.put(f"ws/{w}", value)
            time.sleep(2.0)          # the warm-up's drain and re-apply, outside the figures
            daemon.send_signal(signal.SIGUSR1)
            _wait_file(out + ".cpu1.json")
            started = time.perf_counter()
            if mode == "batch":
                for i in range(n):
                    store.batch_put([f"b/{i}/{j}" for j in range(BATCH)], [value] * BATCH)
                keys = n * BATCH
            else:
                for i in range(n):
                    store.put(f"s/{i}", value)
                keys = n
            elapsed = time.perf_counter() - started
            time.sleep(3.0)          # the drain and the heartbeat's re-apply of the timed part
            daemon.send_signal(signal.SIGUSR1)
            _wait_file(out + ".cpu2.json")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        master.close()
    before = json.load(open(out + ".cpu1.json"))
    after = json.load(open(out + ".cpu2.json"))
    print(f"mode {mode}: {keys} keys, wall {elapsed / keys * 1e6:.1f} us/key, "
          f"load {' '.join(open('/proc/loadavg').read().split()[:3])}")
    total = 0.0
    for name in sorted(after):
        spent = after[name] - before.get(name, 0.0)
        total += spent
        if spent > 0:
            print(f"  daemon thread {name:45} {spent / keys * 1e6:8.2f} us CPU/key")
    print(f"  daemon, all threads {total / keys * 1e6:8.2f} us CPU/key (100 Hz ticks)")
    if profile:
        print(f"  profile: {out}.prof.txt")


def _wait_file(path: str) -> None:
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon wrote no {path}")
        time.sleep(0.01)
    time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("batch", "single"), default="batch")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", default="/tmp/kvstore-daemon-profile")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--as-daemon", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.as_daemon:
        as_daemon(args.out, args.profile, rest)
    else:
        drive(args.mode, args.n, args.out, args.profile)


if __name__ == "__main__":
    main()
