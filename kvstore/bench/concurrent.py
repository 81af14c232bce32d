"""The client level of ``kvstore bench transfer`` from several threads (``--threads``) in
several processes (``--processes``) at once.

Each process holds one ``kvstore.connect`` store shared by its threads (as an engine's
workers share one); every thread runs the same operation in a loop for the budget's
duration, all starting at one moment, and the row's GB/s is every byte moved over the wall
time. The get phases read keys put before them; the puts write fresh keys. Each thread
checks the bytes of its last get (``kvstore.bench.verify``); a mismatch aborts the run. The
ceiling stays a single-thread memcpy of the case's pattern, measured here between the phases.
With ``--target-node`` every put asks for that node and the workers hand back the keys they
put, whose placement is checked like the single-client cases' (``kvstore.bench.placement``).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from kvstore.bench.measure import Figure, percentiles_us, rate
from kvstore.bench.signals import signals_held
from kvstore.bench.transfer import CaseSettings, batch_items, make_row

_STORE = {}  # the store of this worker process: {"store": KVStore}


def _connect(master_addr: str, token: str | None, kind: str, tls) -> None:
    """A worker's start: its store; SIGINT ignored (a Ctrl-C reaches the whole process
    group, and the parent stops its pool itself)."""
    import signal

    import kvstore

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    _STORE["store"] = kvstore.connect(master_addr, token=token, transport=kind, tls=tls)


def _thread_loop(store, op, mode, keys, prefix, size_bytes, num_items, deadline_s, verify_all,
                 tag, near):
    import numpy as np

    from kvstore.bench.verify import check_bytes

    src = np.random.default_rng(1).integers(0, 256, size_bytes, np.uint8)
    outs = [np.empty(size_bytes, np.uint8) for _ in range(num_items if mode == "batch" else 1)]
    samples, moved, n, put_keys = [], 0, 0, []
    while True:
        started_s = time.perf_counter()
        if op == "get" and mode == "single":
            store.get_into(keys[0], outs[0])
        elif op == "get":
            _raise_first(store.batch_get_into(keys[:num_items], outs))
        elif mode == "single":
            put_keys.append(f"{prefix}/{tag}/{n}")
            store.put(put_keys[-1], src, near_node=near)
        else:
            batch = [f"{prefix}/{tag}/{n}/{i}" for i in range(num_items)]
            put_keys += batch
            _raise_first(store.batch_put(batch, [src] * num_items, near_node=near))
        n += 1
        now_s = time.perf_counter()
        samples.append(now_s - started_s)
        moved += size_bytes * len(outs)
        if now_s >= deadline_s and n >= 2:
            break
    if op == "get":
        for i, out in enumerate(outs):
            check_bytes(src, out, verify_all=verify_all, what=f"client {size_bytes} B item {i}")
    return moved, samples, put_keys


def _raise_first(results) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


def run_phase(args) -> tuple[int, list[float], float, list[str]]:
    """One process's share of a phase: (bytes moved, per-call seconds, wall seconds, keys
    put: only with a target node, whose placement is then checked)."""
    (op, mode, keys, prefix, size_bytes, num_items, num_threads, start_at, duration_s,
     verify_all, worker, near) = args
    store = _STORE["store"]
    while time.time() < start_at:
        time.sleep(0.0005)
    started_s = time.perf_counter()
    deadline_s = started_s + duration_s
    with ThreadPoolExecutor(num_threads) as pool:
        futures = [pool.submit(_thread_loop, store, op, mode, keys, prefix, size_bytes,
                               num_items, deadline_s, verify_all, f"w{worker}.{t}", near)
                   for t in range(num_threads)]
        results = [f.result() for f in futures]
    elapsed_s = time.perf_counter() - started_s
    return (sum(r[0] for r in results), [s for r in results for s in r[1]], elapsed_s,
            [k for r in results for k in r[2]] if near else [])


def concurrent_cases(master_addr, kinds, sizes, settings: CaseSettings, num_threads: int,
                     num_processes: int, rows: list) -> None:
    """Append the client level's rows measured from ``num_processes`` x ``num_threads``."""
    import numpy as np

    import kvstore
    from kvstore.bench.placement import check_placement

    duration_s = settings.budget.duration_s
    near = settings.target_node
    ctx = mp.get_context("spawn")
    for kind in kinds:
        # NOTE: SIGINT waits until the pool has started its workers: a Ctrl-C while one
        # reads its bootstrap data would leave it half-fed (a traceback from the bootstrap)
        with signals_held(signal.SIGINT, block_in_children=True):
            pool = ctx.Pool(num_processes, initializer=_connect,
                            initargs=(master_addr, settings.token, kind, settings.tls))
        with pool, kvstore.connect(master_addr, token=settings.token, transport=kind,
                                   tls=settings.tls) as store:
            for size_bytes in sizes:
                num_items = batch_items(size_bytes, settings.batch)
                src = np.random.default_rng(1).integers(0, 256, size_bytes, np.uint8)
                prefix = f"bench/{time.time_ns()}/{kind}/{size_bytes}"
                keys = [f"{prefix}/fixed/{i}" for i in range(num_items)]
                _raise_first(store.batch_put(keys, [src] * num_items, near_node=near))
                put_keys = list(keys)
                by_mode = {}
                try:
                    for mode, op in (("single", "get"), ("batch", "get"), ("single", "put"),
                                     ("batch", "put")):
                        items = num_items if mode == "batch" else 1
                        start_at = time.time() + 0.2
                        parts = pool.map(run_phase, [
                            (op, mode, keys, prefix, size_bytes, items, num_threads, start_at,
                             duration_s, settings.verify_all, w, near)
                            for w in range(num_processes)])
                        moved = sum(p[0] for p in parts)
                        elapsed_s = max(p[2] for p in parts)
                        samples = [s for p in parts for s in p[1]]
                        put_keys += [k for p in parts for k in p[3]]
                        copy = settings.ceiling.fn(size_bytes, items,
                                                   size_bytes * num_items)
                        memcpy_gbps = rate(copy, size_bytes * items, settings.budget)
                        # NOTE: no CPU s/GB here: the worker processes' CPU is not probed
                        figure = Figure(moved / elapsed_s / 1e9, memcpy_gbps, None,
                                        percentiles_us(samples))
                        by_mode[mode, op] = make_row("client", kind, size_bytes, mode, items,
                                                     op, figure, num_threads * num_processes)
                        settings.progress.update(1)
                    what = f"client {kind} {size_bytes} B x{num_threads * num_processes}"
                    settings.placement[what] = check_placement(
                        master_addr, settings.token, put_keys, near, what, tls=settings.tls)
                finally:
                    store.remove_prefix(prefix, force=True)
                rows += [by_mode[k] for k in (("single", "put"), ("single", "get"),
                                              ("batch", "put"), ("batch", "get"))
                         if k in by_mode]
