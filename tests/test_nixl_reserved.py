"""Puts over the nixl transport into space reserved ahead (client/reservations.py): no
PutStart, one write check per batch for the whole reserved run of ranges
(``nixl_checks.coalesce``), the values hashed while the check and the NIXL copy run.

Real processes: a master and one ``kvstore daemon --nixl`` on loopback, real clients over
``transport="nixl"``; the pure ``coalesce`` and ``hashing.start`` rules are checked directly.
"""

from __future__ import annotations

import time

import pytest
from client_cluster import payload
from crash_servers import daemon_process, master_process

import kvstore
from kvstore.client import hashing
from kvstore.client.checksum import checksum
from kvstore.client.reservations import ReservedSpace
from kvstore.transport import nixl_installed
from kvstore.transport.base import Target
from kvstore.transport.nixl_checks import WriteChecks, coalesce

MiB = 1 << 20
SLOW_BEAT = ("--heartbeat-interval", "1s", "--node-ttl", "60s")
needs_nixl = pytest.mark.skipif(not nixl_installed(), reason="NIXL is not installed "
                                "(make test installs it: requirements-nixl.txt)")


def _target(offset: int, length: int, capability: bytes, segment_id: str = "s0") -> Target:
    return Target("n0", "h0", "127.0.0.1:1", segment_id, "", offset, length, capability)


def test_coalesce_merges_ranges_sharing_a_capability_into_one_covering_range():
    targets = [_target(0, 100, b"R"), _target(128, 64, b"R"), _target(4096, 10, b"A"),
               _target(192, 1000, b"R"), _target(5000, 5, b""), _target(6000, 5, b""),
               _target(0, 50, b"R", segment_id="s1")]
    checked, members = coalesce(targets)
    assert members == [[0, 1, 3], [2], [4], [5], [6]]
    # the reservation's three ranges: one range from the lowest offset to the highest end
    assert (checked[0].offset, checked[0].length, checked[0].capability) == (0, 1192, b"R")
    assert checked[1] == targets[2]
    # empty capabilities (a node without a secret) are never merged
    assert checked[2:4] == [targets[4], targets[5]]
    # the same capability bytes on another segment are another range
    assert checked[4] == targets[6]


def test_coalesce_keeps_distinct_capabilities_as_they_are():
    targets = [_target(i * 64, 64, bytes([i + 1])) for i in range(5)]
    checked, members = coalesce(targets)
    assert checked == targets and members == [[i] for i in range(5)]
    assert coalesce([]) == ([], [])


def test_hash_start_goes_to_the_background_from_min_bytes():
    one = memoryview(payload(MiB, seed=3))
    default = hashing.start([one], checksum)
    assert not default.background, "one 1 MiB value stays in the caller's thread by default"
    early = hashing.start([one], checksum, min_bytes=MiB)
    assert early.background
    assert early.result() == default.result() == [checksum(one)]
    small = memoryview(b"x" * 1000)
    assert not hashing.start([small], checksum, min_bytes=1).background, \
        "values under 1 MiB are never hashed on the thread"


class _Recording:
    """The real WriteChecks, recording the ranges each send asked about."""

    def __init__(self, checks: WriteChecks):
        self._checks = checks
        self.sent: list[list[Target]] = []

    def send(self, *args, **kwargs):
        pending = self._checks.send(*args, **kwargs)
        self.sent.append(list(pending.checked))
        return pending

    def receive(self, pending):
        return self._checks.receive(pending)

    def close(self):
        self._checks.close()


def _nixl(store):
    return next(t for t in store._transfers.transports if t.name == "nixl")


@pytest.fixture(params=["10s"])
def cluster(request):
    """A master (``--reservation-ttl``: the param) and one ``--nixl`` daemon."""
    master = master_process(*SLOW_BEAT, "--reservation-ttl", request.param)
    try:
        daemon = daemon_process(master, "--dram", "256MiB", "--nixl")
    except BaseException:
        master.close()
        raise
    try:
        yield master
    finally:
        daemon.close()
        master.close()


@needs_nixl
def test_a_reserved_batch_over_nixl_is_one_check_and_reads_back(cluster):
    with kvstore.connect(cluster.address, transport="nixl", reserve_bytes=64 * MiB) as store:
        recording = _Recording(_nixl(store)._checks)
        _nixl(store)._checks = recording
        values = {f"k{i}": payload(MiB if i % 2 else 1000 + 7 * i, seed=i) for i in range(32)}
        assert store.batch_put(list(values), list(values.values())) == [None] * 32
        assert store.put("single", payload(MiB, seed=99)) is None
        assert store._reserved.num_reserved == 1, "every put fitted one reservation"
        grant = store._reserved._grant
        assert len(recording.sent) == 2
        (batch_check,), (single_check,) = recording.sent
        # one range covering the batch's 32, inside the reservation, with its capability
        whole = grant.target
        assert batch_check.capability == whole.capability
        assert whole.offset <= batch_check.offset
        assert batch_check.offset + batch_check.length <= whole.offset + whole.length
        assert batch_check.length >= sum(len(v) for v in values.values())
        assert single_check.length == MiB
        for key, value in values.items():
            assert store.get(key) == value, key
        assert store.get("single") == payload(MiB, seed=99)
        # the stored checksums are the values' own (a reader verifies them)
        (replicas,) = store._master.get_replicas(["single"])
        assert replicas.checksum == checksum(memoryview(payload(MiB, seed=99)))


@needs_nixl
@pytest.mark.parametrize("cluster", ["2s"], indirect=True)
def test_a_reserved_nixl_batch_past_the_ttl_is_refused_whole_and_changes_nothing(cluster):
    """A writer whose clock still calls its reservation usable (frozen) after the master's
    TTL, once another writer holds that space: the one covering check carries the expired
    capability, the daemon refuses it, every key of the batch fails clearly, no byte lands
    (the other writer's objects read back whole) and nothing is stored under the keys."""
    with kvstore.connect(cluster.address, transport="nixl", reserve_bytes=8 * MiB) as store, \
            kvstore.connect(cluster.address, transport="nixl") as other:
        frozen = [0.0]
        store._reserved = ReservedSpace(8 * MiB, store.client_id, store.host_id,
                                        clock=lambda: frozen[0])
        assert store.put("before", payload(2000, seed=1)) is None
        deadline = time.monotonic() + 30
        while sum(node.reserved_bytes for node in store._master.list_nodes()):
            assert time.monotonic() < deadline, "the reservation never expired"
            time.sleep(0.05)   # the master's TTL runs on its own clock
        others = {f"other/{i}": payload(64 << 10, seed=50 + i) for i in range(40)}
        assert other.batch_put(list(others), list(others.values())) == [None] * 40
        late = {f"late/{i}": payload(256 << 10, seed=80 + i) for i in range(8)}
        results = store.batch_put(list(late), list(late.values()))
        assert all(isinstance(r, kvstore.TransferError) and "expired" in str(r)
                   for r in results), results
        assert [store.exists(key) for key in late] == [False] * 8
        for key, value in others.items():
            assert other.get(key) == value, key
        assert store.get("before") == payload(2000, seed=1)


def _record_reserved_end_caps(store) -> list[int]:
    """Wrap the store's real reserved PutEnd: the number of commit capabilities each reply
    carried (0: the master pushed the commits itself)."""
    counts: list[int] = []
    inner = store._master.put_end_reserved_committing

    def recorded(*args, **kwargs):
        ended, caps = inner(*args, **kwargs)
        counts.append(len(caps))
        return ended, caps
    store._master.put_end_reserved_committing = recorded
    return counts


@needs_nixl
def test_a_reserved_nixl_put_commits_on_the_daemon_itself(cluster):
    """The reserved PutEnd asks for the commit capabilities (no master push: the writer's
    CLIENT_COMMIT frames commit the keys on the daemon before the put returns, or the put
    fails); another client reads every key at once."""
    with kvstore.connect(cluster.address, transport="nixl", reserve_bytes=16 * MiB) as store, \
            kvstore.connect(cluster.address, transport="nixl") as reader:
        counts = _record_reserved_end_caps(store)
        values = {f"c{i}": payload(100_000 + i, seed=200 + i) for i in range(6)}
        assert store.batch_put(list(values), list(values.values())) == [None] * 6
        assert counts == [6], "the master sent one capability per key, pushed nothing"
        for key, value in values.items():
            assert reader.get(key) == value, key


@needs_nixl
def test_without_client_commits_a_reserved_nixl_put_waits_for_the_masters_push():
    master = master_process(*SLOW_BEAT, "--no-client-commit")
    try:
        daemon = daemon_process(master, "--dram", "64MiB", "--nixl")
        try:
            with kvstore.connect(master.address, transport="nixl",
                                 reserve_bytes=8 * MiB) as store:
                counts = _record_reserved_end_caps(store)
                assert store.put("pushed", payload(300_000, seed=5)) is None
                assert counts == [0]
                assert store._reserved.num_reserved == 1
                assert store.get("pushed") == payload(300_000, seed=5)
        finally:
            daemon.close()
    finally:
        master.close()
