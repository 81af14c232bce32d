"""client/hashing.py: a large put batch's checksums are computed on a background thread
while the put moves its bytes; the sums are the same as the calling thread's, a busy thread
never makes a put wait, a failed hash is raised to the caller, and stores keep returning
the right bytes (every get verifies the sums)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import kvstore
from kvstore.client import hashing
from kvstore.client.checksum import checksum

MiB = 1024 * 1024


def values(count: int, size: int, seed: int) -> list[memoryview]:
    rng = np.random.default_rng(seed)
    return [memoryview(rng.integers(0, 256, size, np.uint8)) for _ in range(count)]


def test_large_batches_hash_in_the_background_small_ones_inline_same_sums():
    large = values(4, MiB, 1)
    sums = hashing.start(large, checksum)
    assert sums.background and sums.result() == [checksum(v) for v in large]
    small = values(128, 64 * 1024, 2)        # 8 MiB, but of short values: inline
    sums = hashing.start(small, checksum)
    assert not sums.background and sums.result() == [checksum(v) for v in small]
    assert not hashing.start(values(3, MiB, 3), checksum).background   # under 4 MiB


def test_a_busy_hash_thread_makes_the_next_batch_hash_inline():
    entered, release = threading.Event(), threading.Event()

    def slow(src):
        entered.set()
        release.wait(30)
        return checksum(src)
    first = hashing.start(values(4, MiB, 4), slow)
    assert first.background and entered.wait(30)
    second = values(4, MiB, 5)
    other = hashing.start(second, checksum)
    assert not other.background and other.result() == [checksum(v) for v in second]
    release.set()
    assert len(first.result()) == 4
    assert hashing.start(values(4, MiB, 6), checksum).background   # free again


def test_a_failed_background_hash_is_raised_by_result_not_wait():
    def broken(src):
        raise ValueError("cannot hash")
    sums = hashing.start(values(4, MiB, 7), broken)
    sums.wait()
    with pytest.raises(ValueError, match="cannot hash"):
        sums.result()
    assert hashing.start(values(4, MiB, 8), checksum).background   # the thread recovered


def test_store_batches_hashed_in_the_background_read_back_verified():
    with kvstore.local(dram="64MiB") as store:
        keys = [f"bg/{i}" for i in range(8)]
        batch = [v.tobytes() for v in values(8, MiB, 9)]
        assert store.batch_put(keys, batch) == [None] * 8
        assert store.batch_get(keys, verify=True) == batch
        store.put("bg/single", batch[0] * 5)           # one 5 MiB value: background too
        assert store.get("bg/single", verify=True) == batch[0] * 5


def test_a_forked_child_hashes_in_its_own_background_thread():
    import os

    assert hashing.start(values(4, MiB, 10), checksum).result()   # the parent's thread runs
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:    # NOTE: the child reports through the pipe and leaves at once
        try:
            batch = values(4, MiB, 11)
            sums = hashing.start(batch, checksum)
            ok = sums.background and sums.result() == [checksum(v) for v in batch]
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    import select
    import signal
    ready, _, _ = select.select([read], [], [], 60)
    if not ready:    # an inherited, threadless executor: the child waits forever
        os.kill(pid, signal.SIGKILL)
    got = os.read(read, 1) if ready else b""
    os.waitpid(pid, 0)
    assert got == b"1"
