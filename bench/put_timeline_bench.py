"""Where a batched put's time goes: a per-stage timeline of ONE ``batch_put``, for several
source trees side by side (issue 10's batched-put budget).

Each ``--python`` interpreter (a tree's venv) runs the child once per round, in turn, each
against a fresh ``kvstore master`` and ``kvstore daemon`` of its own on loopback (metadata
over the fast path). The child wraps, in its own process, the stages of the put flow that
its tree has (``kvstore.client.writer``; a stage the tree lacks is simply absent):

- ``put_start send``: ``MasterClient.begin_put_start`` (the request leaves);
- ``checksum``: XXH3 of every value (``writer.checksum``; how many calls and on which
  thread are printed: once per value, on the caller's thread, while PutStart is out);
- ``put_start wait``: reading PutStart's reply;
- ``write``: ``Transfers.write`` (shm copies or tcp WRITE frames);
- ``ring_commit``, ``commit send``, ``commit wait``: durable commit's ring record,
  CLIENT_COMMIT frames and the daemons' answers (``DaemonCommitter``);
- ``put_end``: the PutEnd round trip; where the tree overlaps it with the ring record,
  ``put_end send`` and ``put_end wait`` (the ring record is appended between them);
- ``other``: the rest of the call (key checks, bookkeeping).

Beside them, per batch, the CPU milliseconds the client, the master and the daemon spent
(``/proc/PID/stat``, over all batches of a scenario, so tick granularity averages out; on a
loaded host a steadier figure than wall time), timed apart, the per-key ``remove`` that
some benchmarks put inside their timed loop, the master's own time in the PutStart and
PutEnd handlers (its ``--metrics-port`` histogram sums: the work under its lock, without
the round trip) and one master round trip (``exists``). The timed
batches start once the daemon's segment is allocated (its background ``posix_fallocate``
would otherwise land inside them).

Scenarios: shm 32 x 1 MiB, shm 128 x 64 KiB, tcp 32 x 1 MiB, tcp 1 x 64 KiB (a single put:
its "total" median is the p50), or ``--scenarios``; transport ``ssd`` is a tcp put with
``tier="ssd"`` into the daemon's SSD segment (``--ssd-dir``; e.g. ``ssd:1:4194304``, issue 9's
single 4 MiB SSD put: ``write`` is then the WRITE into the SSD file, ``commit wait`` the
daemon's index record and fdatasync). Prints, per scenario and tree,
the median of the rounds' medians with the min-max range, and the load average; writes
bench/out/put_timeline.json.

    .venv/bin/python bench/put_timeline_bench.py \
        --python /work/base/.venv/bin/python --python .venv/bin/python [--rounds 3]
        [--scenarios shm:1:4194304 --prefault]   (the daemon's pool written once first)
        [--python .venv/bin/python+copy2]   (that interpreter's client copies with
        copy_threads=2; "+copy1": copy_threads=1; combine as PYTHON+reserve+copy2)
        [--python .venv/bin/python+reserve [--reserve-bytes 67108864]]   (that
        interpreter's client puts into space reserved ahead: stages "reserve",
        "copy+hash (reserved)", "put_end", "ring_commit")
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
SCENARIOS = (("shm", 32, MIB), ("shm", 128, 64 * KIB), ("tcp", 32, MIB), ("tcp", 1, 64 * KIB))
STAGES = ("reserve", "put_start send", "checksum", "put_start wait", "write",
          "copy+hash (reserved)", "commit send", "put_end",
          "put_end send", "ring_commit", "put_end wait", "commit wait", "other", "total")
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class _Recorder:
    """Seconds spent per stage during the current batch (stages may repeat: summed)."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self.checksum_calls = 0
        self.checksum_threads: set[str] = set()

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


REC = _Recorder()


def _timed(stage: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            REC.add(stage, time.perf_counter() - t0)
    return wrapper


class _TimedPending:
    """A call in flight whose ``result()`` is timed as stage ``stage``."""

    def __init__(self, pending, stage: str):
        self._pending = pending
        self._stage = stage

    def result(self):
        t0 = time.perf_counter()
        try:
            return self._pending.result()
        finally:
            REC.add(self._stage, time.perf_counter() - t0)


def _split(cls, name: str, send_stage: str, wait_stage: str) -> None:
    """Wrap ``cls.name`` (a ``begin_*`` verb): its call as ``send_stage``, its result's
    wait as ``wait_stage``."""
    begin = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        pending = begin(self, *args, **kwargs)
        REC.add(send_stage, time.perf_counter() - t0)
        return _TimedPending(pending, wait_stage)

    setattr(cls, name, wrapper)


def _instrument() -> None:
    """Wrap the put flow's stages that this tree has."""
    from kvstore.client import transfer, writer
    from kvstore.rpc import MasterClient

    _split(MasterClient, "begin_put_start", "put_start send", "put_start wait")
    if hasattr(MasterClient, "begin_put_end"):   # PutEnd overlapped with the ring record
        _split(MasterClient, "begin_put_end", "put_end send", "put_end wait")
    else:
        MasterClient.put_end = _timed("put_end", MasterClient.put_end)
    transfer.Transfers.write = _timed("write", transfer.Transfers.write)
    raw_checksum = writer.checksum

    def checksum(src):
        REC.checksum_calls += 1
        REC.checksum_threads.add(threading.current_thread().name)
        t0 = time.perf_counter()
        try:
            return raw_checksum(src)
        finally:
            REC.add("checksum", time.perf_counter() - t0)

    writer.checksum = checksum
    try:
        from kvstore.client import committer
    except ImportError:       # a tree before durable commit
        return
    try:
        from kvstore.client import reservations
    except ImportError:       # a tree before reservations (issue 15, 15r)
        reservations = None
    if reservations is not None:
        # NOTE: the reserved put's own steps: its copy and hash in one pass, its PutEnd
        reservations._copy_hashed = _timed("copy+hash (reserved)",
                                           reservations._copy_hashed)
        MasterClient.reserve = _timed("reserve", MasterClient.reserve)
        reservations.checksum = checksum      # its tcp path hashes before the WRITE
        MasterClient.put_end_reserved_committing = _timed(
            "put_end", MasterClient.put_end_reserved_committing)
    committer.DaemonCommitter.ring_commit = _timed("ring_commit",
                                                   committer.DaemonCommitter.ring_commit)
    committer.DaemonCommitter.begin = _timed("commit send", committer.DaemonCommitter.begin)
    committer.Commits.finish = _timed("commit wait", committer.Commits.finish)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _master_rpc_s(metrics_url: str) -> dict[str, tuple[float, float]]:
    """method -> (calls, seconds in its handler) over the fast path, from the master's
    Prometheus metrics (the time under the master's lock, without the round trip)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for suffix, slot in (("_count{", 0), ("_sum{", 1)):
            if line.startswith("kvstore_master_rpc_seconds" + suffix) and \
                    'transport="fast"' in line:
                method = line.split('method="')[1].split('"')[0]
                out.setdefault(method, [0.0, 0.0])[slot] = float(line.rsplit(" ", 1)[1])
    return {m: (v[0], v[1]) for m, v in out.items()}


def _scenarios(spec: str) -> list[tuple[str, int, int]]:
    """``shm:32:1048576,tcp:...`` (or "all") as (transport, batch, value bytes) tuples."""
    if spec == "all":
        return list(SCENARIOS)
    out = []
    for item in spec.split(","):
        transport, batch, size = item.split(":")
        out.append((transport, int(batch), int(size)))
    return out


def _prefault(store, pool_bytes: int) -> None:
    """Write the daemon's DRAM pool once and free it again (``--prefault``).

    NOTE: a fresh shm page costs a fault and the kernel zeroing it on its first write (and,
    on a machine short of free pages, reclaim); a long-running daemon's pages are all
    touched, so with this the timed batches measure that steady state (client_bench.py
    does the same)."""
    import numpy as np

    chunk = np.ones(4 * MIB, dtype=np.uint8)
    keys = [f"prefault/{i}" for i in range(pool_bytes // chunk.nbytes * 9 // 10)]
    for first in range(0, len(keys), 64):
        group = keys[first:first + 64]
        assert not any(store.batch_put(group, [chunk] * len(group)))
    store.remove_prefix("prefault/", force=True)
    # NOTE: a "+reserve" client's last prefault batch fits a reservation, which the full
    # pool refuses, and a refused client stops reserving for a second
    # (client/reservations.py RETRY_AFTER_S): without this wait the timed batches of a
    # "+reserve" run went through PutStart
    time.sleep(1.5)


def _child(batches: int, scenarios: list[tuple[str, int, int]], ssd_dir: str,
           reserve_bytes: int = 0, prefault: bool = False, copy_threads: int = 0) -> dict:
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    from _daemon_ready import wait_allocated, wait_registered

    _instrument()
    out: dict[str, dict] = {}
    metrics_port = _free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    ssd_bytes = sum(batch * size * (batches + 4) for transport, batch, size in scenarios
                    if transport == "ssd")
    ssd = ["--ssd", f"{ssd_dir}:{ssd_bytes + 64 * MIB}"] if ssd_bytes else []
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                        "--metrics-port", str(metrics_port)]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                           "--port", "0", "--dram", "2GiB", *ssd]) as daemon:
        for transport, batch, size in scenarios:
            tier = "ssd" if transport == "ssd" else None
            options = {"reserve_bytes": reserve_bytes} if reserve_bytes else {}
            if copy_threads:
                options["copy_threads"] = copy_threads
            with kvstore.connect(master.address, transport="tcp" if tier else transport,
                                 metadata="fast", lease_ttl_s=1.0, **options) as store:
                wait_registered(store)
                if prefault and transport == "shm":
                    _prefault(store, 2048 * MIB)
                value = np.random.default_rng(1).integers(0, 256, size, np.uint8)
                name = f"{transport} {batch} x {size // KIB} KiB"
                # warm: mappings, connections, the pool's pages
                for w in range(3):
                    keys = [f"warm-{name}-{w}-{j}" for j in range(batch)]
                    assert not any(store.batch_put(keys, [value] * batch, tier=tier))
                    store.remove_prefix(f"warm-{name}-", force=True)
                wait_allocated()
                rows: list[dict[str, float]] = []
                rpc0 = _master_rpc_s(metrics_url)
                cpu0 = {"master": _cpu_s(master.proc.pid), "daemon": _cpu_s(daemon.proc.pid),
                        "client": time.process_time()}
                REC.checksum_calls = 0
                REC.checksum_threads.clear()
                batch_keys = []
                for b in range(batches):
                    keys = [f"{name}-{b}-{j}" for j in range(batch)]
                    batch_keys.append(keys)
                    REC.stages = {}
                    t0 = time.perf_counter()
                    errors = store.batch_put(keys, [value] * batch, tier=tier)
                    total = time.perf_counter() - t0
                    assert not any(errors), errors
                    stages = dict(REC.stages)
                    stages["other"] = total - sum(stages.values())
                    stages["total"] = total
                    rows.append(stages)
                cpu = {who: (_cpu_s(p.proc.pid) - cpu0[who]) / batches * 1e3
                       for who, p in (("master", master), ("daemon", daemon))}
                cpu["client"] = (time.process_time() - cpu0["client"]) / batches * 1e3
                rpc1 = _master_rpc_s(metrics_url)
                handler_ms = {}
                for method in ("PutStart", "PutEnd"):
                    calls = rpc1.get(method, (0, 0))[0] - rpc0.get(method, (0, 0))[0]
                    seconds = rpc1.get(method, (0, 0))[1] - rpc0.get(method, (0, 0))[1]
                    handler_ms[method] = seconds / max(calls, 1) * 1e3
                rtts = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    store.exists("absent")
                    rtts.append(time.perf_counter() - t0)
                # NOTE: apart from the puts (and their CPU figures): some benchmarks time a
                # per-key remove of each batch inside their put loop
                removes: list[float] = []
                for keys in batch_keys:
                    t0 = time.perf_counter()
                    for key in keys:
                        store.remove(key)
                    removes.append(time.perf_counter() - t0)
                names = {stage for row in rows for stage in row}
                out[name] = {
                    "stages_ms": {s: statistics.median(r.get(s, 0.0) for r in rows) * 1e3
                                  for s in names},
                    "GBps": batch * size / statistics.median(r["total"] for r in rows) / 1e9,
                    "master_cpu_ms_per_batch": cpu["master"],
                    "master_rtt_ms": statistics.median(rtts) * 1e3,
                    "master_put_start_handler_ms": handler_ms["PutStart"],
                    "master_put_end_handler_ms": handler_ms["PutEnd"],
                    "daemon_cpu_ms_per_batch": cpu["daemon"],
                    "client_cpu_ms_per_batch": cpu["client"],
                    "all_cpu_ms_per_batch": sum(cpu.values()),
                    "per_key_removes_ms": statistics.median(removes) * 1e3,
                    "checksum_calls_per_value": REC.checksum_calls / (batches * batch),
                    "checksum_threads": sorted(REC.checksum_threads),
                }
    return out


def _parse(python: str) -> tuple[str, bool, int]:
    """PYTHON[+reserve][+copyN] as (interpreter, reserve, copy_threads: 0 = the default)."""
    interpreter, *suffixes = python.split("+")
    copies = [int(s.removeprefix("copy")) for s in suffixes if s.startswith("copy")]
    return interpreter, "reserve" in suffixes, copies[0] if copies else 0


def _tree(python: str) -> str:
    interpreter, _, _ = _parse(python)
    suffix = python[len(interpreter):]
    return Path(interpreter).absolute().parent.parent.parent.name + suffix


def _driver(args) -> None:
    runs: dict[str, list[dict]] = {p: [] for p in args.python}
    loads = []
    for _ in range(args.rounds):
        for python in args.python:
            loads.append(open("/proc/loadavg").read().split()[:3])
            shutil.rmtree(args.ssd_dir, ignore_errors=True)
            # NOTE: PYTHON+reserve: that interpreter's client reserves space ahead
            interpreter, reserved, copy_threads = _parse(python)
            reserve = args.reserve_bytes if reserved else 0
            done = subprocess.run([interpreter, __file__, "--child",
                                   "--copy-threads", str(copy_threads),
                                   "--batches", str(args.batches), "--scenarios",
                                   args.scenarios, "--ssd-dir", args.ssd_dir,
                                   "--reserve-bytes", str(reserve),
                                   *(["--prefault"] if args.prefault else [])],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{python}: the child failed:\n{done.stderr[-3000:]}")
            runs[python].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def cell(python: str, scenario: str, pick) -> str:
        values = sorted(pick(run[scenario]) for run in runs[python])
        return f"{statistics.median(values):8.2f} ({values[0]:.2f}-{values[-1]:.2f})"

    width = 26
    for transport, batch, size in _scenarios(args.scenarios):
        scenario = f"{transport} {batch} x {size // KIB} KiB"
        print(f"\n{scenario}: ms per batch, median of {args.rounds} rounds (min-max)")
        print(f"{'stage':24s}" + "".join(f"{_tree(p):>{width}s}" for p in args.python))
        for stage in STAGES:
            if not any(stage in run[scenario]["stages_ms"] for p in args.python
                       for run in runs[p]):
                continue
            print(f"{stage:24s}" + "".join(
                f"{cell(p, scenario, lambda r: r['stages_ms'].get(stage, 0.0)):>{width}s}"
                for p in args.python))
        for label, field in (("GB/s", "GBps"),
                             ("master rtt (exists)", "master_rtt_ms"),
                             ("master PutStart handler", "master_put_start_handler_ms"),
                             ("master PutEnd handler", "master_put_end_handler_ms"),
                             ("master CPU ms/batch", "master_cpu_ms_per_batch"),
                             ("daemon CPU ms/batch", "daemon_cpu_ms_per_batch"),
                             ("client CPU ms/batch", "client_cpu_ms_per_batch"),
                             ("all three CPU ms/batch", "all_cpu_ms_per_batch"),
                             ("per-key removes ms", "per_key_removes_ms"),
                             ("checksums per value", "checksum_calls_per_value")):
            print(f"{label:24s}" + "".join(
                f"{cell(p, scenario, lambda r: r[field]):>{width}s}" for p in args.python))
        threads = {t for p in args.python for run in runs[p]
                   for t in run[scenario]["checksum_threads"]}
        print(f"{'checksum thread(s)':24s} {', '.join(sorted(threads))}")
    print("\nload averages before each run:", loads)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runs": runs, "loadavg": loads}, indent=1))
    print(f"JSON: {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--python", action="append", default=None,
                        help="an interpreter whose kvstore to measure (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per scenario")
    parser.add_argument("--scenarios", default="all",
                        help='"all" or TRANSPORT:BATCH:BYTES,... (e.g. shm:128:65536)')
    parser.add_argument("--ssd-dir", default="/var/tmp/kvstore-put-timeline-ssd",
                        help="the daemon's SSD directory for ssd scenarios (emptied per run)")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "out" /
                                              "put_timeline.json"))
    parser.add_argument("--reserve-bytes", type=int, default=64 * MIB,
                        help="reserve_bytes of the interpreters given as PYTHON+reserve")
    parser.add_argument("--prefault", action="store_true",
                        help="write the daemon's DRAM pool once before the shm scenarios "
                             "(steady-state pages, as client_bench.py)")
    parser.add_argument("--copy-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.batches, _scenarios(args.scenarios), args.ssd_dir,
                                args.reserve_bytes, args.prefault, args.copy_threads)))
        return
    args.python = args.python or [sys.executable]
    os.environ.pop("KVSTORE_TOKEN", None)
    _driver(args)


if __name__ == "__main__":
    main()
