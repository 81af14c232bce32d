"""The cases ``kvstore bench`` measures: put/get over each transport against a daemon's segment
(``transport_cases``) and through ``kvstore.connect`` (``client_cases``).

Each case yields four rows (put/get, single/batched) for one (level, transport, size); a
batch moves about ``BATCH_BYTES`` in at most ``MAX_BATCH_ITEMS`` items. Bytes read back are
compared with bytes written after each case (click.ClickException when they differ), so a
fast but wrong path never reports a figure. Rates come from ``kvstore.bench.measure``.
"""

from __future__ import annotations

import time

import click

from kvstore.bench.measure import latencies_us, rate_beside_memcpy

BATCH_BYTES = 64 * 1024 * 1024        # a batch moves about this much (at most 128 items)
MAX_BATCH_ITEMS = 128
LATENCY_SIZE_BYTES = 64 * 1024


def batch_items(size_bytes: int) -> int:
    """Values of ``size_bytes`` per batched call: about BATCH_BYTES, 1 to MAX_BATCH_ITEMS."""
    return max(1, min(MAX_BATCH_ITEMS, BATCH_BYTES // size_bytes))


def first_node(master_addr: str, token: str | None):
    """The first storage node the master lists (click.ClickException when there is none)."""
    from kvstore.rpc import grpc_client

    with grpc_client(master_addr, token=token) as client:
        nodes = client.list_nodes()
    if not nodes:
        raise click.ClickException(f"master {master_addr} lists no storage node")
    return nodes[0]


def transport_cases(node, kinds, sizes, token, min_time_s, progress, cpu_probe):
    """Rows for the transport level: fixed ranges at the start of the node's first segment."""
    import numpy as np

    from kvstore.transport import make_transports
    from kvstore.transport.base import Target

    segment = next(s for s in node.segments if s.shm_name)
    rows = []
    for kind in kinds:
        transport = make_transports(kind, token=token)[0]
        for size_bytes in sizes:
            num_items = batch_items(size_bytes)
            src = np.random.default_rng(0).integers(0, 256, size_bytes * num_items, np.uint8)
            dst = np.empty_like(src)
            targets = [Target(node.node_id, node.host_id, node.data_addr, segment.segment_id,
                              segment.shm_name, i * size_bytes, size_bytes)
                       for i in range(num_items)]
            srcs = [memoryview(src[i * size_bytes:(i + 1) * size_bytes]) for i in range(num_items)]
            dsts = [memoryview(dst[i * size_bytes:(i + 1) * size_bytes]) for i in range(num_items)]
            _check(transport.write_many(list(zip(targets, srcs)), timeout_s=60))
            put_one = lambda: transport.write(targets[0], srcs[0], timeout_s=60)  # noqa: E731
            get_one = lambda: transport.read_into(targets[0], dsts[0], timeout_s=60)  # noqa: E731
            put_many = lambda: _check(transport.write_many(list(zip(targets, srcs)), timeout_s=60))  # noqa: E731,E501
            get_many = lambda: _check(transport.read_many(list(zip(targets, dsts)), timeout_s=60))  # noqa: E731,E501
            rows += _measure("transport", kind, size_bytes, num_items, put_one, get_one,
                             put_many, get_many, min_time_s, progress, cpu_probe)
            if not np.array_equal(src, dst):
                raise click.ClickException(f"{kind}: bytes read differ from bytes written")
        transport.close()
    return rows


def client_cases(master_addr, kinds, sizes, token, min_time_s, progress, cpu_probe):
    """Rows for the client level: kvstore.connect put/get with fresh keys per put."""
    import itertools

    import numpy as np

    import kvstore

    rows = []
    counter = itertools.count()
    for kind in kinds:
        store = kvstore.connect(master_addr, token=token, transport=kind)
        for size_bytes in sizes:
            num_items = batch_items(size_bytes)
            src = np.random.default_rng(1).integers(0, 256, size_bytes, np.uint8)
            outs = [np.empty(size_bytes, np.uint8) for _ in range(num_items)]
            prefix = f"bench/{time.time_ns()}/{kind}/{size_bytes}"
            keys = [f"{prefix}/fixed/{i}" for i in range(num_items)]
            store.batch_put(keys, [src] * num_items)

            # NOTE: fresh keys per put (a second put of a key is a no-op); they are removed
            # after the case, and the master evicts old ones if a case outgrows the pool.
            def put_one():
                store.put(f"{prefix}/{next(counter)}", src)

            def put_many():
                batch = [f"{prefix}/{next(counter)}" for _ in range(num_items)]
                _check(store.batch_put(batch, [src] * num_items))

            get_one = lambda: store.get_into(keys[0], outs[0])  # noqa: E731
            get_many = lambda: _check(store.batch_get_into(keys, outs))  # noqa: E731
            rows += _measure("client", kind, size_bytes, num_items, put_one, get_one,
                             put_many, get_many, min_time_s, progress, cpu_probe)
            if not np.array_equal(outs[-1], src):
                raise click.ClickException(f"client {kind}: bytes read differ from bytes put")
            store.remove_prefix(prefix, force=True)
        store.close()
    return rows


def _check(results) -> None:
    """Raise the first per-item error of a batch (items are None or a count on success)."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _measure(level, kind, size_bytes, num_items, put_one, get_one, put_many, get_many,
             min_time_s, progress, cpu_probe):
    rows = []
    # NOTE: gets run first: at the client level the puts may fill the pool and make the
    # master evict the objects the gets read
    for mode, op, fn, num_bytes in (("single", "get", get_one, size_bytes),
                                    ("batch", "get", get_many, size_bytes * num_items),
                                    ("single", "put", put_one, size_bytes),
                                    ("batch", "put", put_many, size_bytes * num_items)):
        gbps, memcpy_gbps, cpu_s_per_gb = rate_beside_memcpy(fn, num_bytes, min_time_s,
                                                              cpu_probe)
        row = {"level": level, "transport": kind, "size_bytes": size_bytes, "mode": mode,
               "batch_items": num_items if mode == "batch" else 1, "op": op, "gbps": gbps,
               "memcpy_gbps": memcpy_gbps, "cpu_s_per_gb": cpu_s_per_gb}
        if size_bytes == LATENCY_SIZE_BYTES and mode == "single":
            row["p50_us"], row["p99_us"] = latencies_us(fn, 300)
        rows.append(row)
        progress.update(1)
    return [rows[2], rows[0], rows[3], rows[1]]  # table order: put/get single, put/get batch
