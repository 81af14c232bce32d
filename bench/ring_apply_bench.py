"""The daemon's CPU per commit-ring entry (issue 10, 10d): a record of BATCH entries through
``client_commits.apply`` (what ``RingDrain`` runs: capability checks, ``WriteGuard.claim``,
the table), then the master's copy of the same change through ``ObjectTable.apply`` (the
next heartbeat), in microseconds of this thread's CPU per entry (CPU: the figure that survives a loaded host). In-process, real WriteGuard / ObjectTable /
capabilities; no servers. Ceiling of the same run: two keyed BLAKE2b per entry (the
capability's MAC and the object id, which every design checks), measured alone. Also the
master's side of the same record: issuing its 128 write capabilities one ``issue`` per
replica (PutStart before 10p) and in one ``issue_many`` (since; absent from older trees).
With batch capabilities (10m; absent from older trees): the same record carrying one batch
capability instead of 128 (``ClientCommit.batch_capability``), and the master's
``issue_batch`` for it, per entry.

Run it with each tree's interpreter, interleaved, e.g.
    /work/base2/.venv/bin/python bench/ring_apply_bench.py; .venv/bin/python bench/ring_apply_bench.py
(the script imports whichever ``kvstore`` that interpreter has installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time

from kvstore import capability
from kvstore.daemon import client_commits
from kvstore.daemon.objects import ObjectTable
from kvstore.daemon.write_guard import WriteGuard
from kvstore.rpc import HeartbeatChanges, Inventory
from kvstore.v1 import master_pb2 as pb

SIZE = 65536


def _round(batch: int, records: int, batched: bool = False) -> tuple[float, float]:
    secret = capability.new_secret()
    guard = WriteGuard("n1")
    guard.set_secret(secret)
    table = ObjectTable([], guard)
    table.acked_seq = seq = 1
    drain_s = reapply_s = 0.0
    for r in range(records):
        keys = [f"k{r}-{i}" for i in range(batch)]
        offsets = [(r * batch + i) * SIZE for i in range(batch)]
        expiry_ms = int(time.time() * 1000) + 60_000
        if batched:
            caps, whole = [], capability.issue_batch(secret, "n1", "cluster", expiry_ms, seq,
                                                     ["seg"] * batch, offsets,
                                                     [SIZE] * batch, keys)
        else:
            caps, whole = [capability.issue(secret, "n1", "seg", o, SIZE, k, "cluster",
                                            expiry_ms, seq)
                           for k, o in zip(keys, offsets)], b""
        body = pb.ClientCommit(keys=keys, segment_ids=["seg"] * batch, offsets=offsets,
                               sizes=[SIZE] * batch, checksums=list(range(batch)),
                               capabilities=caps, **({"batch_capability": whole} if whole
                                                     else {})).SerializeToString()
        start = time.thread_time()
        refused = client_commits.apply(table, guard, body, "cluster")
        drain_s += time.thread_time() - start
        assert not refused, refused[:1]
        change = HeartbeatChanges("m", seq + 1, False,
                                  Inventory(keys, ["seg"] * batch, offsets, [SIZE] * batch,
                                            list(range(batch)), [0] * batch), [],
                                  base_seq=seq)
        start = time.thread_time()
        assert table.apply(change) == batch
        reapply_s += time.thread_time() - start
        seq += 1
    entries = batch * records
    return drain_s / entries * 1e6, reapply_s / entries * 1e6


def _ceiling_us(entries: int) -> float:
    keyed = hashlib.blake2b(key=b"k" * 32, digest_size=16)
    body = b"x" * 66
    start = time.thread_time()
    for i in range(entries):
        mac = keyed.copy()
        mac.update(body)
        mac.update(b"\0n1\0seg")
        mac.digest()
        hashlib.blake2b(f"k-{i}".encode(), digest_size=16).digest()
    return (time.thread_time() - start) / entries * 1e6


def _issue_us(batch: int, many: bool) -> float:
    """Thread CPU per capability of issuing ``batch`` of them, 200 times."""
    secret, keys = capability.new_secret(), [f"key/{i}" for i in range(batch)]
    start = time.thread_time()
    for _ in range(200):
        if many:
            capability.issue_many("cluster", 10 ** 13, (
                (secret, "node-1", "seg-0", i * SIZE, SIZE, key, 77)
                for i, key in enumerate(keys)))
        else:
            [capability.issue(secret, "node-1", "seg-0", i * SIZE, SIZE, key, "cluster",
                              10 ** 13, 77) for i, key in enumerate(keys)]
    return (time.thread_time() - start) / (200 * batch) * 1e6


def _issue_batch_us(batch: int) -> float:
    """Thread CPU per entry of issuing one batch capability over ``batch`` entries."""
    secret, keys = capability.new_secret(), [f"key/{i}" for i in range(batch)]
    offsets = [i * SIZE for i in range(batch)]
    start = time.thread_time()
    for _ in range(200):
        capability.issue_batch(secret, "node-1", "cluster", 10 ** 13, 77, ["seg-0"] * batch,
                               offsets, [SIZE] * batch, keys)
    return (time.thread_time() - start) / (200 * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="entries per record")
    parser.add_argument("--records", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="", help="write the figures here")
    args = parser.parse_args()
    rounds = [_round(args.batch, args.records) for _ in range(args.rounds)]
    ceiling = [_ceiling_us(args.batch * args.records) for _ in range(args.rounds)]
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    rows = {"drain apply us/entry": [r[0] for r in rounds],
            "heartbeat re-apply us/entry": [r[1] for r in rounds],
            "ceiling: 2 BLAKE2b us/entry": ceiling,
            "master: issue per replica us/cap": [_issue_us(args.batch, False)
                                                 for _ in range(args.rounds)]}
    if hasattr(capability, "issue_many"):
        rows["master: issue_many us/cap"] = [_issue_us(args.batch, True)
                                             for _ in range(args.rounds)]
    if hasattr(capability, "issue_batch"):
        # NOTE: interleaved with the per-entry rounds above only round by round; run the
        # script twice for a second interleaving
        batched = [_round(args.batch, args.records, True) for _ in range(args.rounds)]
        rows["drain apply, batch cap us/entry"] = [r[0] for r in batched]
        rows["master: issue_batch us/entry"] = [_issue_batch_us(args.batch)
                                                for _ in range(args.rounds)]
    print(f"kvstore at {os.path.dirname(capability.__file__)}; {args.batch} entries a record, "
          f"{args.records} records, {args.rounds} rounds; load {' '.join(load)}")
    print(f"{'figure':32} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in rows.items():
        print(f"{name:32} {statistics.median(values):8.2f} {min(values):8.2f} "
              f"{max(values):8.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"load": load, "batch": args.batch, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
