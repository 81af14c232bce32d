"""Demotion throughput: GB/s moved DRAM -> SSD by the tier moves while puts continue.

A real master and a daemon with ``--dram`` and ``--ssd``; one client puts 4 MiB values into
DRAM without pause. Once DRAM passes its high watermark the master orders demotions (copied
by the daemon's move thread, acknowledged in heartbeats); the figure is the bytes demoted
per second (the daemon's DRAM demotion counter from ``kvstore status`` times the value size)
over the measured window (10 s, or until the puts would fill the SSD), beside the put GB/s.
The ceiling, measured in the same run, is the daemon's own copy
(``daemon.moves.copy_range``) from a shm segment into a mapped SSD file in this process, with
no master and no puts competing. Prints a table and writes
bench/out/demotion_bench.json.

    .venv/bin/python bench/demotion_bench.py [--quick] [--ssd-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import kvstore
from kvstore._process import ServerProcess
from kvstore.daemon.moves import copy_range
from kvstore.daemon.backends import ShmBackend
from kvstore.daemon.ssd import SsdBackend
from kvstore.status_cli import fetch_status

OUT_DIR = Path(__file__).resolve().parent / "out"
MiB = 1 << 20
VALUE_BYTES = 4 * MiB
DRAM_BYTES = 256 * MiB


def copy_ceiling_gbps(ssd_dir: str, total_bytes: int) -> float:
    """``copy_range`` shm -> the SSD backend, VALUE_BYTES at a time, over ``total_bytes``."""
    shm = ShmBackend("ceil-dram", total_bytes, name_prefix="kvstore-bench")
    ssd = SsdBackend("ceil-ssd", total_bytes, directory=ssd_dir, node_id="bench-ceiling")
    try:
        shm.write_from(0, memoryview(b"\x5a" * total_bytes))
        copy_range(shm, 0, ssd, 0, VALUE_BYTES)                # first touch of the file
        started = time.perf_counter()
        for offset in range(0, total_bytes, VALUE_BYTES):
            copy_range(shm, offset, ssd, offset, VALUE_BYTES)
        return total_bytes / (time.perf_counter() - started) / 1e9
    finally:
        shm.close()
        ssd.close()


def _dram(address: str) -> dict:
    node = fetch_status(address, None)["nodes"][0]
    return next(t for t in node["tiers"] if t["tier"] == "DRAM")


def demotion_run(ssd_dir: str, seconds: float, ssd_bytes: int) -> dict:
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", "--promote", "off"])
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", str(DRAM_BYTES),
                            "--ssd", f"{ssd_dir}:{ssd_bytes}"])
    try:
        store = kvstore.connect(master.address)
        value = os.urandom(VALUE_BYTES)
        i = 0
        while _dram(master.address)["demotions"] == 0:      # fill DRAM past the watermark
            store.put(f"fill/{i}", value, tier="dram")
            i += 1
        start_demotions, started = _dram(master.address)["demotions"], time.perf_counter()
        num_puts = 0
        max_puts = (ssd_bytes - DRAM_BYTES) // VALUE_BYTES - i    # SSD never fills: no eviction
        while time.perf_counter() - started < seconds and num_puts < max_puts:
            store.put(f"run/{num_puts}", value, tier="dram")
            num_puts += 1
        elapsed = time.perf_counter() - started
        dram = _dram(master.address)
        demoted = dram["demotions"] - start_demotions
        status = fetch_status(master.address, None)
        store.close()
        return {"seconds": elapsed, "puts": num_puts, "put_gbps": num_puts * VALUE_BYTES
                / elapsed / 1e9, "demotions": demoted,
                "demotion_gbps": demoted * VALUE_BYTES / elapsed / 1e9,
                "evictions": status["evictions"], "objects": status["num_objects"]}
    finally:
        daemon.close()
        master.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 s instead of 10 s")
    parser.add_argument("--ssd-dir", default=None, help="directory of the SSD file "
                        "(default: a temporary directory under /var/tmp)")
    args = parser.parse_args()
    seconds = 4.0 if args.quick else 10.0
    with tempfile.TemporaryDirectory(dir=args.ssd_dir or "/var/tmp") as ssd_dir:
        # NOTE: two directories: an SSD directory keeps the size it was created with
        ceiling = copy_ceiling_gbps(os.path.join(ssd_dir, "ceiling"), 128 * MiB)
        run = demotion_run(os.path.join(ssd_dir, "daemon"), seconds, 4096 * MiB)
    load = open("/proc/loadavg").read().split()[:3]
    print(f"{'figure':<34}{'value':>12}")
    print(f"{'copy_range shm -> ssd file':<34}{ceiling:>9.2f} GB/s  (ceiling)")
    print(f"{'demotion DRAM -> SSD, puts going':<34}{run['demotion_gbps']:>9.2f} GB/s  "
          f"({run['demotions']} x 4 MiB in {run['seconds']:.1f} s, "
          f"{100 * run['demotion_gbps'] / ceiling:.0f}% of the ceiling)")
    print(f"{'puts meanwhile':<34}{run['put_gbps']:>9.2f} GB/s  ({run['puts']} x 4 MiB)")
    print(f"evictions {run['evictions']}, objects {run['objects']}, load average "
          f"{' '.join(load)}")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "demotion_bench.json").write_text(json.dumps(
        {"ceiling_gbps": ceiling, **run, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
