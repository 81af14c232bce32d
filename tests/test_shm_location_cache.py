"""Cached same-host gets (client/shm_locations.py, daemon/shm_locations.py): a repeated
get of a key this client read from a shm segment is copied from the mapping with no master
call, and in every window where the cached range stops being the key's current value (a
remove confirmed or not, ``--commit-timeout 0``, a replace, a range reused by another key,
evictions and demotions, a daemon killed and restarted, a master restart) the get returns
the key's current bytes or KeyNotFoundError, never other bytes.

Real master and daemon processes on loopback; readers with the default transports (shm
first), a second client (its cache off) does the removes and puts. The table's own rules
(a slot changed, an epoch bumped, a lease ended: refused) are checked on a real table with
the real read_ranges at the end."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from client_cluster import Cluster, payload
from conditions import master_hits, wait_for
from servers import ServerProcess
from stopped_process import stop_process

import kvstore
from kvstore import _copy_hash
from kvstore import _loc_table as lt
from kvstore.client.shm_locations import CachedShm

KiB, MiB = 1 << 10, 1 << 20


def _cache(store) -> dict:
    return store.stats()["location_cache"]


def _shm_cached_get(store, key: str) -> bytes:
    """Get ``key`` until a get is served from the shm cache; return its bytes."""
    def served():
        hits = _cache(store)["shm_hits"]
        value = store.get(key)
        return value if _cache(store)["shm_hits"] > hits else None
    return wait_for(served, f"a cached shm get of {key!r}")


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=1, dram="64MiB",
                      master_args=("--heartbeat-interval", "200ms"))
    yield cluster
    cluster.close()


@pytest.fixture
def stores(cluster):
    reader = cluster.connect()
    writer = cluster.connect(location_cache_entries=0)
    yield reader, writer
    reader.close()
    writer.close()


def test_repeated_same_host_gets_skip_the_master(stores):
    reader, writer = stores
    value = payload(256 * KiB, seed=1)
    writer.put("sl/repeat", value)
    out = bytearray(256 * KiB)
    assert reader.get_into("sl/repeat", out) == 256 * KiB and bytes(out) == value  # master
    # NOTE: cached once the daemon's table holds the put (a same-host put's commit ring is
    # drained in the background), so a read right after the put may not be
    assert _shm_cached_get(reader, "sl/repeat") == value
    assert isinstance(reader._locations.lookup("sl/repeat"), CachedShm)
    hits, cache = master_hits(reader), _cache(reader)
    out[:] = bytes(len(out))
    assert reader.get_into("sl/repeat", out) == 256 * KiB and bytes(out) == value
    big = bytearray(300 * KiB)                       # a larger out: the object's bytes first
    assert reader.batch_get_into(["sl/repeat"], [big]) == [256 * KiB]
    assert bytes(big[:256 * KiB]) == value
    assert reader.get("sl/repeat") == value
    assert master_hits(reader) == hits              # no GetReplicas for any of them
    assert _cache(reader)["shm_hits"] == cache["shm_hits"] + 3


def test_a_batch_of_small_objects_is_served_from_the_cache(stores):
    reader, writer = stores
    keys = [f"sl/small/{i}" for i in range(300)]
    values = [payload(64, seed=1000 + i) for i in range(300)]
    writer.batch_put(keys, values)
    misses = _cache(reader)["misses"]

    def cached() -> int:
        outs = [bytearray(64) for _ in keys]
        assert reader.batch_get_into(keys, outs) == [64] * 300
        assert [bytes(o) for o in outs] == values
        num = sum(isinstance(reader._locations.lookup(k), CachedShm) for k in keys)
        # NOTE: a few offsets may share a table slot: those stay uncached
        return num if num >= 250 else 0
    entries = wait_for(cached, "the batch's keys cached")
    assert _cache(reader)["misses"] >= misses + 300      # the first batch: the master
    hits, shm_hits = master_hits(reader), _cache(reader)["shm_hits"]
    outs = [bytearray(64) for _ in keys]
    assert reader.batch_get_into(keys, outs) == [64] * 300
    assert [bytes(o) for o in outs] == values
    assert _cache(reader)["shm_hits"] == shm_hits + entries
    assert master_hits(reader) == hits + 300 - entries


def test_first_reads_go_through_the_master(stores):
    reader, writer = stores
    writer.batch_put(["sl/new/0", "sl/new/1"], [payload(4 * KiB, seed=2), b""])
    hits = master_hits(reader)
    assert reader.batch_get(["sl/new/0", "sl/new/1"]) == [payload(4 * KiB, seed=2), b""]
    assert master_hits(reader) == hits + 2
    assert reader._locations.lookup("sl/new/1") is None       # empty values: not cached
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("sl/new/absent")


def test_a_completed_remove_is_never_undone_by_the_cache(stores):
    reader, writer = stores
    writer.put("sl/removed", payload(8 * KiB, seed=3))
    _shm_cached_get(reader, "sl/removed")
    assert writer.remove("sl/removed") is True     # confirmed by the daemon
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("sl/removed")
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get_into("sl/removed", bytearray(8 * KiB))
    assert _cache(reader)["refused"] >= 1


def test_a_replaced_key_reads_its_new_value(stores):
    reader, writer = stores
    old, new = payload(32 * KiB, seed=4), payload(32 * KiB, seed=5)
    writer.put("sl/replaced", old)
    assert _shm_cached_get(reader, "sl/replaced") == old
    writer.remove("sl/replaced")
    writer.put("sl/replaced", new)                 # often the very range just freed
    out = bytearray(32 * KiB)
    assert reader.get_into("sl/replaced", out) == 32 * KiB and bytes(out) == new
    assert _shm_cached_get(reader, "sl/replaced") == new


def test_a_range_reused_by_another_key_is_never_read_as_the_old_key(stores):
    reader, writer = stores
    writer.put("sl/first", payload(16 * KiB, seed=6))
    _shm_cached_get(reader, "sl/first")
    first = reader._locations.lookup("sl/first")
    writer.remove("sl/first")
    writer.put("sl/second", payload(16 * KiB, seed=6))   # the same bytes, maybe the range
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("sl/first")
    assert _shm_cached_get(reader, "sl/second") == payload(16 * KiB, seed=6)
    second = reader._locations.lookup("sl/second")
    assert isinstance(second, CachedShm) and isinstance(first, CachedShm)


def test_a_bad_out_gets_the_master_paths_error_and_nothing_stored_changes(stores):
    reader, writer = stores
    value = payload(8 * KiB, seed=7)
    writer.put("sl/small-out", value)
    _shm_cached_get(reader, "sl/small-out")
    with pytest.raises(kvstore.InvalidArgumentError):
        reader.get_into("sl/small-out", bytearray(8 * KiB - 1))
    with pytest.raises(kvstore.InvalidArgumentError):
        reader.get_into("sl/small-out", bytes(8 * KiB))          # read-only
    assert reader.get("sl/small-out") == value and writer.get("sl/small-out") == value


# ---- windows that need their own cluster --------------------------------------------------

def test_commit_timeout_0_turns_cached_shm_reads_off():
    cluster = Cluster(num_daemons=1, dram="16MiB",
                      master_args=("--heartbeat-interval", "200ms", "--commit-timeout", "0"))
    try:
        with cluster.connect() as reader, cluster.connect(location_cache_entries=0) as writer:
            value = payload(8 * KiB, seed=30)
            writer.put("sl/nowait", value)
            for _ in range(3):
                assert reader.get("sl/nowait") == value
            assert _cache(reader)["shm_hits"] == 0
            assert reader._locations.lookup("sl/nowait") is None   # no lease: not cached
            writer.remove("sl/nowait", force=True)   # returns before the daemon applies it
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("sl/nowait")
    finally:
        cluster.close()


def test_a_removal_the_daemon_did_not_confirm_is_not_undone_by_the_cache():
    cluster = Cluster(num_daemons=1, dram="16MiB",
                      master_args=("--heartbeat-interval", "200ms", "--commit-timeout", "1s",
                                   "--node-ttl", "60s"))
    try:
        with cluster.connect() as reader, cluster.connect(location_cache_entries=0) as writer:
            writer.put("sl/unconfirmed", payload(8 * KiB, seed=31))
            _shm_cached_get(reader, "sl/unconfirmed")
            pid = cluster.daemons[0].proc.pid
            stop_process(pid)                # it confirms nothing, renews nothing
            try:
                with pytest.raises(kvstore.TransferError, match="retry"):
                    writer.remove("sl/unconfirmed", force=True)
                # still stopped: its table still lists the object, its lease has ended
                with pytest.raises(kvstore.KeyNotFoundError):
                    reader.get("sl/unconfirmed")
            finally:
                os.kill(pid, signal.SIGCONT)
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("sl/unconfirmed")
    finally:
        cluster.close()


def test_evictions_and_demotions_never_return_wrong_bytes(tmp_path):
    cluster = Cluster(num_daemons=1, dram="8MiB",
                      daemon_args=("--ssd", f"{tmp_path}:6MiB"),
                      master_args=("--heartbeat-interval", "100ms", "--promote", "off"))
    try:
        with cluster.connect() as reader, cluster.connect(location_cache_entries=0) as writer:
            keys = [f"sl/evict/{i}" for i in range(20)]
            for i, key in enumerate(keys):       # 20 MiB into 8 MiB DRAM + 6 MiB SSD
                writer.put(key, payload(MiB, seed=100 + i), tier="dram")
                reader.get(key)                  # cached (where still in DRAM)
                outs = [bytearray(MiB) for _ in range(i + 1)]
                for j, got in enumerate(reader.batch_get_into(keys[:i + 1], outs)):
                    if isinstance(got, kvstore.KeyNotFoundError):
                        continue                 # evicted
                    assert got == MiB and bytes(outs[j]) == payload(MiB, seed=100 + j), j
            present = writer.batch_exists(keys)
            assert not all(present) and any(present)
            for key, exists, got in zip(keys, present, reader.batch_get(keys)):
                if exists:
                    assert got == payload(MiB, seed=100 + keys.index(key))
                else:
                    assert isinstance(got, kvstore.KeyNotFoundError), key
            assert _cache(reader)["shm_hits"] >= 1
            assert _cache(reader)["refused"] >= 1    # moved or evicted under the cache
    finally:
        cluster.close()


def test_a_daemon_killed_and_restarted_never_serves_the_old_location():
    """SIGKILL (no close: its table and segment stay linked, no reaper) and a new daemon of
    the same node id: its registration drops the lost key at once, well within the old
    table's 45 s lease; the new daemon retired that lease before registering."""
    master_args = ("--heartbeat-interval", "200ms", "--commit-timeout", "60s")
    daemon_args = ("--node-id", "sl-restart", "--no-reap-orphans")
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=master_args,
                      daemon_args=daemon_args)
    names = []
    try:
        with cluster.connect() as reader:
            reader.put("sl/restart", payload(8 * KiB, seed=40))
            _shm_cached_get(reader, "sl/restart")
            entry = reader._locations.lookup("sl/restart")
            names = [entry.segment.shm_name, lt.table_name(entry.segment.shm_name)]
            cluster.daemons[0].kill()
            cluster.daemons[0] = ServerProcess(
                ["daemon", "--master", cluster.address, "--host", "127.0.0.1", "--port",
                 "0", "--dram", "16MiB", *daemon_args])
            wait_for(lambda: not reader.exists("sl/restart"), "the lost key to be dropped")
            # NOTE: another daemon's reaper on this machine may have unlinked the dead
            # one's segment meanwhile (the per-call link check then refuses it too); where
            # it did not, the new daemon zeroed the old table's lease
            old_table = reader._locations.shm_tables._by_segment[names[0]]
            assert (not os.path.exists("/dev/shm" + names[0])
                    or int(old_table.array[lt.WORD_LEASE]) == 0)
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("sl/restart")
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get_into("sl/restart", bytearray(8 * KiB))
    finally:
        cluster.close()
        for name in names:
            try:
                os.unlink("/dev/shm" + name)
            except FileNotFoundError:
                pass


def test_after_a_master_restart_the_cache_follows_the_new_master():
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0",
                            "--heartbeat-interval", "200ms"])
    port = master.port
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", "16MiB"])
    restarted = None
    try:
        value = payload(8 * KiB, seed=50)
        with kvstore.connect(master.address, metadata="grpc") as store:
            wait_for(lambda: store.stats()["master"]["num_nodes"] == 1, "the daemon")
            store.put("sl/failover", value)
            store.put("sl/failover-removed", payload(8 * KiB, seed=51))
            _shm_cached_get(store, "sl/failover")
            _shm_cached_get(store, "sl/failover-removed")
            master.kill()
            restarted = ServerProcess(["master", "--host", "127.0.0.1", "--port", str(port),
                                       "--heartbeat-interval", "200ms"])
            wait_for(lambda: _exists(store, "sl/failover-removed"), "adoption by the new master")
            with kvstore.connect(restarted.address, metadata="grpc",
                                 location_cache_entries=0) as writer:
                assert writer.remove("sl/failover-removed", force=True) is True
            with pytest.raises(kvstore.KeyNotFoundError):
                store.get("sl/failover-removed")
            assert _shm_cached_get(store, "sl/failover") == value   # a new lease, same object
    finally:
        daemon.close()
        master.close()
        if restarted is not None:
            restarted.close()


def _exists(store, key: str) -> bool:
    try:
        return store.exists(key)
    except kvstore.KVStoreError:
        return False


# ---- the table's rules, on a real table and the real read_ranges -------------------------

@pytest.fixture
def table():
    from kvstore._posix_shm import create_shm, unique_shm_name
    from kvstore.daemon.shm_locations import ShmLocationTable

    segment = create_shm(unique_shm_name("kvstore-test-sl"), MiB, prefault=False)
    locations = ShmLocationTable(segment.name, MiB)
    array = np.frombuffer(segment.view, dtype=np.uint8)
    yield segment, locations, array
    locations.close()
    del array
    segment.unlink()


def _guarded_read(segment, array, table_address, entry, dst):
    """read_ranges of one cached entry, as client/shm_locations.py calls it."""
    return _copy_hash.read_ranges(
        [dst], [entry[1]], [entry[2]], [0], [1], [0], [entry[0]],
        [int(array.ctypes.data)], [MiB], True, 0, [None], 2 * MiB, None,
        [table_address], [entry[3]], [entry[4]])


def test_the_table_refuses_a_changed_slot_a_new_epoch_and_an_ended_lease(table):
    from kvstore.client.shm_locations import ShmTables
    from kvstore.transport.base import Target

    segment, locations, array = table
    value = payload(4 * KiB, seed=60)
    segment.view[8192:8192 + len(value)] = value
    digest = _copy_hash.copy_hash(bytearray(len(value)), value)
    locations.stored("k", 8192, len(value), digest)
    tables = ShmTables()
    table = tables.table(segment.name)
    address = table.address if table is not None else 0
    assert address
    from kvstore.client.shm_locations import entry_for
    target = Target("n", "h", "a", "dram0", segment.name, 8192, len(value))
    assert entry_for(tables, "k", target, len(value), digest) is None   # no lease yet
    locations.set_lease(time.monotonic_ns() + 60 * 10**9)
    assert entry_for(tables, "other", target, len(value), digest) is None   # another key
    assert entry_for(tables, "k", target, len(value), digest ^ 1) is None   # another value
    cached = entry_for(tables, "k", target, len(value), digest)
    assert cached is not None
    entry = (8192, len(value), digest, cached.seq, cached.epoch)
    dst = bytearray(len(value))
    assert _guarded_read(segment, array, address, entry, dst) == ([len(value)], [])
    assert bytes(dst) == value
    segment.view[8192] ^= 0xFF                          # the range rewritten: digest differs
    assert _guarded_read(segment, array, address, entry, bytearray(len(value)))[1] == [0]
    segment.view[8192] ^= 0xFF
    locations.set_lease(0)                              # lease ended
    assert _guarded_read(segment, array, address, entry, bytearray(len(value)))[1] == [0]
    locations.set_lease(time.monotonic_ns() + 60 * 10**9)
    assert _guarded_read(segment, array, address, entry, bytearray(len(value)))[1] == []
    locations.reset()                                   # a full resync: a new epoch
    assert _guarded_read(segment, array, address, entry, bytearray(len(value)))[1] == [0]
    locations.stored("k", 8192, len(value), digest)     # re-added: cacheable again
    cached = entry_for(tables, "k", target, len(value), digest)
    entry = (8192, len(value), digest, cached.seq, cached.epoch)
    assert _guarded_read(segment, array, address, entry, bytearray(len(value)))[1] == []
    locations.freed(8192)                               # removed: the slot changed
    assert _guarded_read(segment, array, address, entry, bytearray(len(value)))[1] == [0]
    assert entry_for(tables, "k", target, len(value), digest) is None
    locations.close()                                   # the daemon stopped
    assert _guarded_read(segment, array, address, entry, bytearray(len(value)))[1] == [0]


def test_malformed_guard_lists_raise_and_copy_nothing(table):
    segment, locations, array = table
    dst = bytearray(8)
    args = ([dst], [8], [0], [0], [1], [0], [0], [int(array.ctypes.data)], [MiB], True, 0,
            [None], 2 * MiB, None)
    with pytest.raises(TypeError):
        _copy_hash.read_ranges(*args, [0], [0])                   # 16 arguments
    with pytest.raises(ValueError, match="guard_seqs"):
        _copy_hash.read_ranges(*args, [0], [0, 0], [0])
    with pytest.raises(ValueError, match="guard_tables"):
        _copy_hash.read_ranges(*args, [], [0], [0])
    assert _copy_hash.read_ranges(*args, [0], [0], [0]) == ([None], [0])   # no table: slow
    assert dst == bytearray(8)
    with pytest.raises(ValueError, match="no table"):
        _copy_hash.loc_read(0, 0)


def test_a_table_that_is_not_one_is_never_used(tmp_path):
    from kvstore._posix_shm import create_shm, unique_shm_name
    from kvstore.client.shm_locations import ShmTables

    segment = create_shm(unique_shm_name("kvstore-test-sl"), MiB, prefault=False)
    bogus = create_shm(lt.table_name(segment.name), 4096, prefault=False)   # no magic
    try:
        tables = ShmTables()
        assert tables.table(segment.name) is None
        assert tables.table("/not-a-kvstore-name") is None
    finally:
        bogus.unlink()
        bogus.close()
        segment.unlink()
        segment.close()


def test_a_dead_daemons_tables_lose_their_lease_at_the_next_start():
    """retire_dead_tables on a table named for a process that has exited (a prefix no
    reaper of another test matches, so nothing unlinks it meanwhile)."""
    import subprocess
    import sys

    from kvstore._posix_shm import host_tag
    from kvstore.daemon.shm_locations import ShmLocationTable, retire_dead_tables

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    segment_name = f"/sltest-{host_tag()}-{dead.pid}-{os.urandom(8).hex()}"
    live_name = f"/sltest-{host_tag()}-{os.getpid()}-{os.urandom(8).hex()}"
    tables = [ShmLocationTable(segment_name, MiB), ShmLocationTable(live_name, MiB)]
    try:
        for table in tables:
            table.set_lease(time.monotonic_ns() + 60 * 10**9)
        assert lt.table_name(segment_name)[1:] in retire_dead_tables()
        dead_words = np.frombuffer(tables[0]._shm.view, dtype=np.uint64)
        live_words = np.frombuffer(tables[1]._shm.view, dtype=np.uint64)
        assert int(dead_words[lt.WORD_LEASE]) == 0          # the dead creator's: retired
        assert int(live_words[lt.WORD_LEASE]) > time.monotonic_ns()   # ours: untouched
        del dead_words, live_words
    finally:
        for table in tables:
            table.close()


def test_a_daemon_stopped_cleanly_ends_its_tables_lease_and_is_never_served():
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=("--heartbeat-interval",
                                                                 "200ms"))
    try:
        with cluster.connect() as reader:
            reader.put("sl/stopped", payload(8 * KiB, seed=80))
            _shm_cached_get(reader, "sl/stopped")
            name = reader._locations.lookup("sl/stopped").segment.shm_name
            table = reader._locations.shm_tables._by_segment[name]
            assert int(table.array[lt.WORD_LEASE]) > time.monotonic_ns()
            cluster.daemons[0].close()              # SIGTERM: unregisters, then closes
            assert int(table.array[lt.WORD_LEASE]) == 0   # the mapping this client keeps
            with pytest.raises(kvstore.KVStoreError):
                reader.get_into("sl/stopped", bytearray(8 * KiB))
    finally:
        cluster.close()
