"""The location cache end to end (client/location_cache.py, daemon/location_reads.py): a
repeated get over TCP skips the master, and in every window where the location it cached
stops being the key's current one (a remove, a replace, an eviction, a demotion, a removal
the daemon did not confirm, ``--commit-timeout 0``, a daemon restart, a master restart, an
expired read capability) the cached get returns the key's current bytes or KeyNotFoundError,
never other bytes. Bad CHECKED_READ frames are refused and nothing stored changes. A daemon
holds its location lease right after it starts or re-registers (its first beat follows at
once), not a heartbeat interval later.

Real master and daemon processes on loopback; clients with ``transport="tcp", home_reads=False`` (same-host
shm reads: tests/test_shm_location_cache.py). A second client in the same process does
the removes and puts (its own cache is separate)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from client_cluster import Cluster, payload
from conditions import master_hits, wait_for
from servers import ServerProcess
from stopped_process import stop_process

import kvstore
from kvstore.transport import checked_read, data_frames
from kvstore.transport.data_frames import Op, Status

KiB, MiB = 1 << 10, 1 << 20
TIMEOUT_S = 10.0


def _cache(store) -> dict:
    return store.stats()["location_cache"]


def _cached_get(store, key: str):
    """Get ``key`` until it is served from the cache (the daemon's lease starts with its
    first up-to-date heartbeat after it registered); return the bytes."""
    def served():
        hits = _cache(store)["hits"]
        value = store.get(key)
        return value if _cache(store)["hits"] > hits else None
    return wait_for(served, f"a cached get of {key!r}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


METRICS_PORT = _free_port()


def _daemon_metric(name: str, port: int = METRICS_PORT) -> float:
    """A counter of a daemon's /metrics (by default the module cluster's daemon)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                  timeout=TIMEOUT_S).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the daemon's metrics")


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=1, dram="64MiB",
                      master_args=("--heartbeat-interval", "200ms"),
                      daemon_args=("--metrics-host", "127.0.0.1",
                                   "--metrics-port", str(METRICS_PORT)))
    yield cluster
    cluster.close()


@pytest.fixture
def stores(cluster):
    reader = cluster.connect(transport="tcp", home_reads=False)
    writer = cluster.connect(transport="tcp", home_reads=False, location_cache_entries=0)
    yield reader, writer
    reader.close()
    writer.close()


def test_a_repeated_get_skips_the_master_and_returns_the_bytes(stores):
    reader, writer = stores
    value = payload(64 * KiB, seed=1)
    writer.put("lc/repeat", value)
    assert reader.get("lc/repeat") == value        # through the master: cached now
    assert _cached_get(reader, "lc/repeat") == value
    hits, cache = master_hits(reader), _cache(reader)
    served = _daemon_metric("kvstore_daemon_location_reads_total")
    out = bytearray(64 * KiB)
    assert reader.get_into("lc/repeat", out) == 64 * KiB and bytes(out) == value
    assert reader.batch_get(["lc/repeat", "lc/repeat"]) == [value, value]
    assert master_hits(reader) == hits            # no GetReplicas for any of them
    assert _cache(reader)["hits"] == cache["hits"] + 3
    assert _daemon_metric("kvstore_daemon_location_reads_total") == served + 3
    assert reader.stats()["transfers"]["tcp"]["num_reads"] >= 4


def test_keys_never_read_go_through_the_master(stores):
    reader, writer = stores
    writer.batch_put([f"lc/new/{i}" for i in range(3)],
                     [payload(4 * KiB, seed=10 + i) for i in range(3)])
    misses, hits = _cache(reader)["misses"], master_hits(reader)
    assert reader.batch_get([f"lc/new/{i}" for i in range(3)]) == \
        [payload(4 * KiB, seed=10 + i) for i in range(3)]
    assert _cache(reader)["misses"] == misses + 3
    assert master_hits(reader) == hits + 3
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("lc/new/absent")


def test_a_completed_remove_is_never_undone_by_the_cache(stores):
    reader, writer = stores
    writer.put("lc/removed", payload(8 * KiB, seed=2))
    _cached_get(reader, "lc/removed")
    assert writer.remove("lc/removed") is True     # confirmed by the daemon
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("lc/removed")
    assert _cache(reader)["refused"] >= 1


def test_a_replaced_key_reads_its_new_value(stores):
    reader, writer = stores
    old, new = payload(32 * KiB, seed=3), payload(32 * KiB, seed=4)
    writer.put("lc/replaced", old)
    assert _cached_get(reader, "lc/replaced") == old
    writer.remove("lc/replaced")
    writer.put("lc/replaced", new)                 # often the very range just freed
    assert reader.get("lc/replaced") == new
    assert _cached_get(reader, "lc/replaced") == new


def test_a_range_reused_by_another_key_is_never_read_as_the_old_key(stores):
    reader, writer = stores
    writer.put("lc/first", payload(16 * KiB, seed=5))
    _cached_get(reader, "lc/first")
    writer.remove("lc/first")
    writer.put("lc/second", payload(16 * KiB, seed=6))   # the allocator hands out the range
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("lc/first")
    assert reader.get("lc/second") == payload(16 * KiB, seed=6)


def test_bad_checked_reads_are_refused_and_nothing_stored_changes(cluster, stores):
    reader, writer = stores
    value = payload(4 * KiB, seed=7)
    writer.put("lc/raw", value)
    reader.get("lc/raw")
    location = reader._locations.lookup("lc/raw")
    target = location.target
    host, port = target.data_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.encode_hello(None))
        assert _reply(sock)[0] == Status.OK
        segment = target.segment_id.encode()
        for identity, length in [
                (checked_read.encode_identity("lc/raw", location.checksum ^ 1), 4 * KiB),
                (checked_read.encode_identity("lc/other", location.checksum), 4 * KiB),
                (checked_read.encode_identity("lc/raw", location.checksum), 4 * KiB + 1)]:
            sock.sendall(data_frames.encode_request(Op.CHECKED_READ, segment, 1,
                                                    target.offset, length, identity))
            status, message, num_bytes = _reply(sock)
            assert status == Status.LOCATION_STALE and num_bytes == 0, message
        # the connection stayed usable: the right identity is served (once leased)
        def served():
            sock.sendall(data_frames.encode_request(Op.CHECKED_READ, segment, 2,
                                                    target.offset, 4 * KiB, target.capability))
            status, _, num_bytes = _reply(sock)
            return data_frames.recv_exact(sock, num_bytes) if status == Status.OK else None
        assert wait_for(served, "a served CHECKED_READ") == value
        sock.sendall(data_frames.encode_request(Op.CHECKED_READ, segment, 3, target.offset,
                                                4 * KiB, b"\x05\x00ab"))   # cut short
        assert _reply(sock)[0] == Status.BAD_FRAME
        assert sock.recv(1) == b""                 # and the daemon closed the connection
    assert reader.get("lc/raw") == value and writer.get("lc/raw") == value


def _reply(sock) -> tuple[Status, str, int]:
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, _, msg_len, _, length = data_frames.REPLY.unpack(header)
    return Status(status), data_frames.recv_exact(sock, msg_len).decode(), length


def test_the_cache_is_bounded_and_can_be_turned_off(cluster):
    with cluster.connect(transport="tcp", home_reads=False, location_cache_entries=2) as store:
        store.batch_put([f"lc/lru/{i}" for i in range(4)],
                        [payload(KiB, seed=20 + i) for i in range(4)])
        store.batch_get([f"lc/lru/{i}" for i in range(4)])
        assert _cache(store)["entries"] == 2
        assert store._locations.lookup("lc/lru/0") is None       # least recently used
        assert store._locations.lookup("lc/lru/3") is not None
    with cluster.connect(transport="tcp", home_reads=False, location_cache_entries=0) as store:
        assert store.stats()["location_cache"] is None
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(kvstore.InvalidArgumentError, match="location_cache_entries"):
            cluster.connect(transport="tcp", home_reads=False, location_cache_entries=bad)


# ---- windows that need their own cluster --------------------------------------------------

#: A heartbeat interval no test here waits out, and a commit timeout whose lease (3/4 of it,
#: 45 s) outlasts every test: a lease held then comes from the beat right after registering.
SLOW_BEATS = ("--heartbeat-interval", "30s", "--node-ttl", "120s", "--commit-timeout", "60s")


def test_a_read_right_after_a_daemon_starts_is_served_by_the_daemon():
    metrics_port = _free_port()
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=SLOW_BEATS,
                      daemon_args=("--metrics-host", "127.0.0.1",
                                   "--metrics-port", str(metrics_port)))
    try:
        with cluster.connect(transport="tcp", home_reads=False) as reader, \
                cluster.connect(transport="tcp", home_reads=False, location_cache_entries=0) as writer:
            value = payload(64 * KiB, seed=70)
            writer.put("lc/first-second", value)
            assert reader.get("lc/first-second") == value     # through the master: cached
            hits = master_hits(reader)
            served = _daemon_metric("kvstore_daemon_location_reads_total", metrics_port)
            # the next beat is 30 s away: only the beat sent right after registering can
            # have started the lease
            assert reader.get("lc/first-second") == value
            assert master_hits(reader) == hits                # no GetReplicas
            assert _cache(reader)["hits"] == 1 and _cache(reader)["refused"] == 0
            assert _daemon_metric("kvstore_daemon_location_reads_total",
                                  metrics_port) == served + 1
    finally:
        cluster.close()


def test_a_re_registration_beats_at_once_and_holds_the_lease_again():
    """In-process ``MasterLink`` + ``LocationReads`` against a master process restarted on its
    port: the beat that finds the node forgotten re-registers (the lease ends), and the beat
    right after starts it again, not one 30 s interval later."""
    from kvstore.daemon.backends import ShmBackend
    from kvstore.daemon.location_reads import LocationReads
    from kvstore.daemon.master_link import MasterLink
    from kvstore.daemon.objects import ObjectTable
    from kvstore.rpc import grpc_client
    from kvstore.rpc.results import NodeSpec, SegmentSpec
    from kvstore.tiers import Tier

    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", *SLOW_BEATS])
    port, restarted = master.port, None
    dram = ShmBackend("rereg-dram", 1 << 20, name_prefix="kvstore-test-rereg")
    client = grpc_client(master.address)
    table = ObjectTable([dram])
    reads = LocationReads(table)
    link = MasterLink(client, NodeSpec("rereg-node", "rereg-host", "127.0.0.1:1",
                                       [SegmentSpec("rereg-dram", Tier.DRAM, dram.size_bytes,
                                                    dram.shm_name)], commit_push=True),
                      table, location_reads=reads)

    def lease_held() -> bool:       # an unknown key: STALE with the lease, OFF without
        return reads.refusal("absent", 0, "rereg-dram", 0, 1)[0] == Status.LOCATION_STALE

    try:
        link.register(timeout_s=TIMEOUT_S)
        assert not lease_held()            # registered, not yet beaten
        link.start_heartbeats()            # its first beat runs before it returns
        assert lease_held()
        master.kill()
        restarted = ServerProcess(["master", "--host", "127.0.0.1", "--port", str(port),
                                   *SLOW_BEATS])

        def re_registered() -> bool:
            if link.num_registrations == 1:
                link.wake()                # the loop's beat finds the node forgotten
            return link.num_registrations == 2
        wait_for(re_registered, "the re-registration", timeout_s=20.0)
        wait_for(lease_held, "the lease after the re-registration", timeout_s=20.0)
    finally:
        link.stop(unregister=False)
        client.close()
        dram.close()
        master.close()
        if restarted is not None:
            restarted.close()

def test_commit_timeout_0_turns_location_reads_off():
    cluster = Cluster(num_daemons=1, dram="16MiB",
                      master_args=("--heartbeat-interval", "200ms", "--commit-timeout", "0"))
    try:
        with cluster.connect(transport="tcp", home_reads=False) as reader, \
                cluster.connect(transport="tcp", home_reads=False, location_cache_entries=0) as writer:
            value = payload(8 * KiB, seed=30)
            writer.put("lc/nowait", value)
            for _ in range(3):
                assert reader.get("lc/nowait") == value
            cache = _cache(reader)
            assert cache["hits"] == 0 and cache["refused"] >= 1
            writer.remove("lc/nowait", force=True)   # returns before the daemon applies it
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("lc/nowait")
    finally:
        cluster.close()


def test_a_removal_the_daemon_did_not_confirm_is_not_undone_by_the_cache():
    cluster = Cluster(num_daemons=1, dram="16MiB",
                      master_args=("--heartbeat-interval", "200ms", "--commit-timeout", "1s",
                                   "--node-ttl", "60s"))
    try:
        with cluster.connect(transport="tcp", home_reads=False) as reader, \
                cluster.connect(transport="tcp", home_reads=False, location_cache_entries=0) as writer:
            writer.put("lc/unconfirmed", payload(8 * KiB, seed=31))
            _cached_get(reader, "lc/unconfirmed")
            pid = cluster.daemons[0].proc.pid
            stop_process(pid)                # it confirms nothing, and misses its beats
            try:
                with pytest.raises(kvstore.TransferError, match="retry"):
                    writer.remove("lc/unconfirmed", force=True)
            finally:
                os.kill(pid, signal.SIGCONT)
            # the daemon runs again; its lease ended while it was stopped, so whether or
            # not the master's push reached it yet, the cached location is refused
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("lc/unconfirmed")
    finally:
        cluster.close()


def test_evictions_and_demotions_never_return_wrong_bytes(tmp_path):
    cluster = Cluster(num_daemons=1, dram="8MiB",
                      daemon_args=("--ssd", f"{tmp_path}:6MiB"),
                      master_args=("--heartbeat-interval", "100ms", "--promote", "off"))
    try:
        with cluster.connect(transport="tcp", home_reads=False) as reader, \
                cluster.connect(transport="tcp", home_reads=False, location_cache_entries=0) as writer:
            keys = [f"lc/evict/{i}" for i in range(20)]
            for i, key in enumerate(keys):       # 20 MiB into 8 MiB DRAM + 6 MiB SSD
                writer.put(key, payload(MiB, seed=100 + i), tier="dram")
                reader.get(key)                  # cached (where still stored)
                for j, got in enumerate(reader.batch_get(keys[:i + 1])):
                    if isinstance(got, kvstore.KeyNotFoundError):
                        continue                 # evicted
                    assert got == payload(MiB, seed=100 + j), keys[j]
            present = writer.batch_exists(keys)
            assert not all(present) and any(present)
            for key, exists, got in zip(keys, present, reader.batch_get(keys)):
                if exists:
                    assert got == payload(MiB, seed=100 + keys.index(key))
                else:
                    assert isinstance(got, kvstore.KeyNotFoundError), key
            assert _cache(reader)["refused"] >= 1    # moved or evicted under the cache
    finally:
        cluster.close()


def test_a_restarted_daemon_never_serves_the_old_location():
    scratch = Cluster(num_daemons=1, dram="16MiB",
                      master_args=("--heartbeat-interval", "200ms", "--node-ttl", "2s"))
    try:
        with scratch.connect(transport="tcp", home_reads=False) as reader:
            reader.put("lc/restart", payload(8 * KiB, seed=40))
            _cached_get(reader, "lc/restart")
            scratch.kill_daemon(0)
            with pytest.raises((kvstore.KeyNotFoundError, kvstore.TransferError)):
                reader.get("lc/restart")
            scratch.daemons[0] = ServerProcess(
                ["daemon", "--master", scratch.address, "--host", "127.0.0.1", "--port",
                 "0", "--dram", "16MiB"])
            wait_for(lambda: not reader.exists("lc/restart"), "the old node to be dropped")
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("lc/restart")
    finally:
        scratch.close()


def test_after_a_master_restart_the_cache_follows_the_new_master():
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                            "--heartbeat-interval", "200ms"])
    port = master.port
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", "16MiB"])
    restarted = None
    try:
        value = payload(8 * KiB, seed=50)
        # NOTE: gRPC: the restarted master's fast path listens on another port
        with kvstore.connect(master.address, transport="tcp", home_reads=False, metadata="grpc") as store:
            wait_for(lambda: store.stats()["master"]["num_nodes"] == 1, "the daemon")
            store.put("lc/failover", value)
            store.put("lc/failover-removed", payload(8 * KiB, seed=51))
            _cached_get(store, "lc/failover")
            _cached_get(store, "lc/failover-removed")
            master.kill()
            restarted = ServerProcess(["master", "--host", "127.0.0.1", "--port", str(port),
                                       "--heartbeat-interval", "200ms"])
            wait_for(lambda: _exists(store, "lc/failover-removed"), "adoption by the new master")
            # removed through the new master (the daemon confirms it): never served again
            with kvstore.connect(restarted.address, transport="tcp", home_reads=False, metadata="grpc",
                                 location_cache_entries=0) as writer:
                assert writer.remove("lc/failover-removed", force=True) is True
            with pytest.raises(kvstore.KeyNotFoundError):
                store.get("lc/failover-removed")
            assert _cached_get(store, "lc/failover") == value   # a new lease, same object
    finally:
        daemon.close()
        master.close()
        if restarted is not None:
            restarted.close()


def _exists(store, key: str) -> bool:
    try:
        return store.exists(key)
    except kvstore.MasterUnavailableError:
        return False             # the new master is not up yet


def test_an_expired_read_capability_falls_back_to_the_master():
    cluster = Cluster(num_daemons=1, dram="16MiB", token="lc-secret",
                      master_args=("--heartbeat-interval", "200ms"))
    try:
        with cluster.connect(transport="tcp", home_reads=False, lease_ttl_s=0.2) as reader:
            value = payload(8 * KiB, seed=60)
            reader.put("lc/cap", value)
            reader.get("lc/cap")
            capability = reader._locations.lookup("lc/cap").target.capability
            assert len(capability) > len(checked_read.encode_identity("lc/cap", 0))
            time.sleep(1.0)            # 5x the capability's 0.2 s lifetime
            refused = _cache(reader)["refused"]
            assert reader.get("lc/cap") == value        # refused, then the master's way
            assert _cache(reader)["refused"] == refused + 1
            assert _cached_get(reader, "lc/cap") == value   # with the fresh capability
    finally:
        cluster.close()
