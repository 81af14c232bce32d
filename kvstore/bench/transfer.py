"""The cases ``kvstore bench transfer`` measures: put/get over each transport against a
daemon's segment (``transport_cases``) and through ``kvstore.connect`` (``client_cases``;
``kvstore.bench.concurrent`` runs the latter from several threads or processes).

Each case yields four rows (put/get, single/batched) for one (level, transport, size); a
batch moves about ``BATCH_BYTES`` in at most ``MAX_BATCH_ITEMS`` items unless ``--batch``
says how many. The bytes read back are checked after each case (``kvstore.bench.verify``:
all of them with ``--verify``, else a sample), so a fast but wrong path never reports a
figure. Rates come from ``kvstore.bench.measure``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import click

from kvstore.bench.measure import Budget, ColdCopy, rate_beside_memcpy
from kvstore.bench.verify import check_bytes

BATCH_BYTES = 64 * 1024 * 1024        # a batch moves about this much (at most 128 items)
MAX_BATCH_ITEMS = 128


def batch_items(size_bytes: int, batch: int | None = None) -> int:
    """Values of ``size_bytes`` per batched call: ``batch`` when given, else about
    BATCH_BYTES in 1 to MAX_BATCH_ITEMS items."""
    if batch is not None:
        return batch
    return max(1, min(MAX_BATCH_ITEMS, BATCH_BYTES // size_bytes))


@dataclasses.dataclass
class CaseSettings:
    """What every case shares: the budget per measurement, byte checking, the batch size
    override, CPU accounting, the memcpy ceiling and the progress bar (``update(1)`` per row)."""

    budget: Budget
    verify_all: bool
    batch: int | None
    cpu_probe: Callable[[], float]
    ceiling: ColdCopy
    progress: Any
    token: str | None = None
    tls: Any = None     # kvstore.TLSConfig of every connection (None: plain text)
    target_node: str | None = None   # --target-node: every put goes there (checked)
    placement: dict = dataclasses.field(default_factory=dict)  # case -> {node: replicas}
    raw_nixl: Any = None  # nixl_ceiling.RawNixlCeiling: nixl rows' interleaved link ceiling


def transport_cases(master_addr: str, node, kinds, sizes, settings: CaseSettings,
                    rows: list) -> None:
    """Append the transport level's rows to ``rows``: ranges of the node's DRAM segment
    allocated by one PutStart per size (so tcp writes carry the master's write capabilities,
    as a client's do), given back by PutRevoke after (only a private daemon)."""
    from kvstore.rpc import grpc_client
    from kvstore.tiers import Tier

    with grpc_client(master_addr, token=settings.token, tls=settings.tls) as master:
        size_to_targets = {}
        for size_bytes in sizes:
            keys = [f"bench-transport-{size_bytes}-{i}"
                    for i in range(batch_items(size_bytes, settings.batch))]
            slots = master.put_start(keys, [size_bytes] * len(keys), client_id="bench",
                                     tier=Tier.DRAM, near_node_id=node.node_id)
            _check(slots)
            size_to_targets[size_bytes] = [targets[0] for targets in slots]
        try:
            _transport_cases(node, size_to_targets, kinds, sizes, settings, rows)
        finally:
            for size_bytes, targets in size_to_targets.items():
                master.put_revoke([f"bench-transport-{size_bytes}-{i}"
                                   for i in range(len(targets))], client_id="bench")


def _transport_cases(node, size_to_targets, kinds, sizes, settings: CaseSettings,
                     rows: list) -> None:
    import numpy as np

    from kvstore.transport import make_transports

    for kind in kinds:
        transport = make_transports(kind, token=settings.token, tls=settings.tls,
                                    nodes=lambda: {node.node_id: node.nixl_metadata})[0]
        try:
            for size_bytes in sizes:
                num_items = batch_items(size_bytes, settings.batch)
                src = np.random.default_rng(0).integers(0, 256, size_bytes * num_items,
                                                        np.uint8)
                dst = np.empty_like(src)
                targets = size_to_targets[size_bytes]
                srcs = [memoryview(src[i * size_bytes:(i + 1) * size_bytes])
                        for i in range(num_items)]
                dsts = [memoryview(dst[i * size_bytes:(i + 1) * size_bytes])
                        for i in range(num_items)]
                _check(transport.write_many(list(zip(targets, srcs)), timeout_s=60))
                turn = _Turns(num_items)  # single calls cycle through the batch's ranges
                ops = {
                    "put_one": lambda: transport.write(*_at(targets, srcs, turn()),
                                                       timeout_s=60),
                    "get_one": lambda: transport.read_into(*_at(targets, dsts, turn()),
                                                           timeout_s=60),
                    "put_many": lambda: _check(transport.write_many(list(zip(targets, srcs)),
                                                                    timeout_s=60)),
                    "get_many": lambda: _check(transport.read_many(list(zip(targets, dsts)),
                                                                   timeout_s=60)),
                }
                rows += measure_case("transport", kind, size_bytes, num_items, ops, settings)
                check_bytes(src, dst, verify_all=settings.verify_all,
                            what=f"transport {kind} {size_bytes} B")
        finally:
            transport.close()


def client_cases(master_addr, kinds, sizes, settings: CaseSettings, rows: list,
                 tier: str | None = None) -> None:
    """Append the client level's rows to ``rows``: kvstore.connect put/get, fresh keys per
    put, removed after each case. Every put asks for ``settings.target_node`` (when set), and
    before the removal the master is asked where the case's keys went
    (``kvstore.bench.placement``: an error when one is elsewhere); the counts go to
    ``settings.placement``. With ``tier`` ("ssd") every put asks for that tier and the rows'
    level is the tier's name."""
    import itertools

    import numpy as np

    import kvstore
    from kvstore.bench.placement import check_placement

    counter = itertools.count()
    near = settings.target_node
    for kind in kinds:
        with kvstore.connect(master_addr, token=settings.token, transport=kind,
                             tls=settings.tls) as store:
            for size_bytes in sizes:
                num_items = batch_items(size_bytes, settings.batch)
                src = np.random.default_rng(1).integers(0, 256, size_bytes, np.uint8)
                outs = [np.empty(size_bytes, np.uint8) for _ in range(num_items)]
                prefix = f"bench/{time.time_ns()}/{tier or kind}/{size_bytes}"
                keys = [f"{prefix}/fixed/{i}" for i in range(num_items)]
                _check(store.batch_put(keys, [src] * num_items, near_node=near, tier=tier))
                put_keys = list(keys)

                # NOTE: fresh keys per put (a second put of a key is a no-op); they are
                # removed after the case, and the master evicts old ones if a case outgrows
                # the pool.
                def put_one():
                    put_keys.append(f"{prefix}/{next(counter)}")
                    store.put(put_keys[-1], src, near_node=near, tier=tier)

                def put_many():
                    batch = [f"{prefix}/{next(counter)}" for _ in range(num_items)]
                    put_keys.extend(batch)
                    _check(store.batch_put(batch, [src] * num_items, near_node=near,
                                           tier=tier))

                turn = _Turns(num_items)  # single gets cycle through the batch's keys
                ops = {"put_one": put_one, "put_many": put_many,
                       "get_one": lambda: store.get_into(*_at(keys, outs, turn())),
                       "get_many": lambda: _check(store.batch_get_into(keys, outs))}
                try:
                    level = tier or "client"
                    rows += measure_case(level, kind, size_bytes, num_items, ops, settings)
                    for i, out in enumerate(outs):
                        check_bytes(src, out, verify_all=settings.verify_all,
                                    what=f"{level} {kind} {size_bytes} B item {i}")
                    what = f"{level} {kind} {size_bytes} B"
                    settings.placement[what] = check_placement(
                        master_addr, settings.token, put_keys, near, what, tls=settings.tls)
                finally:
                    store.remove_prefix(prefix, force=True)


class _Turns:
    """0, 1, ..., n - 1, 0, 1, ... one per call."""

    def __init__(self, n: int) -> None:
        self._n, self._next = n, 0

    def __call__(self) -> int:
        turn, self._next = self._next, (self._next + 1) % self._n
        return turn


def _at(firsts, seconds, i: int) -> tuple:
    return firsts[i], seconds[i]


def _check(results) -> None:
    """Raise the first per-item error of a batch (items are None or a count on success)."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


def measure_case(level: str, kind: str, size_bytes: int, num_items: int, ops: dict,
                 settings: CaseSettings, *, concurrency: int = 1) -> list[dict]:
    """Four rows, put/get x single/batch, for one case; ``ops`` maps put_one, get_one,
    put_many, get_many to a call. Rows come back in table order (put/get single, then
    batch); each updates the progress bar as it is measured."""
    rows = {}
    # NOTE: gets run first: at the client level the puts may fill the pool and make the
    # master evict the objects the gets read
    for mode, op in (("single", "get"), ("batch", "get"), ("single", "put"), ("batch", "put")):
        items = num_items if mode == "batch" else 1
        fn = ops[f"{op}_{'one' if mode == 'single' else 'many'}"]
        # NOTE: the ceiling copies through as many distinct buffers as the case touches
        # (its batch of values), so both are equally cold in the caches
        link = settings.raw_nixl.link(size_bytes, items, mode, op) \
            if kind == "nixl" and settings.raw_nixl is not None else None
        figure = rate_beside_memcpy(fn, size_bytes, items, settings.budget, settings.cpu_probe,
                                    settings.ceiling, working_set_bytes=size_bytes * num_items,
                                    link=link)
        rows[mode, op] = make_row(level, kind, size_bytes, mode, items, op, figure, concurrency)
        settings.progress.update(1)
    return [rows[k] for k in (("single", "put"), ("single", "get"), ("batch", "put"),
                              ("batch", "get"))]


def make_row(level, kind, size_bytes, mode, items, op, figure, concurrency) -> dict:
    """One row of the table and of the JSON."""
    return {"level": level, "transport": kind, "size_bytes": size_bytes, "mode": mode,
            "batch_items": items, "op": op, "concurrency": concurrency, "gbps": figure.gbps,
            "memcpy_gbps": figure.memcpy_gbps, "cpu_s_per_gb": figure.cpu_s_per_gb,
            **({"link_gbps": figure.link_gbps} if figure.link_gbps is not None else {}),
            **figure.latency_us}
