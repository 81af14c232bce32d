"""What TLS costs on the tcp path: ``kvstore bench transfer`` over tcp, with and without TLS,
interleaved round by round (each run starts its own master and daemon; the TLS runs serve
mutual TLS with certificates made by scripts/make_tls_certs.sh).

Reports, per level (transport: the data plane alone; client: ``kvstore.connect``, master
calls included), 4 MiB single-call put/get GB/s and 64 KiB single-call put/get p50, as the
range over rounds, and the TLS/plain ratio of the medians. ``--before KVSTORE`` adds the plain
runs of another build's ``kvstore`` (e.g. main's) as a third variant, so the plain path's
figures can be compared before and after this code. Prints a table, writes
bench/out/tls_bench.json (every row of every run, with the load average around each run).

    .venv/bin/python bench/tls_bench.py [--rounds 3] [--duration 0.25s]
                                        [--before /work/base/.venv/bin/kvstore]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT_PATH = HERE / "out" / "tls_bench.json"
SIZES = {"64KiB": 64 * 1024, "4MiB": 4 * 1024 * 1024}
#: (size, op, figure) cells of the table
CELLS = [("4MiB", "put", "gbps"), ("4MiB", "get", "gbps"),
         ("64KiB", "put", "p50_us"), ("64KiB", "get", "p50_us")]


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _run(kvstore_bin: str, tls_args: list[str], duration: str, json_path: Path) -> dict:
    command = [kvstore_bin, "bench", "transfer", "--transports", "tcp", "--levels",
               "transport,client", "--sizes", ",".join(SIZES), "--duration", duration,
               "--json", str(json_path), *tls_args]
    load_before = _loadavg()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(json_path.read_text())
    return {"command": command, "load_before": load_before, "load_after": _loadavg(),
            "rows": [r for r in result["rows"] if r["mode"] == "single"]}


def _figure(run: dict, level: str, size: str, op: str, figure: str) -> float:
    row = next(r for r in run["rows"] if (r["level"], r["size_bytes"], r["op"])
               == (level, SIZES[size], op))
    return row[figure]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", default="0.25s")
    parser.add_argument("--before", default=None, metavar="KVSTORE",
                        help="another build's kvstore executable: its plain runs join")
    args = parser.parse_args()
    if shutil.which("openssl") is None:
        print("tls_bench: skipped: openssl is not installed (no certificates to serve)")
        return 0
    kvstore_bin = str(Path(sys.executable).with_name("kvstore"))
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        subprocess.run([str(REPO / "scripts" / "make_tls_certs.sh"), str(certs)], check=True,
                       stdout=subprocess.DEVNULL)
        tls_args = ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "server.pem"),
                    "--tls-key", str(certs / "server.key")]
        variants = {"plain": (kvstore_bin, []), "tls": (kvstore_bin, tls_args)}
        if args.before:
            variants = {"before": (args.before, []), **variants}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            for name, (binary, extra) in variants.items():
                print(f"round {round_index + 1}/{args.rounds}: {name} "
                      f"(load {' '.join(map(str, _loadavg()))})", file=sys.stderr, flush=True)
                runs[name].append(_run(binary, extra, args.duration,
                                       Path(tmp) / f"{name}-{round_index}.json"))
    print(f"{'level':<10} {'figure':<18} " + " ".join(f"{name:>17}" for name in variants)
          + f" {'tls/plain':>9}")
    table = []
    for level in ("transport", "client"):
        for size, op, figure in CELLS:
            values = {name: [_figure(run, level, size, op, figure) for run in runs[name]]
                      for name in variants}
            medians = {name: statistics.median(v) for name, v in values.items()}
            ratio = medians["tls"] / medians["plain"] if medians["plain"] else float("nan")
            gbps = figure == "gbps"
            label = f"{size} {op} " + ("GB/s" if gbps else "p50 us")
            cells = " ".join(f"{min(v):.2f}-{max(v):.2f}" if gbps else f"{min(v):.0f}-{max(v):.0f}"
                             for v in values.values())
            cells = " ".join(f"{cell:>17}" for cell in cells.split(" "))
            print(f"{level:<10} {label:<18} {cells} {ratio:>9.2f}")
            table.append({"level": level, "size": size, "op": op, "figure": figure,
                          "values": values, "medians": medians, "tls_over_plain": ratio})
    loads = [run["load_before"][0] for name in runs for run in runs[name]]
    print(f"load average (1 min) before each run: {min(loads):.2f}-{max(loads):.2f}")
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_text(json.dumps({"table": table, "runs": runs, "cpus": os.cpu_count()},
                                   indent=2))
    print(f"wrote {OUT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
