"""Where a single SSD put's time goes, step by step, in the client and the daemon (issue 9, 9p, 9s2).

Each ``--trees`` entry (a repository root with a built .venv) runs, in turn, ``--rounds``
times: a real ``kvstore master`` (``--promote off``) and ``kvstore daemon`` (``--ssd`` in a
fresh directory under ``--dir``, puts starting once its data file is pre-written), both
started through this script so that the daemon's SSD path is wrapped with timestamps, and
``--puts`` single puts of ``--size`` bytes over tcp with ``tier="ssd"`` from a client whose
put path is wrapped too. The wrappers record CLOCK_MONOTONIC (``time.perf_counter_ns``,
the same clock in every process) at the start and end of each step; a step a tree lacks is
simply absent. Per put, relative to its start, the script takes: PutStart's end, the
client's send (``send_write_commit``, else ``Transfers.write``) and the start and end of its
first ``sendmsg`` after it, the daemon's header arrival (its first ``read_exact`` of the
request), its WRITE checks (and the time of ``WriteGuard.check`` and the commit ring's
drain in them), its first receive and the last receive's end, its first and last piece
written to the disk, its sync's start and end, PutEnd's start and the put's end; and, from
``/proc/thread-self/schedstat``, how long the client's send, the daemon thread's wait for the
header and its receive were runnable but waiting for a CPU (``*_runq_ms``). The client's and
the header's thread ids are recorded for ``bench/ssd_put_wakeups.py``. It prints the 25th and 50th percentile put (by total time) of
each run and writes bench/out/ssd_put_profile.json. Steps are wall time on a shared
machine: read the gaps between them, not the totals.

    .venv/bin/python bench/ssd_put_profile.py --trees /work/base2,. --rounds 3 --puts 60
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT_PATH = Path(__file__).resolve().parent / "out" / "ssd_put_profile.json"
_EVENTS: list[tuple[int, str, int]] = []

# (module, class or None for a module-level function, name)
CLIENT_STEPS = (("kvstore.rpc.client", "MasterClient", "begin_put_start"),
                ("kvstore.rpc.client", "MasterClient", "begin_put_end"),
                ("kvstore.client.transfer", "Transfers", "write"),
                ("kvstore.transport.tcp_conn", "Connection", "send_write_commit"),
                ("kvstore.transport.data_frames", None, "sendmsg_all"))
DAEMON_STEPS = (("kvstore.daemon.dataplane", None, "read_exact"),
                ("kvstore.daemon.dataplane", "DataPlaneServer", "_check_write"),
                ("kvstore.daemon.write_guard", "WriteGuard", "check"),
                ("kvstore.daemon.ring_drain", "RingDrain", "drain"),
                ("kvstore.daemon.dataplane", "DataPlaneServer", "_receive_into"),
                ("kvstore.daemon.aligned_io", "AlignedFile", "_write_piece"),
                ("kvstore.daemon.ssd", "SsdBackend", "sync"))


# steps whose run-queue wait (the calling thread's time runnable but waiting for a CPU,
# /proc/thread-self/schedstat) is recorded too, as "<step>.runq" events of that duration
RUNQ_STEPS = {"data_frames.sendmsg_all", "DataPlaneServer._receive_into",
              "DataPlaneServer._serve_one"}


def _run_delay_ns() -> int:
    """This thread's time spent runnable but not running since it started (0 where the
    kernel does not say)."""
    try:
        with open("/proc/thread-self/schedstat") as stats:
            return int(stats.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _wrap(steps) -> None:
    """Record (start ns, step, duration ns) of each call of each step this tree has."""
    import importlib
    for module_name, owner_name, name in steps:
        module = importlib.import_module(module_name)
        owner = module if owner_name is None else getattr(module, owner_name, None)
        fn = getattr(owner, name, None)
        if fn is None:
            continue
        label = f"{owner_name or module_name.rsplit('.', 1)[1]}.{name}"

        def timed(*args, __fn=fn, __label=label, __runq=label in RUNQ_STEPS, **kwargs):
            run_delay = _run_delay_ns() if __runq else 0
            start = time.perf_counter_ns()
            try:
                return __fn(*args, **kwargs)
            finally:
                _EVENTS.append((start, __label, time.perf_counter_ns() - start))
                if __runq:
                    _EVENTS.append((start, __label + ".runq", _run_delay_ns() - run_delay))
        setattr(owner, name, functools.wraps(fn)(timed))


def _wrap_header_wait() -> None:
    """Record, per request, the serving thread's run-queue wait between its wait for the
    request's header and the header's arrival (its first ``read_exact``): how long the
    thread, woken by the client's first bytes, waited for a CPU ("header.runq")."""
    import kvstore.daemon.dataplane as dataplane
    local = threading.local()
    serve_one, read_exact = dataplane.DataPlaneServer._serve_one, dataplane.read_exact

    def timed_serve_one(*args, **kwargs):
        local.run_delay = _run_delay_ns()
        return serve_one(*args, **kwargs)

    def timed_read_exact(*args, **kwargs):
        run_delay = getattr(local, "run_delay", None)
        if run_delay is not None:
            local.run_delay = None
            now = time.perf_counter_ns()
            _EVENTS.append((now, "header.runq", _run_delay_ns() - run_delay))
            _EVENTS.append((now, "header.tid", threading.get_native_id()))
        return read_exact(*args, **kwargs)
    dataplane.DataPlaneServer._serve_one = functools.wraps(serve_one)(timed_serve_one)
    dataplane.read_exact = functools.wraps(read_exact)(timed_read_exact)


def _dump(path: str) -> None:
    Path(path).write_text(json.dumps(_EVENTS))


def server_main(argv: list[str]) -> int:
    """A ``kvstore`` server with the daemon's steps wrapped; SIGUSR1 writes its events."""
    out = os.environ["KVSTORE_PROFILE_OUT"] + f".{argv[0]}.json"
    _wrap(DAEMON_STEPS)
    _wrap_header_wait()
    signal.signal(signal.SIGUSR1, lambda *_: _dump(out))
    from kvstore.cli import main
    return main(argv)


def client_main(args: argparse.Namespace) -> int:
    """Run the puts of one tree (under its own interpreter) and write both sides' events."""
    import numpy as np
    import kvstore
    import kvstore._process as process
    wrapper = Path(args.out + ".sh")
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} "
                       f"--server \"$@\"\n")
    wrapper.chmod(0o755)
    process.kvstore_executable = lambda: str(wrapper)
    _wrap(CLIENT_STEPS)
    env = {"KVSTORE_PROFILE_OUT": args.out}
    directory = Path(args.dir) / "store"
    shutil.rmtree(directory, ignore_errors=True)
    ssd_bytes = (args.puts + 8) * args.size * 2
    with process.ServerProcess(["master", "--port", "0", "--promote", "off"], env=env) as master, \
            process.ServerProcess(["daemon", "--master", master.address, "--dram", "16MiB",
                                   "--ssd", f"{directory}:{ssd_bytes}", "--no-reap-orphans"],
                                  env=env) as daemon, \
            kvstore.connect(master.address, transport="tcp") as store:
        deadline = time.monotonic() + 300
        while "pre-writ" not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
        value = np.random.default_rng(1).integers(0, 256, args.size, np.uint8)
        for i in range(5):
            store.put(f"warm/{i}", value, tier="ssd")
        _EVENTS.clear()
        _EVENTS.append((0, "client.tid", threading.get_native_id()))
        for i in range(args.puts):
            start = time.perf_counter_ns()
            store.put(f"put/{i}", value, tier="ssd")
            _EVENTS.append((start, "put", time.perf_counter_ns() - start))
        os.kill(daemon.proc.pid, signal.SIGUSR1)
        daemon_out = Path(args.out + ".daemon.json")
        while not daemon_out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    _dump(args.out + ".client.json")
    return 0


def _per_put(client: list, daemon: list) -> list[dict]:
    rows = []
    for start, label, duration in client:
        if label != "put":
            continue
        end = start + duration

        def within(events, name):
            return [(s, d) for s, step, d in events if step == name and start <= s <= end]

        def first(events, name):
            found = within(events, name)
            return (min(s for s, _ in found) - start) / 1e6 if found else None

        def last_end(events, name):
            found = within(events, name)
            return (max(s + d for s, d in found) - start) / 1e6 if found else None
        send = first(client, "Connection.send_write_commit") or first(client, "Transfers.write")
        def first_after(events, name, after_ms):
            if after_ms is None:
                return None
            found = [s for s, _ in within(events, name) if s >= start + after_ms * 1e6]
            return (min(found) - start) / 1e6 if found else None

        def end_of_first_after(events, name, after_ms):
            if after_ms is None:
                return None
            found = [(s, d) for s, d in within(events, name) if s >= start + after_ms * 1e6]
            return (min(found)[0] + min(found)[1] - start) / 1e6 if found else None

        def total(events, name):
            found = within(events, name)
            return sum(d for _, d in found) / 1e6 if found else None
        rows.append({
            "put_start_end": last_end(client, "MasterClient.begin_put_start"),
            "send": send,
            # the first sendmsg of the put's data (a WRITE_COMMIT's header and payload)
            "sendmsg": first_after(client, "data_frames.sendmsg_all", send),
            "sendmsg_end": end_of_first_after(client, "data_frames.sendmsg_all", send),
            # the daemon's first read of a request's segment id: its header just arrived
            "header": first_after(daemon, "dataplane.read_exact", send),
            # the daemon thread's wait for a CPU between the header's arrival and its read
            "header_runq_ms": total(daemon, "header.runq"),
            "check": first(daemon, "DataPlaneServer._check_write"),
            "check_end": last_end(daemon, "DataPlaneServer._check_write"),
            "drain_ms": total(daemon, "RingDrain.drain"),
            "guard_ms": total(daemon, "WriteGuard.check"),
            "receive": first(daemon, "DataPlaneServer._receive_into"),
            "receive_end": last_end(daemon, "DataPlaneServer._receive_into"),
            "receive_runq_ms": total(daemon, "DataPlaneServer._receive_into.runq"),
            "send_runq_ms": total(client, "data_frames.sendmsg_all.runq"),
            "disk_first": first(daemon, "AlignedFile._write_piece"),
            "disk_end": last_end(daemon, "AlignedFile._write_piece"),
            "sync": first(daemon, "SsdBackend.sync"),
            "sync_end": last_end(daemon, "SsdBackend.sync"),
            "put_end": first(client, "MasterClient.begin_put_end"),
            "total": duration / 1e6})
    return sorted(rows, key=lambda row: row["total"])


def main() -> int:
    if sys.argv[1:2] == ["--server"]:
        return server_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", default=".", help="comma-separated repository roots, "
                        "each with a built .venv, run in turn each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--puts", type=int, default=60)
    parser.add_argument("--size", type=int, default=4 << 20, help="bytes per put")
    parser.add_argument("--dir", default="/var/tmp/kvstore-ssd-put-profile")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    runs = []
    for round_ in range(1, args.rounds + 1):
        for tree in (Path(t).resolve() for t in args.trees.split(",")):
            out = str(Path(args.dir) / f"events-{round_}-{tree.name}")
            load = open("/proc/loadavg").read().split()[:3]
            subprocess.run([str(tree / ".venv" / "bin" / "python"), str(Path(__file__).resolve()),
                            "--client", "1", "--out", out, "--dir", args.dir, "--puts",
                            str(args.puts), "--size", str(args.size)], check=True, cwd=tree,
                           timeout=900)
            rows = _per_put(json.loads(Path(out + ".client.json").read_text()),
                            json.loads(Path(out + ".daemon.json").read_text()))
            runs.append({"tree": str(tree), "round": round_, "load_avg": load, "puts": rows})
            for quantile in (0.25, 0.5):
                row = rows[int(quantile * (len(rows) - 1))]
                print(f"{tree.name:>10} round {round_} load {load[0]:>5} p{int(quantile * 100)} "
                      + " ".join(f"{key}={'-' if value is None else f'{value:.2f}'}"
                                 for key, value in row.items()), flush=True)
    OUT_PATH.parent.mkdir(exist_ok=True)
    OUT_PATH.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
