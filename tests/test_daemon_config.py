"""DaemonConfig validation, the object table's change-set rules, shm segment creation, and the
daemon's import discipline (no torch unless --gpu)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore import ConfigError
from kvstore.daemon.config import DaemonConfig, split_tier_spec
from kvstore.daemon.objects import ObjectTable
from kvstore.daemon.server import run_in_thread
from kvstore._posix_shm import create_shm, open_shm, unique_shm_name
from kvstore.v1 import master_pb2


@pytest.mark.parametrize("kwargs, message", [
    ({"host": ""}, "host"),
    ({"port": 70000}, "port"),
    ({"port": -1}, "port"),
    ({"metrics_port": 65536}, "metrics_port"),
    ({"dram_bytes": "lots"}, "invalid size"),
    ({"dram_bytes": 0}, "at least one tier"),
    ({"ssd_dir": "/tmp/x"}, "ssd needs both"),
    ({"ssd_bytes": 1024}, "ssd needs both"),
    ({"gpu_device": "cuda:0"}, "gpu needs both"),
    ({"node_id": "bad id/with slash"}, "node_id"),
    ({"node_id": ""}, "node_id"),
    ({"token": "x" * 2000}, "token"),
    ({"master_addr": "no-port"}, "HOST:PORT"),
    ({"rpc_timeout_s": 0}, "rpc_timeout_s"),
    ({"register_timeout_s": -1}, "register_timeout_s"),
    ({"max_connections": 0}, "max_connections"),
])
def test_invalid_config_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DaemonConfig(**kwargs)


def test_config_parses_sizes_and_generates_distinct_node_ids():
    a, b = DaemonConfig(dram_bytes="4MiB"), DaemonConfig()
    assert a.dram_bytes == 4 * 1024**2
    assert a.node_id != b.node_id
    with pytest.raises(AttributeError):
        a.port = 5  # frozen


def test_split_tier_spec_takes_the_size_after_the_last_colon():
    assert split_tier_spec("/data/kv:1GiB", "--ssd") == ("/data/kv", 1024**3)
    assert split_tier_spec("cuda:1:2GiB", "--gpu") == ("cuda:1", 2 * 1024**3)
    for bad in ("1GiB", ":1GiB", "/data/kv:big"):
        with pytest.raises(ConfigError):
            split_tier_spec(bad, "--ssd")


def heartbeat(seq, added=(), removed=(), full=False):
    inventory = master_pb2.Inventory(
        keys=[k for k, _ in added], segment_ids=["dram0"] * len(added),
        offsets=[o for _, o in added], lengths=[10] * len(added),
        checksums=[7] * len(added), codecs=[master_pb2.CODEC_RAW] * len(added))
    return master_pb2.HeartbeatResponse(known=True, seq=seq, full_resync=full, added=inventory,
                                        removed_keys=list(removed))


def test_object_table_applies_change_sets_in_sequence():
    table = ObjectTable()
    assert table.apply(heartbeat(2, added=[("a", 0), ("b", 64)])) == 2
    assert table.acked_seq == 2 and len(table) == 2
    assert table.apply(heartbeat(2, added=[("c", 128)])) == 0  # a replayed reply is ignored
    assert table.get("c") is None
    table.apply(heartbeat(3, removed=["a"]))
    assert table.get("a") is None and table.get("b").offset == 64
    table.apply(heartbeat(5, added=[("z", 0)], full=True))
    assert len(table) == 1 and table.get("z").segment_id == "dram0"
    inventory = table.to_inventory()
    assert (list(inventory.keys), list(inventory.offsets), list(inventory.lengths),
            list(inventory.checksums)) == (["z"], [0], [10], [7])
    table.reset_sequence()
    assert table.acked_seq == 0 and len(table) == 1


def test_key_both_added_and_removed_in_one_change_set_is_dropped():
    """The safe reading: never keep an entry whose space may hold other bytes by now."""
    table = ObjectTable()
    table.apply(heartbeat(2, added=[("k", 0)], removed=["k"]))
    assert table.get("k") is None


def test_shm_segment_is_owner_only_and_unique():
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        segment = create_shm(unique_shm_name("kvstore-test"), 4096)
    finally:
        os.umask(old_umask)
    try:
        assert os.stat(f"/dev/shm{segment.name}").st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError):
            create_shm(segment.name, 4096)
        other = open_shm(segment.name)
        segment.view[:5] = b"hello"
        assert bytes(other.view[:5]) == b"hello"
        other.close()
    finally:
        segment.unlink()
        segment.close()
    assert not os.path.exists(f"/dev/shm{segment.name}")
    assert unique_shm_name("p") != unique_shm_name("p")


def test_embedded_daemon_serves_and_cleans_up():
    running = run_in_thread(DaemonConfig(dram_bytes=1024 * 1024))
    shm_name = running.daemon.segments[0].shm_name
    assert running.address.startswith("127.0.0.1:")
    assert os.path.exists(f"/dev/shm{shm_name}")
    running.stop()
    running.stop()  # idempotent
    assert not os.path.exists(f"/dev/shm{shm_name}")


def test_port_in_use_is_a_config_error_and_leaves_no_shm():
    with run_in_thread(DaemonConfig(dram_bytes=1024 * 1024)) as first:
        port = int(first.address.rsplit(":", 1)[1])
        before = set(os.listdir("/dev/shm"))
        with pytest.raises(ConfigError, match="cannot bind"):
            run_in_thread(DaemonConfig(dram_bytes=1024 * 1024, port=port))
        assert set(os.listdir("/dev/shm")) - before == set()


def test_daemon_startup_does_not_import_torch():
    code = ("import sys, kvstore, kvstore.daemon.cli, kvstore.daemon.server, "
            "kvstore.daemon.master_link, kvstore.transport; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_daemon_start_reaps_segments_of_dead_daemons_only(tmp_path):
    from kvstore._posix_shm import host_tag

    tag, pid = host_tag(), dead_pid()
    other_tag = "0" * 8 if tag != "0" * 8 else "1" * 8
    names = {
        "orphan": f"/kvstore-gone-{tag}-{pid}-{'a' * 16}",
        "other_host": f"/kvstore-gone-{other_tag}-{pid}-{'b' * 16}",
        "live": f"/kvstore-live-{tag}-{os.getpid()}-{'c' * 16}",
        "not_ours": f"/something-else-{tag}-{pid}-{'d' * 16}",
    }
    segments = {key: create_shm(name, 4096) for key, name in names.items()}
    ssd_orphan = tmp_path / f"kvstore-gone-{tag}-{pid}-{'e' * 16}.seg"
    ssd_orphan.write_bytes(b"x")
    try:
        with run_in_thread(DaemonConfig(dram_bytes=1024 * 1024, ssd_dir=str(tmp_path),
                                        ssd_bytes=1024 * 1024)):
            present = {key: os.path.exists(f"/dev/shm{name}") for key, name in names.items()}
            assert present == {"orphan": False, "other_host": True, "live": True,
                               "not_ours": True}
            assert not ssd_orphan.exists()
    finally:
        for segment in segments.values():
            segment.unlink()
            segment.close()


def test_reaping_can_be_turned_off(tmp_path):
    # NOTE: the orphan is an SSD segment file in this test's own directory, not a /dev/shm
    # object: every daemon that starts on this host (other tests, other checkouts' suites
    # run at the same time) reaps this host's /dev/shm orphans, so a fake one there could
    # vanish under this test, while an SSD directory is reaped only by its own daemon
    from kvstore._posix_shm import host_tag

    orphan = tmp_path / f"kvstore-gone-{host_tag()}-{dead_pid()}-{'f' * 16}.seg"
    orphan.write_bytes(b"x")
    with run_in_thread(DaemonConfig(dram_bytes=1024 * 1024, ssd_dir=str(tmp_path),
                                    ssd_bytes=1024 * 1024, reap_orphans=False)):
        assert orphan.exists()
    assert orphan.read_bytes() == b"x"


def test_prefault_allocates_every_page_after_creation_in_the_background():
    """Creation is cheap (sparse, so a big daemon listens at once); the backend's background
    thread then owns all the memory before clients need it, and a client's populate of the
    chunk a copy touches allocates just that chunk."""
    from kvstore._posix_shm import POPULATE_CHUNK_BYTES, ChunkPopulator
    from kvstore.daemon.backends import ShmBackend

    size_bytes = 16 << 20
    backend = ShmBackend("dram0", size_bytes, name_prefix="kvstore-test-prefault")
    try:
        path = f"/dev/shm{backend.shm_name}"
        assert os.stat(path).st_blocks * 512 < size_bytes // 2
        client = open_shm(backend.shm_name)
        address = __import__("numpy").frombuffer(client.view, dtype="uint8").ctypes.data
        ChunkPopulator(address, size_bytes).ensure(5 << 20, 100)
        assert os.stat(path).st_blocks * 512 >= POPULATE_CHUNK_BYTES
        client.view[:4] = b"abcd"                    # a client's mapping sees the same memory
        assert bytes(backend.view(0, 4)) == b"abcd"
        client.close()
        backend.allocate_in_background().join(timeout=30)
        assert os.stat(path).st_blocks * 512 >= size_bytes
    finally:
        backend.close()


def test_prefault_refuses_a_segment_larger_than_the_free_shm_at_once():
    stats = os.statvfs("/dev/shm")
    too_big = stats.f_bavail * stats.f_frsize + (1 << 30)
    name = unique_shm_name("kvstore-test-prefault")
    with pytest.raises(OSError, match="is /dev/shm large enough"):
        create_shm(name, too_big, prefault=True)
    assert not os.path.exists(f"/dev/shm{name}")


def test_prefault_flag_maps_to_the_config():
    assert DaemonConfig(dram_bytes=1 << 20).prefault is True
    assert DaemonConfig(dram_bytes=1 << 20, prefault=False).prefault is False
