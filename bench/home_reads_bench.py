"""Home reads on their own: first gets (keys this client never read) with home reads on and
off, interleaved in one process against the same ``kvstore master`` and two ``kvstore
daemon``s (so both columns see the same servers and the same load), with the loopback
round trip (a data-plane PING) as the ceiling measured in the same run.

Per round: the writer puts fresh keys (free placement: each on its home node); the "off"
client (``home_reads=False``: GetReplicas + READ) and the "on" client (default: one
KEYED_READ to the home) each read keys of their own once: 64 KiB and 4 MiB single gets
(p50), and ``batch_get`` of 1,024 keys of 64 bytes (keys/s of the median batch). Both have
the location cache off (every read is a first read). Prints per metric the range over
rounds, the on/off ratio, the home hits and the load average; writes
bench/out/home_reads.json.

    .venv/bin/python bench/home_reads_bench.py [--rounds 5] [--per-round 200]
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import numpy as np

import _rounds
import kvstore
from kvstore._process import ServerProcess
from kvstore.transport import data_frames

OUT_DIR = Path(__file__).resolve().parent / "out"
MiB = 1 << 20
BATCH = 1024


def _ping_p50(data_addr: str, count: int) -> float:
    """p50 of one data-plane PING round trip (the floor of any one-round-trip get)."""
    host, port = data_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        data_frames.configure_socket(sock)
        sock.sendall(data_frames.encode_hello(None))
        msg_len = data_frames.REPLY.unpack(
            data_frames.recv_exact(sock, data_frames.REPLY.size))[2]
        data_frames.recv_exact(sock, msg_len)          # the hello's reply: the node id

        def ping(_):
            sock.sendall(data_frames.REQUEST.pack(data_frames.REQUEST_MAGIC,
                                                  data_frames.Op.PING, 0, 0, 1, 0, 0))
            data_frames.recv_exact(sock, data_frames.REPLY.size)
        return _rounds.p50_s(ping, count)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"])
    daemons = [ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                              "--port", "0", "--dram", str(1024 * MiB)]) for _ in range(2)]
    rows = []
    try:
        with kvstore.connect(master.address, transport="tcp", home_reads=False,
                             location_cache_entries=0) as writer, \
                kvstore.connect(master.address, transport="tcp", home_reads=False,
                                location_cache_entries=0) as off, \
                kvstore.connect(master.address, transport="tcp",
                                location_cache_entries=0) as on:
            for _ in range(200):
                if writer.stats()["master"]["num_nodes"] == 2:
                    break
                time.sleep(0.05)
            nodes = writer._master.list_nodes()
            for r in range(args.rounds):
                row = {"round": r, "load": Path("/proc/loadavg").read_text().split()[0],
                       "ping_us": _ping_p50(nodes[0].data_addr, args.per_round) * 1e6}
                for size_name, size, count in (("64KiB", 64 << 10, args.per_round),
                                               ("4MiB", 4 * MiB, max(8, args.per_round // 8))):
                    value = np.random.default_rng(size).integers(0, 256, size, np.uint8)
                    for name, store in (("off", off), ("on", on)):
                        keys = [f"hr/{r}/{size_name}/{name}/{i}" for i in range(count)]
                        writer.batch_put(keys, [value] * count)
                        if store.get(keys[0]) != value.tobytes():
                            raise RuntimeError("wrong bytes")
                        p50 = _rounds.p50_s(lambda i: store.get(keys[i]), count)
                        row[f"{size_name}_{name}"] = (p50 * 1e6 if size < MiB
                                                      else size / p50 / 1e9)
                        writer.remove_prefix(f"hr/{r}/{size_name}/{name}/", force=True)
                small = np.random.default_rng(1).integers(0, 256, 64, np.uint8)
                for name, store in (("off", off), ("on", on)):
                    batches = [[f"hr/{r}/b/{name}/{j}/{i}" for i in range(BATCH)]
                               for j in range(5)]
                    for keys in batches:
                        writer.batch_put(keys, [small] * BATCH)
                    p50 = _rounds.p50_s(lambda j: store.batch_get(batches[j]), len(batches))
                    row[f"batch_{name}"] = BATCH / p50 / 1e3
                    writer.remove_prefix(f"hr/{r}/b/{name}/", force=True)
                row["home_hits"] = on.stats()["home_reads"]["hits"]
                rows.append(row)
                print(row, flush=True)
    finally:
        for daemon in daemons:
            daemon.close()
        master.close()
    print(f"\n{'metric':22} {'off':>16} {'on':>16} {'on/off':>12}")
    for metric, unit in (("64KiB", "us p50"), ("4MiB", "GB/s"), ("batch", "k keys/s")):
        off = [r[f"{metric}_off"] for r in rows]
        on = [r[f"{metric}_on"] for r in rows]
        ratios = [b / a for a, b in zip(off, on)]
        print(f"{metric + ' (' + unit + ')':22} {min(off):7.1f}-{max(off):<8.1f}"
              f"{min(on):7.1f}-{max(on):<8.1f}{min(ratios):5.2f}-{max(ratios):.2f}")
    pings = [r["ping_us"] for r in rows]
    print(f"{'ping (us p50)':22} {min(pings):7.1f}-{max(pings):<8.1f}  (the round trip)")
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "home_reads.json").write_text(json.dumps(rows, indent=2))
    print(f"\nJSON: {OUT_DIR / 'home_reads.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
