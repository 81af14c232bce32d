"""Where a client put or get over the nixl transport spends its time, step by step, beside raw
NIXL of the same pattern between the same two processes; one tree per ``--trees`` entry.

One master and one ``kvstore daemon --nixl`` on loopback; ``kvstore.connect(...,
transport="nixl")``; single puts/gets of one ``--size`` value and batches of ``--items``
(the pattern of ``kvstore bench transfer``'s client rows: one source value put to fresh keys,
gets into distinct buffers), and the same puts from a second client with space reserved
ahead (``--reserve-bytes``, client/reservations.py: no PutStart). Each step is a wrapped
function whose own time (nested wrapped steps subtracted) is summed per call: master sends
and waits, the hash, the write checks, placing local memory (registration), NIXL's post (the
CMA copy), polling, release, PutEnd and the daemons' commits; the NIXL posts per call are
counted (one per node and batch). The ceilings run in interleaved rounds: raw NIXL of the
same pattern (``kvstore.bench.nixl_ceiling``: a single value per transfer, cycling through
``--items`` ranges, and the whole batch in one transfer) and a 16-byte loopback round trip
to a Python echo process (what one master call or write check costs at best). Prints, per
tree and case, the median us per call of each step, the call's median wall and client CPU
(all threads) per call, GB/s and the ratio to raw NIXL of the same pattern, with the load.

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
    ("kvstore.client.reservations", "checksum", "hash (put)"),
    ("kvstore.client.reservations", "ReservedSpace.place", "reservation place"),
    ("kvstore.rpc.client", "MasterClient.put_end_reserved_committing", "master PutEnd send"),
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


# NOTE: a round trip between two processes with nothing else on it (a Python echo, as the
# master and the daemon are Python servers): what one master call or one write check can
# at best cost on this machine at this load
ECHO_SERVER = """
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(64):
    conn.sendall(data)
"""


class LoopbackPing:
    """A 16-byte ping-pong with an echo process on loopback: ``run`` is one round trip."""

    def __init__(self) -> None:
        import socket

        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER],
                                     stdout=subprocess.PIPE, text=True)
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(self) -> None:
        self.sock.sendall(b"p" * 16)
        got = 0
        while got < 16:
            got += len(self.sock.recv(16 - got))

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=10)


class Profile:
    """Own time per label for the call in progress (nested wrapped calls subtracted); time
    spent in other threads than the caller's (the put's background hash) is labelled
    "[bg] ..." and is not part of the call's own path."""

    def __init__(self) -> None:
        self.now: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()   # per label, this call
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
                self.calls[prefix + label] += 1
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
            ServerProcess(["daemon", "--master", master.address, "--dram", args.dram, "--nixl"]):
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
            # NOTE: raw NIXL writes the ranges of an object of its own, never read back
            store.put("raw/0", np.zeros(size * items, np.uint8))
            store.pin("raw/0", hard=True)
            with grpc_client(master.address) as client:
                first = client.get_replicas(["raw/0"])[0]
            target = first.targets[0]
            raw = RawNixl(info.agent_metadata,
                          info.segments[target.segment_id].address + target.offset, size,
                          num_items=items)
            # NOTE: a second client with space reserved ahead (client/reservations.py),
            # where the tree has them: its puts skip PutStart
            reserved = None
            try:
                if not args.reserve_bytes:
                    raise ValueError("no reserved rows")
                reserved = kvstore.connect(master.address, transport="nixl",
                                           reserve_bytes=args.reserve_bytes)
            except Exception:  # noqa: BLE001 - an older tree without reservations
                reserved = None
            ping = LoopbackPing()
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
                "raw NIXL batch WRITE": lambda: raw.run_batch("WRITE"),
                "raw NIXL batch READ": lambda: raw.run_batch("READ"),
                "raw loopback round trip": ping.run,
            }
            if reserved is not None:
                cases["reserved single put"] = lambda: reserved.put(f"p/{next(counter)}", src)
                cases["reserved batch put"] = lambda: reserved.batch_put(
                    [f"p/{next(counter)}" for _ in range(items)], [src] * items)
            for fn in cases.values():
                fn()
            stores = [store] if reserved is None else [store, reserved]
            for each in stores:
                nixl = next(t for t in each._transfers.transports if t.name == "nixl")
                handle = getattr(nixl, "_handle", None)
                if handle is not None:
                    for name, label in AGENT_STEPS:
                        if hasattr(handle.agent, name):
                            profile.wrap(handle.agent, name, label)
            per_call: dict[str, list[dict]] = collections.defaultdict(list)
            totals: dict[str, list[float]] = collections.defaultdict(list)
            cpu: dict[str, list[float]] = collections.defaultdict(list)   # all threads
            posts: dict[str, list[int]] = collections.defaultdict(list)   # NIXL posts
            for _ in range(args.rounds):
                for case, fn in cases.items():
                    for _ in range(args.calls):
                        profile.now.clear()
                        profile.calls.clear()
                        start_s, start_cpu_s = time.perf_counter(), time.process_time()
                        fn()
                        totals[case].append(time.perf_counter() - start_s)
                        cpu[case].append(time.process_time() - start_cpu_s)
                        per_call[case].append(dict(profile.now))
                        posts[case].append(profile.calls.get("NIXL post (copy)", 0))
                    store.remove_prefix("p/", force=True)
            raw.close()
            ping.close()
            if reserved is not None:
                reserved.close()
    rows = {}
    for case, calls in per_call.items():
        labels = sorted({label for call in calls for label in call})
        moved = size * (items if "batch" in case else 1)
        total_us = statistics.median(totals[case]) * 1e6
        rows[case] = {"total_us": total_us, "gbps": moved / total_us / 1e3,
                      "cpu_us": statistics.median(cpu[case]) * 1e6,
                      "nixl_posts": max(posts[case]) if posts[case] else 0,
                      "steps_us": {label: statistics.median(c.get(label, 0.0) for c in calls)
                                   * 1e6 for label in labels}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=".")
    parser.add_argument("--size", default="1MiB")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--dram", default="2GiB", help="the daemon's DRAM segment")
    parser.add_argument("--reserve-bytes", type=int, default=512 * MIB,
                        help="the reserved client's reservation (0: no reserved rows)")
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
                 str(args.rounds), "--calls", str(args.calls), "--reserve-bytes",
                 str(args.reserve_bytes), "--dram", args.dram],
                check=True, capture_output=True, text=True, cwd=tree).stdout
            rows = json.loads(out.strip().splitlines()[-1])
            rows["load"] = load
            results[tree].append(rows)
    for tree, passes in results.items():
        for rows in passes:
            print(f"\n== {tree} (load {rows['load']})")
            print("raw: " + ", ".join(f"{case[4:]} {row['total_us']:.0f} us"
                                      for case, row in rows.items()
                                      if case.startswith("raw")))
            for case, row in rows.items():
                if case == "load" or case.startswith("raw"):
                    continue
                mode = "batch" if "batch" in case else "single"
                op = "WRITE" if "put" in case else "READ"
                ceiling = rows[f"raw NIXL {mode} {op}"]
                head = (f"{case}: {row['total_us']:.0f} us/call, client CPU "
                        f"{row['cpu_us']:.0f} us/call, {row['gbps']:.2f} GB/s, "
                        f"{row.get('nixl_posts', 0)} NIXL post(s)")
                print(head + f" ({row['gbps'] / ceiling['gbps']:.0%} of raw {mode} {op} "
                             f"{ceiling['gbps']:.2f} GB/s, {ceiling['total_us']:.0f} us)")
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
