"""What the tenant check costs the master's request path, without a transport.

The master's whole in-process path (request bytes parsed, ``invoker.make_invoker``'s invoke:
lock, sweep check, the tenant's key mapping, the handler, the reply serialized) for
GetReplicas and Exists of 1,024 keys, on three masters holding the same 200,000 keys: no
tenants (the cluster principal, as today), and tenants with a call from the cluster token
and from a tenant's token (keys mapped into its namespace). Rounds are interleaved, so load
on the machine hits all three alike; the table gives the best and median round of each and
the ratio to the no-tenant master (the ceiling: the tenant path only adds work). Writes
bench/out/tenants_bench.json.

    .venv/bin/python bench/tenants_bench.py [--rounds N] [--num-keys N]

Over the network, ``kvstore bench master --tenant`` runs the whole benchmark as a tenant.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path

from kvstore.master.clock import ManualClock
from kvstore.master.config import MasterConfig
from kvstore.master.invoker import make_invoker
from kvstore.master.service import MasterService
from kvstore.master.state import MasterState
from kvstore.master.tenancy import CLUSTER, Principal
from kvstore.master.tenants import Tenant
from kvstore.tiers import Tier
from kvstore.v1 import master_pb2 as pb

OUT_PATH = Path(__file__).resolve().parent / "out" / "tenants_bench.json"
TENANT = Tenant("bench", "bench-token", "bench", {Tier.DRAM: 1 << 50})
BATCH = 1024


def _service(tenants: tuple, num_keys: int, principal: Principal) -> MasterService:
    config = MasterConfig(port=0, token="cluster" if tenants else None, tenants=tenants)
    service = MasterService(MasterState(config, 0.0))
    service.RegisterNode(pb.RegisterNodeRequest(node=pb.NodeInfo(
        node_id="n", host_id="h", data_addr="127.0.0.1:1",
        segments=[pb.SegmentInfo(segment_id="d", tier=pb.TIER_DRAM, capacity_bytes=1 << 40)])),
        0.0)
    put_start = make_invoker(service, "PutStart", ManualClock(0.0), None, "bench")
    put_end = make_invoker(service, "PutEnd", ManualClock(0.0), None, "bench")
    keys = [f"model-x/L32/xxh64v1/{i:016x}" for i in range(num_keys)]
    for i in range(0, num_keys, 8192):
        chunk = keys[i:i + 8192]
        put_start(pb.PutStartRequest(keys=chunk, sizes=[65536] * len(chunk), client_id="c"),
                  principal)
        put_end(pb.PutEndRequest(keys=chunk, client_id="c"), principal)
    return service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--num-keys", type=int, default=200_000)
    args = parser.parse_args()
    gc.set_threshold(100_000, 50, 100)
    tenant = Principal(TENANT.name, TENANT)
    cases = {"no tenants": ((), CLUSTER), "tenants, cluster token": ((TENANT,), CLUSTER),
             "tenants, tenant token": ((TENANT,), tenant)}
    keys = [f"model-x/L32/xxh64v1/{i:016x}" for i in range(args.num_keys)]
    batches = [random.Random(i).sample(keys, BATCH) for i in range(50)]
    payloads = {"GetReplicas": [pb.GetReplicasRequest(keys=b).SerializeToString()
                                for b in batches],
                "Exists": [pb.ExistsRequest(keys=b).SerializeToString() for b in batches]}
    # the cluster principal of a tenanted master reads what the tenant wrote: its keys are
    # namespaced, so it asks for the stored keys
    stored = {"GetReplicas": [pb.GetReplicasRequest(keys=[TENANT.key_prefix + k for k in b])
                              .SerializeToString() for b in batches],
              "Exists": [pb.ExistsRequest(keys=[TENANT.key_prefix + k for k in b])
                         .SerializeToString() for b in batches]}
    invokers = {}
    for name, (tenants, principal) in cases.items():
        writer = tenant if tenants else CLUSTER
        service = _service(tenants, args.num_keys, writer)
        for method in payloads:
            request_class = getattr(pb, f"{method}Request")
            invoke = make_invoker(service, method, ManualClock(1.0), None, "bench")
            bodies = (stored if tenants and principal is CLUSTER else payloads)[method]
            invokers[(name, method)] = (invoke, request_class, bodies, principal)
    rates: dict = {key: [] for key in invokers}
    load_start = os.getloadavg()
    for _ in range(args.rounds):
        for key, (invoke, request_class, bodies, principal) in invokers.items():
            started = time.perf_counter()
            for body in bodies:
                invoke(request_class.FromString(body), principal).SerializeToString()
            rates[key].append(BATCH * len(bodies) / (time.perf_counter() - started))
    load_end = os.getloadavg()
    rows = []
    print(f"{'method':<12}{'case':<26}{'best keys/s':>14}{'median keys/s':>16}"
          f"{'best/no-tenants':>17}")
    for (name, method), values in rates.items():
        best, median = max(values), statistics.median(values)
        ceiling = max(rates[("no tenants", method)])
        rows.append({"method": method, "case": name, "best_keys_per_s": best,
                     "median_keys_per_s": median, "ratio_to_no_tenants": best / ceiling})
        print(f"{method:<12}{name:<26}{best:>14,.0f}{median:>16,.0f}{best / ceiling:>16.2f}x")
    print(f"load average at start {load_start}, at end {load_end} on {os.cpu_count()} cores")
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_text(json.dumps({"rows": rows, "rounds": args.rounds,
                                    "num_keys": args.num_keys, "loadavg_at_start": load_start,
                                    "loadavg_at_end": load_end,
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                                   indent=2))
    print(f"wrote {OUT_PATH}")


if __name__ == "__main__":
    main()
