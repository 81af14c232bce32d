"""Where a client put or get over the nixl transport spends its time, step by step, beside raw
NIXL of the same pattern between the same two processes; one tree per ``--trees`` entry.

One master and one ``kvstore daemon --nixl`` on loopback; ``kvstore.connect(...,
transport="nixl")``; single puts/gets of one ``--size`` value and batches of ``--items``
(the pattern of ``kvstore bench transfer``'s client rows: one source value put to fresh keys,
gets into distinct buffers). Each step is a wrapped function whose own time (nested wrapped
steps subtracted) is summed per call: master sends and waits, the hash, the write checks,
placing local memory (registration), NIXL's post (the CMA copy), polling, release, PutEnd
and the daemons' commits. Raw NIXL of the same pattern (``kvstore.bench.nixl_ceiling``)
runs in interleaved rounds. Prints, per tree and case, the median us per call of each step,
the call's median wall and client CPU (all threads) per call, GB/s and, for singles, the
ratio to raw NIXL of one cache-hot value, with the load average.

    .venv/bin/python bench/nixl_put_steps.py --trees /work/base2,. [--rounds 5]

Each tree is run with its own ``.venv/bin/python`` (this file is passed to it), so the tree's
own kvstore is measured; steps a tree lacks are simply absent from its rows.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time

MIB = 1 << 20

# (dotted module path, attribute path, label): the steps timed, where the tree has them
STEPS = [
    ("kvstore.rpc.client", "MasterClient.begin_put_start", "master PutStart send"),
    ("kvstore.rpc.client", "MasterClient.begin_put_end", "master PutEnd send"),
    ("kvstore.rpc.client", "MasterClient.get_replicas_leased", "master GetReplicas"),
    ("kvstore.rpc.client", "_Result.result", "master wait"),
    ("kvstore.client.writer", "checksum", "hash (put)"),
    ("kvstore.client.hashing", "Checksums.result", "hash wait (put)"),
    ("kvstore.client.writer", "_end", "PutEnd + commits (self)"),
    ("kvstore.client.committer", "DaemonCommitter.begin", "commit frames send"),
    ("kvstore.client.committer", "Commits.finish", "commit frames wait"),
    ("kvstore.client.transfer", "Transfers.write", "Transfers.write (self)"),
    ("kvstore.client.transfer", "Transfers.read", "Transfers.read (self)"),
    ("kvstore.transport.nixl_checks", "WriteChecks.send", "write checks send"),
    ("kvstore.transport.nixl_checks", "WriteChecks.receive", "write checks wait"),
    ("kvstore.transport.nixl", "NixlTransport._prepare", "prepare items"),
    ("kvstore.transport.nixl", "NixlTransport._place", "place local memory (self)"),
    ("kvstore.transport.nixl_lib", "AgentHandle.register_many", "register"),
    ("kvstore.transport.nixl_lib", "AgentHandle.register", "register"),
    ("kvstore.transport.nixl_lib", "AgentHandle.deregister", "deregister"),
    ("kvstore.transport.nixl", "NixlTransport._post", "post (self)"),
    ("kvstore.transport.nixl", "NixlTransport._create", "create xfer (self: descs, initialize)"),
    ("kvstore.transport.nixl", "NixlTransport._move", "poll (self)"),
    ("kvstore.transport.nixl", "NixlTransport._finish", "finish"),
    ("kvstore.transport.nixl", "NixlTransport._release_staging", "release (self)"),
    ("kvstore.transport.nixl", "NixlTransport._run", "transport other (self)"),
    ("kvstore.transport.nixl", "NixlTransport.read_many_checksummed", "verify (self)"),
]
# NIXL's own post call (the CMA copy), wrapped on the agent object once it exists
AGENT_STEPS = [("transfer", "NIXL post (copy)"), ("check_xfer_state", "NIXL check state"),
               ("initialize_xfer", "NIXL initialize_xfer"),
               ("get_xfer_descs", "NIXL get_xfer_descs")]


class Profile:
    """Own time per label for the call in progress (nested wrapped calls subtracted); time
    spent in other threads than the caller's (the put's background hash) is labelled
    "[bg] ..." and is not part of the call's own path."""

    def __init__(self) -> None:
        self.now: collections.Counter = collections.Counter()
        self.local = threading.local()      # per thread: open calls [start, in children]
        self.main = threading.get_ident()

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            stack = self.local.__dict__.setdefault("stack", [])
            frame = [time.perf_counter(), 0.0]
            stack.append(frame)
            try:
                return inner(*args, **kwargs)
            finally:
                stack.pop()
                spent = time.perf_counter() - frame[0]
                prefix = "" if threading.get_ident() == self.main else "[bg] "
                self.now[prefix + label] += spent - frame[1]
                if stack:
                    stack[-1][1] += spent
        setattr(owner, name, timed)


# what bounds a call: its steps in groups (the rest of the call is kvstore's own Python)
GROUPS = {
    "master (sends + waits)": ("master PutStart send", "master PutEnd send",
                               "master GetReplicas", "master wait"),
    "daemon write check": ("write checks send", "write checks wait"),
    "daemon commit frames": ("commit frames send", "commit frames wait"),
    "NIXL copy (post)": ("NIXL post (copy)",),
    "registration": ("register", "deregister"),
    "hash in the call's thread": ("hash (put)", "hash wait (put)", "verify (self)"),
}


def groups_us(row: dict) -> dict[str, float]:
    """A row's step medians summed per group, and the rest of the call's median."""
    out = {name: sum(row["steps_us"].get(label, 0.0) for label in labels)
           for name, labels in GROUPS.items()}
    out["kvstore Python, the rest"] = row["total_us"] - sum(out.values())
    return out


def _resolve(module_name: str, path: str):
    import importlib

    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        return None, None
    parts = path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, None
    return (owner, parts[-1]) if hasattr(owner, parts[-1]) else (None, None)


def child(args) -> dict:
    """Measure this interpreter's kvstore; the rows as a dict."""
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess
    from kvstore.bench.nixl_ceiling import RawNixl
    from kvstore.rpc import grpc_client
    from kvstore.transport import nixl_meta

    size, items = args.size_bytes, args.items
    profile = Profile()
    for module_name, path, label in STEPS:
        owner, name = _resolve(module_name, path)
        if owner is not None:
            profile.wrap(owner, name, label)
    with ServerProcess(["master", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "1GiB", "--nixl"]):
        with grpc_client(master.address) as client:
            while not any(n.nixl_metadata for n in client.list_nodes()):
                time.sleep(0.05)  # NOTE: a bench: registration is asynchronous
            node = next(n for n in client.list_nodes() if n.nixl_metadata)
        info = nixl_meta.unpack(node.nixl_metadata, node.node_id)
        with kvstore.connect(master.address, transport="nixl") as store:
            src = np.random.default_rng(1).integers(0, 256, size, np.uint8)
            outs = [np.empty(size, np.uint8) for _ in range(items)]
            fixed = [f"fixed/{i}" for i in range(items)]
            store.batch_put(fixed, [src] * items)
            for key in fixed:
                store.pin(key, hard=True)
            # NOTE: raw NIXL writes the range of an object of its own, never read back
            store.put("raw/0", src)
            store.pin("raw/0", hard=True)
            with grpc_client(master.address) as client:
                first = client.get_replicas(["raw/0"])[0]
            target = first.targets[0]
            raw = RawNixl(info.agent_metadata,
                          info.segments[target.segment_id].address + target.offset, size,
                          num_items=1)
            transport = next(t for t in store._transfers.transports if t.name == "nixl") \
                if hasattr(store, "_transfers") else None
            counter = iter(range(10**9))
            turn = iter(range(10**9))
            cases = {
                "single put": lambda: store.put(f"p/{next(counter)}", src),
                "single get": lambda: store.get_into(fixed[next(turn) % items], outs[0]),
                "batch put": lambda: store.batch_put(
                    [f"p/{next(counter)}" for _ in range(items)], [src] * items),
                "batch get": lambda: store.batch_get_into(fixed, outs),
                "raw NIXL single WRITE": lambda: raw.run("WRITE"),
                "raw NIXL single READ": lambda: raw.run("READ"),
            }
            for fn in cases.values():
                fn()
            handle = getattr(transport, "_handle", None)
            if handle is not None:
                for name, label in AGENT_STEPS:
                    if hasattr(handle.agent, name):
                        profile.wrap(handle.agent, name, label)
            per_call: dict[str, list[dict]] = collections.defaultdict(list)
            totals: dict[str, list[float]] = collections.defaultdict(list)
            cpu: dict[str, list[float]] = collections.defaultdict(list)   # all threads
            for _ in range(args.rounds):
                for case, fn in cases.items():
                    for _ in range(args.calls):
                        profile.now.clear()
                        start_s, start_cpu_s = time.perf_counter(), time.process_time()
                        fn()
                        totals[case].append(time.perf_counter() - start_s)
                        cpu[case].append(time.process_time() - start_cpu_s)
                        per_call[case].append(dict(profile.now))
                    store.remove_prefix("p/", force=True)
            raw.close()
    rows = {}
    for case, calls in per_call.items():
        labels = sorted({label for call in calls for label in call})
        moved = size * (items if case.startswith("batch") else 1)
        total_us = statistics.median(totals[case]) * 1e6
        rows[case] = {"total_us": total_us, "gbps": moved / total_us / 1e3,
                      "cpu_us": statistics.median(cpu[case]) * 1e6,
                      "steps_us": {label: statistics.median(c.get(label, 0.0) for c in calls)
                                   * 1e6 for label in labels}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=".")
    parser.add_argument("--size", default="1MiB")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls per round and case")
    parser.add_argument("--passes", type=int, default=2, help="tree runs, interleaved")
    parser.add_argument("--steps", action="store_true", help="print every step, not groups")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        from kvstore._units import parse_size

        args.size_bytes = parse_size(args.size)
        print(json.dumps(child(args)))
        return
    trees = [os.path.abspath(t) for t in args.trees.split(",")]
    results: dict[str, list[dict]] = collections.defaultdict(list)
    for _ in range(args.passes):
        for tree in trees:
            load = open("/proc/loadavg").read().split()[0]
            out = subprocess.run(
                [os.path.join(tree, ".venv/bin/python"), os.path.abspath(__file__), "--child",
                 "--size", args.size, "--items", str(args.items), "--rounds",
                 str(args.rounds), "--calls", str(args.calls)],
                check=True, capture_output=True, text=True, cwd=tree).stdout
            rows = json.loads(out.strip().splitlines()[-1])
            rows["load"] = load
            results[tree].append(rows)
    for tree, passes in results.items():
        for rows in passes:
            print(f"\n== {tree} (load {rows['load']})")
            raw = {"put": rows["raw NIXL single WRITE"]["gbps"],
                   "get": rows["raw NIXL single READ"]["gbps"]}
            for case, row in rows.items():
                if case == "load" or case.startswith("raw"):
                    continue
                ceiling = raw["put" if "put" in case else "get"]
                head = (f"{case}: {row['total_us']:.0f} us/call, client CPU "
                        f"{row['cpu_us']:.0f} us/call, {row['gbps']:.2f} GB/s")
                print(head + (f" ({row['gbps'] / ceiling:.0%} of raw single {ceiling:.2f})"
                              if case.startswith("single") else ""))
                print("    " + ", ".join(f"{name} {us:.0f}"
                                         for name, us in groups_us(row).items() if us >= 1))
                if args.steps:
                    for label, us in sorted(row["steps_us"].items(), key=lambda kv: -kv[1]):
                        if us >= 1:
                            print(f"      {label:34s} {us:8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
