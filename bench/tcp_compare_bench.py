"""kvstore over TCP against Mooncake Store over TCP, in one run, rounds interleaved: 64 KiB
put/get/get_into p50 and 4 MiB put/get/get_into GB/s through each store's client, client and
storage in separate processes on loopback. Each key is put, then read three times: ``get``
(its first read), ``get_again`` (the same keys again: what a location cache serves; compared
with Mooncake's get) and ``get_into``; the run prints how many reads the cache served.

Each round runs, one after the other, every kvstore tree given (``--trees``: repository roots
with a built .venv, e.g. the tree before a change and the one after) and Mooncake Store
0.3.13 (``--mooncake-python``: a virtualenv made by ``scripts/mooncake_venv.sh``; skipped
with the reason when absent). Each run starts its own servers: kvstore a ``kvstore master``
and a ``kvstore daemon``, the client with ``transport="tcp"``; Mooncake its
``mooncake_master`` and a storage process (bench/mooncake_tcp_bench.py). Prints per metric
the p50 of every round (the range over rounds), the ratio to Mooncake per round against the
targets of issue 15 (64 KiB p50 at most 0.8x Mooncake's; 4 MiB at least 2x Mooncake's GB/s),
and the load average before and after each round; writes bench/out/tcp_compare.json.

    .venv/bin/python bench/tcp_compare_bench.py [--trees /work/base1,.,.+reserve] [--rounds 3]
        [--per-round 200] [--mooncake-python .venv-mooncake/bin/python]
        [--reserve-bytes 67108864]   (PATH+reserve: that tree's client reserves space ahead)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "out"
MiB = 1 << 20
SIZES = {"64KiB": 64 * 1024, "4MiB": 4 * MiB}
# NOTE: "get" is each key's first read (nothing to cache: always through the master);
# "get_again" reads the same keys a second time (a client with a location cache skips the
# master there); "get_into" is their third read
OPS = ("put", "get", "get_again", "get_into")
# Mooncake's metric each of ours is compared with (its bench has no second get)
MOONCAKE_METRIC = {"get_again": "get"}


def worker(per_round: int, json_path: str, reserve_bytes: int = 0) -> None:
    """One kvstore run (in the tree whose python runs this): samples per metric."""
    import numpy as np

    import kvstore
    from kvstore._process import ServerProcess

    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(1024 * MiB)])
    samples: dict[str, list[float]] = {f"{op}_{size}": [] for size in SIZES for op in OPS}
    try:
        options = {"reserve_bytes": reserve_bytes} if reserve_bytes else {}
        with kvstore.connect(master.address, transport="tcp", lease_ttl_s=1.0,
                             **options) as store:
            for _ in range(200):
                if store.stats()["master"]["num_nodes"]:
                    break
                time.sleep(0.05)
            for warm_up in (True, False):
                for size_name, size in SIZES.items():
                    value = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
                    out = np.empty_like(value)
                    count = per_round if size < MiB else max(4, per_round // 8)
                    keys = [f"cmp/{size_name}/{warm_up}/{i}" for i in range(count)]
                    calls = {"put": lambda k: store.put(k, value),
                             "get": lambda k: store.get(k),
                             "get_again": lambda k: store.get(k),
                             "get_into": lambda k: store.get_into(k, out)}
                    for op in OPS:
                        for key in keys:
                            started = time.perf_counter()
                            calls[op](key)
                            if not warm_up:
                                samples[f"{op}_{size_name}"].append(
                                    time.perf_counter() - started)
                    if not np.array_equal(out, value):
                        raise RuntimeError("kvstore get_into returned wrong bytes")
                    store.remove_prefix(f"cmp/{size_name}/", force=True)
            cache = store.stats().get("location_cache")
    finally:
        daemon.close()
        master.close()
    # reads served from cached locations (None: a tree without the cache, or it is off)
    samples["location_cache_hits"] = None if cache is None else cache["hits"]
    Path(json_path).write_text(json.dumps(samples))


def run_one(cmd: list[str], json_path: Path, timeout_s: float) -> dict[str, list[float]]:
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}")
    return json.loads(json_path.read_text())


def summarize(samples: dict[str, list[float]]) -> dict[str, float]:
    """p50 in microseconds for 64 KiB metrics, GB/s (of the p50) for 4 MiB ones."""
    row = {}
    for metric, values in samples.items():
        if metric.endswith("_errors") or not isinstance(values, list) or not values:
            continue
        p50 = statistics.median(values)
        row[metric] = p50 * 1e6 if metric.endswith("64KiB") else SIZES["4MiB"] / p50 / 1e9
    return row


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--trees", default=".", help="comma-separated kvstore repository "
                        "roots, each with a built .venv (default: this one)")
    parser.add_argument("--mooncake-python", default=".venv-mooncake/bin/python")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--reserve-bytes", type=int, default=64 * MiB,
                        help="reserve_bytes of the trees written PATH+reserve")
    args = parser.parse_args()
    if args.worker:
        worker(args.per_round, args.json, args.reserve_bytes)
        return 0
    mooncake = Path(args.mooncake_python)
    # NOTE: PATH+reserve: that tree's client puts into space reserved ahead (Reservations)
    columns = [str(Path(t.removesuffix("+reserve")).resolve()) +
               ("+reserve" if t.endswith("+reserve") else "") for t in args.trees.split(",")]
    if mooncake.exists():
        columns.append("mooncake")
    else:
        print(f"Mooncake skipped: {mooncake} not found (make it with scripts/mooncake_venv.sh)")
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            entry = {"load_before": loadavg(), "results": {}}
            for column in columns:
                json_path = Path(tmp) / f"{r}-{len(entry['results'])}.json"
                if column == "mooncake":
                    cmd = [str(mooncake), str(HERE / "mooncake_tcp_bench.py"), "--rounds", "1",
                           "--per-round", str(args.per_round), "--json", str(json_path)]
                else:
                    reserve = column.endswith("+reserve")
                    cmd = [str(Path(column.removesuffix("+reserve")) / ".venv/bin/python"),
                           str(Path(__file__).resolve()), "--worker", "--per-round",
                           str(args.per_round), "--json", str(json_path), "--reserve-bytes",
                           str(args.reserve_bytes if reserve else 0)]
                samples = run_one(cmd, json_path, timeout_s=600)
                entry["results"][column] = summarize(samples)
                entry.setdefault("location_cache_hits", {})[column] = \
                    samples.get("location_cache_hits")
                entry.setdefault("errors", {})[column] = {
                    m: len(v) for m, v in samples.items() if m.endswith("_errors")}
            entry["load_after"] = loadavg()
            rounds.append(entry)
            print(f"round {r + 1}/{args.rounds} done; load {entry['load_before']} -> "
                  f"{entry['load_after']}", flush=True)
    metrics = [f"{op}_{size}" for size in SIZES for op in OPS]
    print(f"\n{'metric (us p50 / GB/s)':26}" + "".join(f"{Path(c).name:>22}" for c in columns))
    for metric in metrics:
        cells = []
        for column in columns:
            values = [rd["results"][column].get(metric) for rd in rounds]
            values = [v for v in values if v is not None]
            cells.append(f"{min(values):.1f}-{max(values):.1f}" if values else "n/a")
        print(f"{metric:26}" + "".join(f"{c:>22}" for c in cells))
    if "mooncake" in columns:
        print("\nratio to Mooncake, per round (targets: 64 KiB p50 <= 0.8x, 4 MiB GB/s >= 2x)")
        for column in columns[:-1]:
            for metric in metrics:
                op, _, size_name = metric.rpartition("_")
                theirs = f"{MOONCAKE_METRIC.get(op, op)}_{size_name}"
                ratios = [rd["results"][column][metric] / rd["results"]["mooncake"][theirs]
                          for rd in rounds if theirs in rd["results"]["mooncake"]]
                print(f"  {Path(column).name:12} {metric:14} " +
                      " ".join(f"{x:.2f}" for x in ratios))
    print("\nreads served from the location cache, per round: " + "; ".join(
        f"{Path(c).name} {[rd['location_cache_hits'].get(c) for rd in rounds]}"
        for c in columns if c != "mooncake"))
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "tcp_compare.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "per_round": args.per_round, "columns": columns, "rounds": rounds}, indent=2))
    print(f"\nJSON: {OUT_DIR / 'tcp_compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
