"""Stage stamps of one single-key GetReplicas on the fast path (issue 15): where the ~55 us
of a ``get_replicas`` x1 go.

Each stage of the call is timed on its own, in process, with the master's real objects (a
``MasterService`` with one node and 4,096 COMPLETE keys): the client's request encoding, the
server's parse, the invoker's guards (lock, HA and tenant checks, sweep check, metrics),
the handler's parts (lookup, lease and LRU update, lease grant, reply encoding), the reply
frame and the client's decoding. The same run measures the loopback floor (a raw TCP round
trip of empty frames between two processes: two system calls and two wake-ups) and the
whole call through a ``MasterClient`` on the fast path to a real master process; what the
stages and the floor do not explain is the rest of the transport (buffered reads, the
server thread's wake-up beyond the floor's).

    .venv/bin/python bench/master_stages.py [--seconds S] [--json PATH]

Prints a table; writes JSON (default bench/out/master_stages.json). Figures are per call,
the least of 15 rounds of 2,000 calls (the leases they grant forgotten between rounds): on a
shared machine the least round is the one least disturbed by other processes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT_PATH = Path(__file__).resolve().parent / "out" / "master_stages.json"
NUM_KEYS = 4096
ROUNDS = 15
CALLS_PER_ROUND = 2000


def per_call_us(fn, calls: int = CALLS_PER_ROUND, rounds: int = ROUNDS,
                between=None) -> float:
    """Least over ``rounds`` of the mean wall time of ``calls`` calls of ``fn()``, in us;
    ``between()`` runs before each round (untimed)."""
    perf_counter = time.perf_counter
    results = []
    for _ in range(rounds):
        if between is not None:
            between()
        started = perf_counter()
        for _ in range(calls):
            fn()
        results.append((perf_counter() - started) / calls * 1e6)
    return min(results)


def in_process_stages() -> list[tuple[str, float]]:
    import gc
    from kvstore.master import reads
    from kvstore.master.clock import MonotonicClock
    from kvstore.master.config import MasterConfig
    from kvstore.master.invoker import make_invoker
    from kvstore.master.service import MasterService
    from kvstore.master.state import MasterState
    from kvstore.master.wire import parse_request
    from kvstore.rpc import fast_frames as ff
    from kvstore.rpc import messages
    from kvstore.v1 import master_pb2 as pb
    import grpc

    gc.set_threshold(100_000, 50, 100)           # the master process's thresholds
    clock = MonotonicClock()
    service = MasterService(MasterState(MasterConfig(), clock.monotonic()))
    service.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(
        node_id="n", host_id="h", data_addr="127.0.0.1:1",
        segments=[pb.SegmentInfo(segment_id="d", tier=pb.TIER_DRAM, capacity_bytes=1 << 40,
                                 shm_name="/kv0")])), clock.monotonic())
    keys = [f"bench/model-x/L32/xxh64v1/{i:016x}" for i in range(NUM_KEYS)]
    now = clock.monotonic()
    service.PutStart(pb.PutStartRequest(keys=keys, sizes=[4096] * NUM_KEYS, client_id="c"), now)
    service.PutEnd(pb.PutEndRequest(keys=keys, client_id="c"), now)
    key = keys[7]
    state = service.state
    invoke = make_invoker(service, "GetReplicas", clock, None, "fast",
                          handler=service.get_replicas_wire)
    request = pb.GetReplicasRequest(keys=[key])
    body = request.SerializeToString()
    batch = parse_request(body)
    reply_body = invoke(batch).SerializeToString()
    stages = []

    def forget_leases():
        # NOTE: each timed call grants a lease; without this the lease book (and the
        # collector's work) grows round by round and later stages pay for earlier ones
        state.leases.expire(clock.monotonic() + 3600)
        gc.collect()

    def stage(name, fn):
        stages.append((name, per_call_us(fn, between=forget_leases)))

    stage("client: build GetReplicasRequest + serialize",
          lambda: pb.GetReplicasRequest(keys=[key], client_host_id="", lease_ttl_ms=0,
                                        shm_reads=False).SerializeToString())
    stage("client: request frame", lambda: ff.encode_request(7, 1, body))
    stage("server: parse_request (KeyBatch)", lambda: parse_request(body))
    stage("server: whole invoke (guards + handler)", lambda: invoke(batch))
    stage("  handler: get_replicas_wire", lambda: service.get_replicas_wire(batch, now))
    stage("    state.get_replicas (lookup+lease+LRU+grant)",
          lambda: reads.get_replicas(state, batch, 5.0, now))
    index = state.objects.index
    stage("      lookup: index.get_many", lambda: index.get_many(batch))
    found = index.get_many(batch)
    stage("      lease grant: LeaseBook.grant", lambda: state.leases.grant(found, now + 5.0))
    stage("    reply: replies.get_replicas_wire",
          lambda: service.replies.get_replicas_wire(found, {}, 5.0, 1))
    stage("server: reply frame", lambda: ff.encode_reply(grpc.StatusCode.OK, 1, reply_body))
    stage("client: parse reply + replica_sets",
          lambda: messages.replica_sets(pb.GetReplicasResponse.FromString(reply_body), [key]))
    return stages


def end_to_end_us(seconds: float) -> tuple[float, float]:
    """(p50 us of ``get_replicas([key])`` through a fast-path MasterClient, p50 us of the
    same call with a prebuilt request through ``client.call``) against a real master."""
    from kvstore.bench.master import make_client, populate, start_master
    master, address, fast_port = start_master("aio")
    try:
        keys = populate(address, NUM_KEYS)
        from kvstore.v1 import master_pb2 as pb
        from kvstore.rpc import MasterClient
        from kvstore.rpc.fast_carrier import FastCarrier
        with make_client("fast", address, fast_port, None) as raw, \
                MasterClient(FastCarrier(address.rsplit(":", 1)[0], fast_port)) as client:
            key = keys[7]
            request = pb.GetReplicasRequest(keys=[key])

            def p50(fn) -> float:
                for _ in range(200):
                    fn()
                latencies = []
                deadline = time.perf_counter() + seconds
                while (now := time.perf_counter()) < deadline:
                    fn()
                    latencies.append(time.perf_counter() - now)
                latencies.sort()
                return latencies[len(latencies) // 2] * 1e6
            return (p50(lambda: client.get_replicas([key])),
                    p50(lambda: raw.call("GetReplicas", request)))
    finally:
        master.terminate()
        master.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=OUT_PATH)
    args = parser.parse_args()
    from kvstore.bench.master import loopback_floor
    load = open("/proc/loadavg").read().split()[:3]
    stages = in_process_stages()
    floor_us = loopback_floor(args.seconds)
    client_us, call_us = end_to_end_us(args.seconds)
    print(f"load average {' '.join(load)}")
    print(f"{'stage (single-key GetReplicas, fast path)':58s} {'us':>8s}")
    for name, us in stages:
        print(f"{name:58s} {us:8.2f}")
    print(f"{'loopback floor (raw TCP round trip, p50)':58s} {floor_us:8.2f}")
    print(f"{'end to end: client.call(prebuilt request), p50':58s} {call_us:8.2f}")
    print(f"{'end to end: MasterClient.get_replicas([key]), p50':58s} {client_us:8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "load": load, "stages_us": dict(stages), "loopback_floor_p50_us": floor_us,
        "call_p50_us": call_us, "get_replicas_p50_us": client_us}, indent=2))


if __name__ == "__main__":
    main()
