"""cProfile of a client batched put and get of 16 x 1 MiB over the nixl transport: where the
time goes beside NIXL's own copy (``postXferReq``, which raw NIXL pays too).

One master and one ``kvstore daemon --nixl`` (512 MiB DRAM) on loopback, ``kvstore.connect(...,
transport="nixl")``; prints ms per batch (wall and CPU), GiB/s, the load average and the top
functions by own time for each of put and get.

    .venv/bin/python bench/nixl_client_profile.py --batches 24 [--only put|get]
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import time

MIB = 1 << 20
ITEMS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24, help="at most 30 (512 MiB DRAM)")
    parser.add_argument("--only", choices=("put", "get"))
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()

    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess
    from kvstore.rpc import grpc_client

    with ServerProcess(["master", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "512MiB",
                           "--nixl"]):
        with grpc_client(master.address) as client:
            while not any(n.nixl_metadata for n in client.list_nodes()):
                time.sleep(0.05)  # NOTE: a bench: registration is asynchronous
        with kvstore.connect(master.address, transport="nixl") as store:
            src = np.random.default_rng(1).integers(0, 256, MIB, np.uint8)
            outs = [np.empty(MIB, np.uint8) for _ in range(ITEMS)]
            keys = [f"fixed/{i}" for i in range(ITEMS)]
            store.batch_put(keys, [src] * ITEMS)
            counter = itertools.count()

            def put() -> None:
                batch = [f"p/{next(counter)}" for _ in range(ITEMS)]
                results = store.batch_put(batch, [src] * ITEMS)
                if any(r is not None for r in results):
                    raise SystemExit(f"put failed: {results}")

            def get() -> None:
                results = store.batch_get_into(keys, outs)
                if any(isinstance(r, BaseException) for r in results):
                    raise SystemExit(f"get failed: {results}")

            for warm in (put, put, get, get):
                warm()
            store.remove_prefix("p/", force=True)
            for name, call in (("put", put), ("get", get)):
                if args.only not in (None, name):
                    continue
                profile = cProfile.Profile()
                start_s, start_cpu_s = time.perf_counter(), time.process_time()
                profile.enable()
                for _ in range(args.batches):
                    call()
                profile.disable()
                wall_s = time.perf_counter() - start_s
                cpu_s = time.process_time() - start_cpu_s
                print(f"== {name}: {args.batches} batches of {ITEMS} x 1 MiB: "
                      f"{wall_s / args.batches * 1e3:.2f} ms wall, "
                      f"{cpu_s / args.batches * 1e3:.2f} ms CPU per batch, "
                      f"{ITEMS * args.batches / 1024 / wall_s:.2f} GiB/s; "
                      f"load {os.getloadavg()}")
                pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
                store.remove_prefix("p/", force=True)


if __name__ == "__main__":
    main()
