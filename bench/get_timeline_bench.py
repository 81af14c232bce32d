"""Where one same-host 4 MiB ``get_into`` spends its time (issue 15: get >= 0.8x of a cold
memcpy with the same access pattern, distinct sources into one buffer), for several source
trees side by side.

Each ``--python`` interpreter (a tree's venv) runs the child once per round, in turn, each
against a fresh ``kvstore master`` and ``kvstore daemon`` on loopback (shm transport,
metadata over the fast path). The child stores ``--objects`` distinct objects (a working set
beyond the L3, so sources are cold, as a get's segment is) and reads them in turn into ONE
numpy buffer, wrapping in its own process the stages of the same-host batch read
(``kvstore.client.shm_batch``):

- ``GetReplicas``: ``MasterClient.call`` of GetReplicas (the master round trip);
- ``mappings``: ``ShmTransport.segment_mappings`` (the cached segment mappings);
- ``copy+hash``: ``read_ranges`` (the fused copy + XXH3 and the checksum comparison);
- ``reply lists``: the rest of ``shm_batch._read`` (the reply's arrays as lists, the
  status and codec checks, the read counters);
- ``release``: ``LeaseReleaser.release`` (queues the lease id for the background thread);
- ``other``: the rest of the call (Python around it: key checks, settings, the request).

Beside them, in the same child and interleaved with the gets (one of each per round of the
loop, so load drift hits all alike): ``memcpy`` (numpy copyto) of each of ``--objects``
private 4 MiB sources into one buffer (the issue's ceiling, one thread, as the get's copy),
``copy_hash`` of the same (the fused kernel without the store) and one master round trip
(``exists`` of an absent key). Prints medians of the rounds' medians (min-max), the get
against the ceiling, and the load average; writes bench/out/get_timeline.json.

    .venv/bin/python bench/get_timeline_bench.py \\
        --python /work/base2/.venv/bin/python --python .venv/bin/python [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import _rounds

MIB = 1 << 20
STAGES = ("GetReplicas", "mappings", "copy+hash", "reply lists", "release", "other", "total")
#: Stages that enclose others: timed apart, their inner stages subtracted.
_OUTER = "_read"
SIDE = ("memcpy into one buffer", "copy_hash into one buffer", "master rtt (exists)",
        "get_into, first read")


class _Recorder:
    """Seconds spent per stage during the current call (repeated stages are summed)."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


REC = _Recorder()


def _timed(stage: str, fn, when=None):
    """``fn`` timed as ``stage`` (only calls for which ``when(*args)`` is true, if given)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if when is not None and not when(*args):
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            REC.add(stage, time.perf_counter() - t0)
    return wrapper


def _instrument() -> None:
    from kvstore.client import leases, shm_batch
    from kvstore.rpc import MasterClient
    from kvstore.transport.shm import ShmTransport

    MasterClient.call = _timed("GetReplicas", MasterClient.call,
                               lambda self, method, *rest: method.name == "GetReplicas")
    ShmTransport.segment_mappings = _timed("mappings", ShmTransport.segment_mappings)
    shm_batch.read_ranges = _timed("copy+hash", shm_batch.read_ranges)
    leases.LeaseReleaser.release = _timed("release", leases.LeaseReleaser.release)
    shm_batch._read = _timed(_OUTER, shm_batch._read)
    try:   # NOTE: the same-host location cache's guarded read (issue 15s), where the tree has it
        from kvstore.client import shm_locations
    except ImportError:
        return
    shm_locations.read_ranges = _timed("copy+hash", shm_locations.read_ranges)


def _child(num_objects: int, repeats: int) -> dict:
    import numpy as np

    import kvstore
    from kvstore._copy_hash import copy_hash
    from kvstore._process import ServerProcess

    from _daemon_ready import wait_allocated, wait_registered

    _instrument()
    size = 4 * MIB
    rng = np.random.default_rng(1)
    values = [rng.integers(0, 256, size, np.uint8) for _ in range(num_objects)]
    out = np.empty(size, np.uint8)
    out[:] = 1
    side: dict[str, list[float]] = {name: [] for name in SIDE}
    rows: list[dict[str, float]] = []
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                           "--port", "0", "--dram", "2GiB"]) as daemon:
        del daemon
        with kvstore.connect(master.address, transport="shm", metadata="fast") as store:
            wait_registered(store)
            keys = [f"get-timeline/{i}" for i in range(num_objects)]
            assert not any(store.batch_put(keys, values))
            wait_allocated()
            for key in keys:   # warm: mappings, page tables, the connection
                assert store.get_into(key, out) == size
            for r in range(repeats):
                i = r % num_objects
                REC.stages = {}
                t0 = time.perf_counter()
                assert store.get_into(keys[i], out) == size
                total = time.perf_counter() - t0
                stages = dict(REC.stages)
                outer = stages.pop(_OUTER, 0.0)
                # NOTE: a cached get (issue 15s) never enters shm_batch._read
                stages["reply lists"] = outer - stages.get("mappings", 0.0) - \
                    stages.get("copy+hash", 0.0) if outer else 0.0
                stages["other"] = total - sum(stages.values())
                stages["total"] = total
                rows.append(stages)
                # NOTE: a different object than the get's, so no source is still cached
                j = (i + num_objects // 2) % num_objects
                t0 = time.perf_counter()
                np.copyto(out, values[j])
                side["memcpy into one buffer"].append(time.perf_counter() - t0)
                j = (j + 1) % num_objects
                t0 = time.perf_counter()
                copy_hash(out, values[j])
                side["copy_hash into one buffer"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.exists("get-timeline/absent")
                side["master rtt (exists)"].append(time.perf_counter() - t0)
                # NOTE: a first read (the key's cached location dropped, outside the timing):
                # the master path, which the location cache (issue 15s) cannot help
                j = (j + 1) % num_objects
                if getattr(store, "_locations", None) is not None:
                    store._locations.forget(keys[j])
                t0 = time.perf_counter()
                assert store.get_into(keys[j], out) == size
                side["get_into, first read"].append(time.perf_counter() - t0)
    return {"stages_ms": {s: statistics.median(row.get(s, 0.0) for row in rows) * 1e3
                          for s in STAGES},
            "side_ms": {name: statistics.median(v) * 1e3 for name, v in side.items()},
            "get_GBps": size / statistics.median(row["total"] for row in rows) / 1e9,
            "memcpy_GBps": size / statistics.median(side["memcpy into one buffer"]) / 1e9}


def _driver(args) -> None:
    runs, loads = _rounds.run_rounds(__file__, args.python, args.rounds,
                                     ["--objects", str(args.objects),
                                      "--repeats", str(args.repeats)])

    def cell(python: str, pick) -> str:
        return _rounds.spread((pick(run) for run in runs[python]), 8, 3)

    width = 26
    print(f"\nshm get_into of 4 MiB into one buffer: ms per call, median of {args.rounds} "
          f"rounds (min-max), {args.repeats} calls per round")
    print(f"{'stage':28s}" + "".join(f"{_rounds.tree_name(p):>{width}s}" for p in args.python))
    for stage in STAGES:
        print(f"{stage:28s}" + "".join(
            f"{cell(p, lambda r: r['stages_ms'][stage]):>{width}s}" for p in args.python))
    print("same run, interleaved:")
    for name in SIDE:
        print(f"{name:28s}" + "".join(
            f"{cell(p, lambda r: r['side_ms'][name]):>{width}s}" for p in args.python))
    for label, pick in (("get GB/s", lambda r: r["get_GBps"]),
                        ("memcpy GB/s (the ceiling)", lambda r: r["memcpy_GBps"]),
                        ("get / ceiling", lambda r: r["get_GBps"] / r["memcpy_GBps"]),
                        ("GetReplicas share of get", lambda r: r["stages_ms"]["GetReplicas"] /
                         r["stages_ms"]["total"])):
        print(f"{label:28s}" + "".join(f"{cell(p, pick):>{width}s}" for p in args.python))
    print("\nload averages before each run:", loads)
    _rounds.write_json(args.json, runs, loads)
    print(f"JSON: {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _rounds.add_flags(parser, str(Path(__file__).resolve().parent / "out" / "get_timeline.json"))
    parser.add_argument("--objects", type=int, default=32,
                        help="distinct 4 MiB objects (and private sources) cycled")
    parser.add_argument("--repeats", type=int, default=200, help="timed gets per round")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.objects, args.repeats)))
        return
    args.python = args.python or [sys.executable]
    os.environ.pop("KVSTORE_TOKEN", None)
    _driver(args)


if __name__ == "__main__":
    main()
