"""kvstore's nixl transport and raw NIXL side by side: same two processes, same buffers, same
batch, each step of a transport batch timed.

One master and one ``kvstore daemon --nixl`` on loopback; ``--items`` ranges of ``--size``
bytes allocated by one PutStart (so the write checks pass, as a client's do). In this
process, alternating per round:

- raw NIXL, the ceiling: one agent, the source/destination array registered once, one
  transfer of all the batch's descriptors per call (``initialize_xfer``), spin-polled to DONE;
- raw NIXL, prepared: the same with both descriptor lists prepared once
  (``prep_xfer_dlist``) and ``make_prepped_xfer`` per call;
- raw NIXL, one value: one transfer of the batch's first value only, always the same one
  (what ``kvstore bench transfer``'s raw-NIXL ceiling measured before 2026-12-02);
- the transport: ``NixlTransport.write_many`` / ``read_many`` of the same slices and ranges.

Prints GB/s (best round and median) and this thread's CPU seconds per GB (median; robust
to a loaded machine, since CMA copies run in the calling thread) per case and op, and for the
transport the median microseconds per batch spent in each step (write checks sent/answered,
local memory placed, descriptor lists, transfer creation, post, polling, release), with the
load average.

    .venv/bin/python bench/nixl_steps_profile.py [--size 1MiB] [--items 16] [--rounds 7]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import time

from kvstore._units import parse_size


class Steps:
    """Accumulated seconds per step name, for the batch being measured."""

    def __init__(self) -> None:
        self.now: collections.Counter = collections.Counter()
        self.batches: list[dict[str, float]] = []

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        inner = getattr(owner, name)
        label = label or name

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start_s = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.now[label] += time.perf_counter() - start_s
        setattr(owner, name, timed)

    def close_batch(self, total_s: float) -> None:
        self.now["total"] += total_s
        self.batches.append(dict(self.now))
        self.now.clear()

    def medians_us(self) -> dict[str, float]:
        names = {name for batch in self.batches for name in batch}
        return {name: statistics.median(b.get(name, 0.0) for b in self.batches) * 1e6
                for name in sorted(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1MiB")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls per round and case")
    parser.add_argument("--json")
    args = parser.parse_args()
    size_bytes = parse_size(args.size)

    import numpy as np

    from kvstore._process import ServerProcess
    from kvstore.rpc import grpc_client
    from kvstore.tiers import Tier
    from kvstore.transport import nixl_meta
    from kvstore.transport.nixl import NixlTransport
    from kvstore.transport.nixl_lib import new_agent

    dram_mib = max(256, 4 * size_bytes * args.items >> 20)
    with ServerProcess(["master", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", f"{dram_mib}MiB",
                           "--nixl"]):
        with grpc_client(master.address) as client:
            while not any(n.nixl_metadata for n in client.list_nodes()):
                time.sleep(0.05)  # NOTE: a bench: registration is asynchronous
            node = next(n for n in client.list_nodes() if n.nixl_metadata)
            keys = [f"steps/{i}" for i in range(args.items)]
            slots = client.put_start(keys, [size_bytes] * args.items, client_id="bench",
                                     tier=Tier.DRAM, near_node_id=node.node_id)
            targets = [t[0] for t in slots]
        info = nixl_meta.unpack(node.nixl_metadata, node.node_id)
        remote = [(info.segments[t.segment_id].address + t.offset, t.length, 0)
                  for t in targets]
        src = np.random.default_rng(0).integers(0, 256, size_bytes * args.items, np.uint8)
        dst = np.empty_like(src)
        slices = lambda a: [memoryview(a[i * size_bytes:(i + 1) * size_bytes])  # noqa: E731
                            for i in range(args.items)]
        srcs, dsts = slices(src), slices(dst)

        raw = new_agent("bench")
        agent = raw.agent
        for array in (src, dst):
            raw.register(array.ctypes.data, array.nbytes)
        name = agent.add_remote_agent(info.agent_metadata)
        local = {id(a): agent.get_xfer_descs(
            [(a.ctypes.data + i * size_bytes, size_bytes, 0) for i in range(args.items)],
            "DRAM") for a in (src, dst)}
        remote_descs = agent.get_xfer_descs(remote, "DRAM")
        prepped_local = {id(a): agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            [(a.ctypes.data + i * size_bytes, size_bytes, 0) for i in range(args.items)],
            "DRAM") for a in (src, dst)}
        prepped_remote = agent.prep_xfer_dlist(name, remote, "DRAM")
        indices = np.arange(args.items, dtype=np.int32)

        def spin(xfer) -> None:
            state = agent.transfer(xfer)
            while state == "PROC":
                state = agent.check_xfer_state(xfer)
            if state != "DONE":
                raise SystemExit(f"raw NIXL ended {state}")
            xfer.release()

        def raw_call(op: str) -> None:
            array = src if op == "WRITE" else dst
            spin(agent.initialize_xfer(op, local[id(array)], remote_descs, name))

        one_local = {id(a): agent.get_xfer_descs([(a.ctypes.data, size_bytes, 0)], "DRAM")
                     for a in (src, dst)}
        one_remote = agent.get_xfer_descs(remote[:1], "DRAM")

        def one_call(op: str) -> None:
            """What kvstore bench transfer's raw ceiling does: one value, always the same."""
            array = src if op == "WRITE" else dst
            spin(agent.initialize_xfer(op, one_local[id(array)], one_remote, name))

        def prepped_call(op: str) -> None:
            array = src if op == "WRITE" else dst
            spin(agent.make_prepped_xfer(op, prepped_local[id(array)], indices,
                                         prepped_remote, indices))

        transport = NixlTransport(nodes=lambda: {node.node_id: node.nixl_metadata})
        steps = Steps()

        def transport_call(op: str) -> None:
            if op == "WRITE":
                results = transport.write_many(list(zip(targets, srcs)), timeout_s=60)
            else:
                results = transport.read_many(list(zip(targets, dsts)), timeout_s=60)
            bad = [r for r in results if r is not None]
            if bad:
                raise SystemExit(f"transport {op} failed: {bad[0]}")

        transport_call("WRITE")  # creates the agent and loads the daemon's metadata
        handle = transport._handle
        for method in ("_place", "_stage_sources", "_post", "_finish", "_release_staging"):
            steps.wrap(transport, method)
        steps.wrap(transport._checks, "send", "checks.send")
        steps.wrap(transport._checks, "receive", "checks.receive")
        for method in ("register_many", "register", "deregister"):
            steps.wrap(handle, method, f"handle.{method}")
        for method in ("get_xfer_descs", "initialize_xfer", "transfer", "check_xfer_state",
                       "make_prepped_xfer", "prep_xfer_dlist"):
            if hasattr(handle.agent, method):
                steps.wrap(handle.agent, method, f"agent.{method}")

        cases = {"raw": raw_call, "raw prepped": prepped_call, "raw one value": one_call,
                 "transport": transport_call}
        gbps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        cpu_s_per_gb: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        op_steps = {op: Steps() for op in ("WRITE", "READ")}
        batch_bytes = size_bytes * args.items
        for case in cases.values():
            for op in ("WRITE", "READ"):
                case(op)
        for _ in range(args.rounds):
            for case_name, case in cases.items():
                for op in ("WRITE", "READ"):
                    start_s, start_cpu_s = time.perf_counter(), time.thread_time()
                    for _ in range(args.calls):
                        call_s = time.perf_counter()
                        case(op)
                        if case_name == "transport":
                            steps.close_batch(time.perf_counter() - call_s)
                            op_steps[op].batches.append(steps.batches.pop())
                    elapsed_s = time.perf_counter() - start_s
                    cpu_s = time.thread_time() - start_cpu_s
                    moved = size_bytes if case_name == "raw one value" else batch_bytes
                    gbps[(case_name, op)].append(moved * args.calls / elapsed_s / 1e9)
                    cpu_s_per_gb[(case_name, op)].append(cpu_s / (moved * args.calls / 1e9))
        if not (np.array_equal(src, dst)):
            raise SystemExit("bytes read back differ from those written")
        load = os.getloadavg()
        print(f"{args.items} x {size_bytes} B per batch, {args.rounds} rounds of "
              f"{args.calls} calls; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"{'case':<14}{'op':<7}{'best GB/s':>10}{'median':>9}{'% raw (best)':>14}"
              f"{'thread CPU s/GB':>17}")
        for (case_name, op), figures in gbps.items():
            share = max(figures) / max(gbps[("raw", op)])
            cpu = statistics.median(cpu_s_per_gb[(case_name, op)])
            print(f"{case_name:<14}{op:<7}{max(figures):>10.2f}{statistics.median(figures):>9.2f}"
                  f"{share:>13.0%}{cpu:>17.3f}")
        for op, op_step in op_steps.items():
            print(f"-- transport {op}: median us per batch")
            for name, us in op_step.medians_us().items():
                print(f"   {name:<24}{us:>9.1f}")
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"load": load, "gbps": {f"{c} {o}": v for (c, o), v in gbps.items()},
                           "cpu_s_per_gb": {f"{c} {o}": v
                                            for (c, o), v in cpu_s_per_gb.items()},
                           "steps_us": {op: s.medians_us() for op, s in op_steps.items()}},
                          out, indent=1)
        transport.close()
        raw.release()


if __name__ == "__main__":
    main()
