"""Cost of the write checks before NIXL writes: one CHECK_WRITES request per batch (data-plane
op 7) against one CHECK_WRITE per range (the form older daemons get), same daemon, same
connection pool, interleaved; and the check of a reserved batch (12r): its ranges share the
reservation's capability, so the transport asks about one covering range
(``nixl_checks.coalesce``).

One master and one ``kvstore daemon --nixl`` (write capabilities on) on loopback; the ranges
are real allocations with their capabilities (PutStart), or consecutive ranges of a real
reservation (Reserve, renewed every ``RENEW_S``) with its capability. Each round times ``WriteChecks.send``
+ ``receive`` once per form and batch size, alternating; prints p50/p90 per form and size and
the load average, writes JSON.

    .venv/bin/python bench/nixl_checks_bench.py --rounds 400 --json bench/out/nixl_checks.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


#: a reservation is asked for anew this often (the master's TTL is 10 s by default)
RENEW_S = 3.0


def _reserved(client, num_ranges: int):
    """``num_ranges`` consecutive 4096-byte ranges of a fresh reservation (its capability)."""
    grant = client.reserve(num_ranges * 4096, client_id="bench", min_bytes=num_ranges * 4096)
    if isinstance(grant, str):
        raise SystemExit(f"the master granted no reservation: {grant}")
    whole = grant.target
    return [whole._replace(offset=whole.offset + i * 4096, length=4096)
            for i in range(num_ranges)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--sizes", default="1,16,64", help="ranges per batch")
    parser.add_argument("--json", default="bench/out/nixl_checks.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from kvstore._deadline import Deadline
    from kvstore._process import ServerProcess
    from kvstore.rpc import grpc_client
    from kvstore.transport.nixl_checks import WriteChecks

    load_before = os.getloadavg()
    with ServerProcess(["master", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "256MiB",
                           "--nixl", "--node-id", "checks-bench"]):
        with grpc_client(master.address) as client:
            deadline_s = time.monotonic() + 60
            while not any(n.node_id == "checks-bench" for n in client.list_nodes()):
                if time.monotonic() > deadline_s:
                    raise SystemExit("the daemon never registered")
                time.sleep(0.05)
            keys = [f"check-{i}" for i in range(max(sizes))]
            targets = [slots[0] for slots in
                       client.put_start(keys, [4096] * len(keys), client_id="bench")]
            checks = WriteChecks()
            samples: dict[str, list[float]] = {}
            reserved, reserved_at_s = _reserved(client, max(sizes)), time.monotonic()
            try:
                for _ in range(args.rounds):
                    if time.monotonic() - reserved_at_s > RENEW_S:
                        reserved, reserved_at_s = _reserved(client, max(sizes)), \
                            time.monotonic()
                    for size in sizes:
                        for form, batched, ranges in (("batched", True, targets),
                                                      ("per-range", False, targets),
                                                      ("reserved", True, reserved)):
                            t0 = time.perf_counter()
                            pending = checks.send("checks-bench", ranges[:size],
                                                  Deadline.after(10), batched=batched)
                            results = checks.receive(pending)
                            elapsed = time.perf_counter() - t0
                            if any(r is not None for r in results):
                                raise SystemExit(f"a check was refused: {results}")
                            samples.setdefault(f"{form} {size}", []).append(elapsed * 1e6)
            finally:
                checks.close()
                client.put_revoke(keys, client_id="bench")
    load_after = os.getloadavg()
    rows = {name: {"p50_us": statistics.median(v), "p90_us": _percentile(v, 0.9),
                   "n": len(v)} for name, v in samples.items()}
    print(f"{'form':<10} {'ranges':>6} {'p50 us':>9} {'p90 us':>9}")
    for name, row in rows.items():
        form, size = name.split()
        print(f"{form:<10} {size:>6} {row['p50_us']:9.1f} {row['p90_us']:9.1f}")
    print(f"load average (1/5/15 min): {list(load_before)} at start, {list(load_after)} at end")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "load_before": load_before,
                                           "load_after": load_after}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
