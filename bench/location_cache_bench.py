"""The location cache on its own: repeated TCP gets with the cache on and off, interleaved in
one process against the same ``kvstore master`` and ``kvstore daemon`` (so both columns see
the same servers and the same load), plus first reads (keys never read before: the cache
cannot help; both columns go through the master).

Per round and size: the "off" client (``location_cache_entries=0``) and the "on" client
(default) each get one key ``--per-round`` times (after one warm-up read), then each reads
``--per-round`` keys it never read. Prints p50 per round (us for 64 KiB, GB/s for 4 MiB),
the on/off ratio, the cache's hit count and the load average; writes
bench/out/location_cache.json.

    .venv/bin/python bench/location_cache_bench.py [--rounds 5] [--per-round 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import _rounds
import kvstore
from kvstore._process import ServerProcess

OUT_DIR = Path(__file__).resolve().parent / "out"
MiB = 1 << 20
SIZES = {"64KiB": 64 << 10, "4MiB": 4 * MiB}


def _figure(size_name: str, p50_s: float) -> float:
    return p50_s * 1e6 if size_name == "64KiB" else SIZES[size_name] / p50_s / 1e9


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(2048 * MiB)])
    rows = []
    try:
        with kvstore.connect(master.address, transport="tcp") as on, \
                kvstore.connect(master.address, transport="tcp",
                                location_cache_entries=0) as off:
            for _ in range(200):
                if on.stats()["master"]["num_nodes"]:
                    break
                time.sleep(0.05)
            for r in range(args.rounds):
                for size_name, size in SIZES.items():
                    value = np.random.default_rng(size).integers(0, 256, size, np.uint8)
                    count = args.per_round if size < MiB else max(8, args.per_round // 8)
                    row = {"round": r, "size": size_name, "load": Path(
                        "/proc/loadavg").read_text().split()[0]}
                    for name, store in (("off", off), ("on", on)):
                        key = f"lc/{size_name}/{r}/{name}/repeat"
                        fresh = [f"lc/{size_name}/{r}/{name}/{i}" for i in range(count)]
                        store.batch_put([key, *fresh], [value] * (count + 1))
                        if store.get(key) != value.tobytes():
                            raise RuntimeError("wrong bytes")
                        hits = (store.stats()["location_cache"] or {}).get("hits", 0)
                        row[f"repeat_{name}"] = _figure(
                            size_name, _rounds.p50_s(lambda i: store.get(key), count))
                        row[f"first_{name}"] = _figure(
                            size_name, _rounds.p50_s(lambda i: store.get(fresh[i]), count))
                        row[f"hits_{name}"] = \
                            (store.stats()["location_cache"] or {}).get("hits", 0) - hits
                        store.remove_prefix(f"lc/{size_name}/{r}/{name}/", force=True)
                    rows.append(row)
                    print(row, flush=True)
    finally:
        daemon.close()
        master.close()
    print(f"\n{'size':6} {'metric':8} {'off':>16} {'on':>16} {'on/off':>14}")
    for size_name in SIZES:
        mine = [r for r in rows if r["size"] == size_name]
        for metric in ("repeat", "first"):
            off = [r[f"{metric}_off"] for r in mine]
            on = [r[f"{metric}_on"] for r in mine]
            ratios = [b / a for a, b in zip(off, on)]
            print(f"{size_name:6} {metric:8} {min(off):7.1f}-{max(off):<8.1f}"
                  f"{min(on):7.1f}-{max(on):<8.1f}{min(ratios):6.2f}-{max(ratios):.2f}")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "location_cache.json").write_text(json.dumps(rows, indent=2))
    print(f"\nunits: us p50 (64KiB), GB/s of the p50 (4MiB); JSON: "
          f"{OUT_DIR / 'location_cache.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
