"""Home reads end to end (kvstore/home.py, master/placement.py place_at_home,
client/home_reads.py, daemon/keyed_reads.py): a put free to choose lands on its key's home
node, and a client's first get of it is one KEYED_READ to that node, no master call; in
every window where the home's table stops holding the key's current value (a remove, a
replace on another node, eviction and demotion, ``--commit-timeout 0``, a daemon restart, a
master restart, a node joining so homes move, tenants, forged or foreign capabilities) a
get returns the key's current bytes or KeyNotFoundError, never other bytes.

Real master and daemon processes on loopback; clients with ``transport="tcp"``.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
from client_cluster import Cluster, payload
from conditions import master_hits, wait_for
from servers import ServerProcess
from stopped_process import stop_process

import kvstore
from kvstore import capability
from kvstore.home import home_of, node_seeds
from kvstore.rpc import grpc_client
from kvstore.transport import data_frames, keyed_read
from kvstore.transport.data_frames import Status

KiB, MiB = 1 << 10, 1 << 20
TIMEOUT_S = 10.0
BEATS = ("--heartbeat-interval", "200ms")


def _home(store) -> dict:
    return store.stats()["home_reads"]


def _replica_nodes(store, key: str) -> list[str]:
    found, _ = store._master.get_replicas_leased([key], client_host_id="")
    return [t.node_id for t in found[0].targets]


def _home_node(store, key: str, prefix: str = "") -> str:
    nodes = store._master.get_home_nodes()
    return home_of(prefix + key, node_seeds([n.node_id for n in nodes.nodes]))


def _home_get(store, key: str):
    """Get ``key`` until its home serves it (a daemon's location lease starts with its first
    up-to-date heartbeat); return the bytes."""
    def served():
        hits = _home(store)["hits"]
        value = store.get(key)
        return value if _home(store)["hits"] > hits else None
    return wait_for(served, f"a home read of {key!r}")


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=2, dram="64MiB", master_args=BEATS)
    yield cluster
    cluster.close()


@pytest.fixture
def stores(cluster):
    reader = cluster.connect(transport="tcp", location_cache_entries=0)
    writer = cluster.connect(transport="tcp", location_cache_entries=0, home_reads=False)
    yield reader, writer
    reader.close()
    writer.close()


def test_a_free_put_lands_on_its_home_and_a_first_get_skips_the_master(stores):
    reader, writer = stores
    keys = [f"hr/first/{i}" for i in range(16)]
    values = [payload(64 * KiB, seed=i) for i in range(16)]
    writer.batch_put(keys, values)
    homes = {_home_node(writer, key) for key in keys}
    assert len(homes) == 2                        # both nodes are home to some keys
    for key in keys:
        assert _replica_nodes(writer, key) == [_home_node(writer, key)]
    assert _home_get(reader, keys[0]) == values[0]
    hits, home = master_hits(reader), _home(reader)
    assert reader.batch_get(keys) == values       # one KEYED_READ stream per node
    out = bytearray(64 * KiB)
    assert reader.get_into(keys[1], out) == 64 * KiB and bytes(out) == values[1]
    outs = [bytearray(64 * KiB) for _ in keys]
    assert reader.batch_get_into(keys, outs) == [64 * KiB] * len(keys)
    assert [bytes(o) for o in outs] == values
    assert _home(reader)["hits"] == home["hits"] + 2 * len(keys) + 1   # no GetReplicas
    # the master learns of them afterwards (TouchKeys): one hit each, as a get counted
    assert master_hits(reader) == hits + 2 * len(keys) + 1
    assert reader.stats()["transfers"]["tcp"]["num_reads"] >= 2 * len(keys) + 1


def test_a_put_placed_elsewhere_and_absent_keys_go_through_the_master(stores, cluster):
    reader, writer = stores
    key = "hr/near"
    home = _home_node(writer, key)
    other = next(n.node_id for n in writer._master.get_home_nodes().nodes
                 if n.node_id != home)
    writer.put(key, payload(8 * KiB, seed=20), near_node=other)
    assert _replica_nodes(writer, key) == [other]
    hits = master_hits(reader)
    assert reader.get(key) == payload(8 * KiB, seed=20)   # "not here", then the master
    assert master_hits(reader) == hits + 1
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("hr/absent")
    out = bytearray(4 * KiB)                   # too small: the master path's error
    with pytest.raises(kvstore.InvalidArgumentError):
        reader.get_into(key, out)


def test_a_value_the_transport_stripes_is_read_at_home_by_its_location(stores):
    reader, writer = stores
    value = payload(4 * MiB, seed=21)
    writer.put("hr/large", value)
    writer.put("hr/small", payload(KiB, seed=22))
    _home_get(reader, "hr/small")                   # the home's lease holds
    home = _home(reader)
    assert reader.get("hr/large") == value          # LOCATED at home, then striped
    assert _home(reader)["hits"] == home["hits"] + 1    # (tests/test_home_reads_large.py)
    assert _home(reader)["located"] == home["located"] + 1


def test_a_completed_remove_is_never_undone_by_a_home_read(stores):
    reader, writer = stores
    writer.put("hr/removed", payload(8 * KiB, seed=2))
    _home_get(reader, "hr/removed")
    assert writer.remove("hr/removed") is True     # confirmed by the daemon
    with pytest.raises(kvstore.KeyNotFoundError):
        reader.get("hr/removed")


def test_a_key_replaced_on_another_node_reads_its_new_value(stores):
    reader, writer = stores
    key = "hr/replaced"
    old, new = payload(32 * KiB, seed=3), payload(32 * KiB, seed=4)
    writer.put(key, old)
    assert _home_get(reader, key) == old
    writer.remove(key)
    other = next(n.node_id for n in writer._master.get_home_nodes().nodes
                 if n.node_id != _home_node(writer, key))
    writer.put(key, new, near_node=other)
    assert reader.get(key) == new
    writer.remove(key, force=True)    # the reader's master-path lease may still be held
    writer.put(key, old)                           # at home again
    assert reader.get(key) == old


def test_empty_values_and_batches_mixing_homes_misses_and_errors(stores):
    reader, writer = stores
    writer.put("hr/empty", b"")
    writer.put("hr/mix/a", payload(KiB, seed=30))
    _home_get(reader, "hr/mix/a")
    got = reader.batch_get(["hr/empty", "hr/mix/a", "hr/mix/absent", "hr/empty"])
    assert got[0] == b"" and got[3] == b"" and got[1] == payload(KiB, seed=30)
    assert isinstance(got[2], kvstore.KeyNotFoundError)


def _raw(data_addr: str, token: str | None = None) -> socket.socket:
    host, port = data_addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    sock.sendall(data_frames.encode_hello(token))
    assert _reply(sock)[0] == Status.OK
    return sock


def _reply(sock) -> tuple[Status, str, int]:
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, _, msg_len, _, length = data_frames.REPLY.unpack(header)
    return Status(status), data_frames.recv_exact(sock, msg_len).decode(), length


def test_bad_keyed_reads_are_refused_and_the_connection_stays_usable(stores):
    reader, writer = stores
    key = "hr/raw"
    value = payload(4 * KiB, seed=7)
    writer.put(key, value)
    _home_get(reader, key)
    nodes = {n.node_id: n for n in writer._master.get_home_nodes().nodes}
    node = nodes[_home_node(writer, key)]
    other = next(n for n in nodes.values() if n.node_id != node.node_id)
    assert node.keyed_read_capability           # the daemons check reads by default
    forged = bytearray(node.keyed_read_capability)
    forged[-1] ^= 1
    with _raw(node.data_addr) as sock:
        for cap, limit, want in [
                (b"", keyed_read.ANY_SIZE, Status.CAPABILITY_REFUSED),
                (bytes(forged), keyed_read.ANY_SIZE, Status.CAPABILITY_REFUSED),
                (other.keyed_read_capability, keyed_read.ANY_SIZE, Status.CAPABILITY_REFUSED),
                (node.keyed_read_capability, 4 * KiB - 1, Status.TOO_LARGE)]:
            sock.sendall(keyed_read.encode_keyed_read(1, key.encode(), cap, limit))
            status, message, length = _reply(sock)
            assert status == want and length == 0, message
        sock.sendall(keyed_read.encode_keyed_read(2, b"hr/none", node.keyed_read_capability,
                                                  keyed_read.ANY_SIZE))
        assert _reply(sock)[0] == Status.KEY_NOT_HERE
        sock.sendall(keyed_read.encode_keyed_read(3, key.encode(), node.keyed_read_capability,
                                                  keyed_read.ANY_SIZE))
        status, _, length = _reply(sock)
        assert status == Status.OK and length == 8 + len(value)
        body = data_frames.recv_exact(sock, length)
        assert body[8:] == value
        assert keyed_read.CHECKSUM.unpack(body[:8])[0] == kvstore.client.checksum.checksum(value)
        header = data_frames.REQUEST.pack(data_frames.REQUEST_MAGIC, data_frames.Op.KEYED_READ,
                                          0, 0, 4, 0, 0)      # a key of 0 bytes
        sock.sendall(header)
        assert _reply(sock)[0] == Status.BAD_FRAME
        assert sock.recv(1) == b""                 # and the daemon closed the connection
    assert reader.get(key) == value and writer.get(key) == value


def test_keyed_read_capabilities_expire_and_name_their_kind():
    secret = capability.new_secret()
    cap = capability.issue_keyed(secret, "n1", "alpha/", expiry_ms=1000)
    assert capability.check_keyed(secret, "n1", cap, now_ms=999) == "alpha/"
    with pytest.raises(capability.CapabilityRefused, match="expired"):
        capability.check_keyed(secret, "n1", cap, now_ms=1000)
    with pytest.raises(capability.CapabilityRefused, match="does not verify"):
        capability.check_keyed(secret, "n2", cap, now_ms=0)
    read_cap = capability.issue_read(secret, "n1", "", 0, 0, "", "alpha/", 1000)
    with pytest.raises(capability.CapabilityRefused, match="does not verify"):
        capability.check_keyed(secret, "n1", read_cap, now_ms=0)


def test_tenants_read_their_own_keys_at_home_and_never_another_tenants(two_tenants_file):
    cluster = Cluster(num_daemons=2, dram="16MiB", token="cluster-secret",
                      master_args=("--tenants", str(two_tenants_file), *BEATS))
    try:
        with kvstore.connect(cluster.address, token="alpha-secret", transport="tcp") as alpha, \
                kvstore.connect(cluster.address, token="beta-secret", transport="tcp") as beta:
            alpha.put("shared-name", payload(4 * KiB, seed=80))
            beta.put("shared-name", payload(4 * KiB, seed=81))
            assert _home_get(alpha, "shared-name") == payload(4 * KiB, seed=80)
            assert _home_get(beta, "shared-name") == payload(4 * KiB, seed=81)
            homes = alpha._master.get_home_nodes()
            assert homes.key_prefix == "alpha/"
            data_token = alpha._master.stats().data_token
            for node in homes.nodes:               # alpha's capability, beta's stored key
                with _raw(node.data_addr, data_token) as sock:
                    sock.sendall(keyed_read.encode_keyed_read(
                        1, b"beta/shared-name", node.keyed_read_capability,
                        keyed_read.ANY_SIZE))
                    status, message, _ = _reply(sock)
                    assert status == Status.CAPABILITY_REFUSED, message
                    assert "alpha/" in message
    finally:
        cluster.close()


def test_commit_timeout_0_turns_home_reads_off():
    cluster = Cluster(num_daemons=1, dram="16MiB",
                      master_args=(*BEATS, "--commit-timeout", "0"))
    try:
        with cluster.connect(transport="tcp", location_cache_entries=0) as store:
            store.put("hr/ct0", payload(4 * KiB, seed=90))
            for _ in range(3):
                assert store.get("hr/ct0") == payload(4 * KiB, seed=90)
            assert _home(store)["hits"] == 0       # no lease: the master path every time
    finally:
        cluster.close()


def test_a_removal_the_daemon_did_not_confirm_is_not_undone_by_a_home_read():
    cluster = Cluster(num_daemons=1, dram="16MiB",
                      master_args=(*BEATS, "--commit-timeout", "1s", "--node-ttl", "60s"))
    try:
        with cluster.connect(transport="tcp", location_cache_entries=0) as reader, \
                cluster.connect(transport="tcp", home_reads=False) as writer:
            writer.put("hr/unconfirmed", payload(8 * KiB, seed=31))
            _home_get(reader, "hr/unconfirmed")
            pid = cluster.daemons[0].proc.pid
            stop_process(pid)                # it confirms nothing, and misses its beats
            try:
                with pytest.raises(kvstore.TransferError, match="retry"):
                    writer.remove("hr/unconfirmed", force=True)
            finally:
                os.kill(pid, signal.SIGCONT)
            # its lease ended while it was stopped: whether or not the master's push
            # reached it yet, the keyed read is refused (LOCATION_OFF or KEY_NOT_HERE)
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("hr/unconfirmed")
    finally:
        cluster.close()


def test_a_node_joining_moves_homes_and_gets_stay_right():
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=BEATS)
    try:
        with cluster.connect(transport="tcp", location_cache_entries=0) as store:
            keys = [f"hr/join/{i}" for i in range(24)]
            values = [payload(KiB, seed=200 + i) for i in range(24)]
            store.batch_put(keys, values)
            assert store.batch_get(keys) == values
            assert _home(store)["nodes"] == 1
            cluster.daemons.append(ServerProcess(
                ["daemon", "--master", cluster.address, "--host", "127.0.0.1", "--port", "0",
                 "--dram", "16MiB"]))
            cluster.wait_nodes(2)
            new_keys = [f"hr/join/new/{i}" for i in range(24)]
            new_values = [payload(KiB, seed=300 + i) for i in range(24)]
            store.batch_put(new_keys, new_values)     # about half land on the new node
            moved = [k for k in new_keys if _replica_nodes(store, k)[0] !=
                     _replica_nodes(store, keys[0])[0]]
            assert moved
            # the client's list still has one node: the moved keys miss at the old node
            # (KEY_NOT_HERE, then the master) and a miss refreshes the list
            def all_at_home():
                assert store.batch_get(keys) == values   # old keys: right, wherever
                hits = _home(store)["hits"]
                assert store.batch_get(new_keys) == new_values
                return _home(store)["hits"] == hits + len(new_keys)
            wait_for(all_at_home, "the new homes to serve the new keys")
            assert _home(store)["nodes"] == 2
    finally:
        cluster.close()


def test_a_restarted_daemon_never_serves_the_old_value():
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=(*BEATS, "--node-ttl", "2s"))
    try:
        with cluster.connect(transport="tcp") as store:
            store.put("hr/restart", payload(8 * KiB, seed=40))
            _home_get(store, "hr/restart")
            cluster.kill_daemon(0)
            with pytest.raises((kvstore.KeyNotFoundError, kvstore.TransferError)):
                store.get("hr/restart")
            cluster.daemons[0] = ServerProcess(
                ["daemon", "--master", cluster.address, "--host", "127.0.0.1", "--port",
                 "0", "--dram", "16MiB"])
            wait_for(lambda: not store.exists("hr/restart"), "the old node to be dropped")
            with pytest.raises(kvstore.KeyNotFoundError):
                store.get("hr/restart")
    finally:
        cluster.close()


def test_evictions_and_demotions_never_return_wrong_bytes(tmp_path):
    cluster = Cluster(num_daemons=1, dram="8MiB",
                      daemon_args=("--ssd", f"{tmp_path}:6MiB"),
                      master_args=("--heartbeat-interval", "100ms", "--promote", "off"))
    try:
        with cluster.connect(transport="tcp", location_cache_entries=0) as reader, \
                cluster.connect(transport="tcp", home_reads=False) as writer:
            keys = [f"hr/evict/{i}" for i in range(20)]
            for i, key in enumerate(keys):       # 20 MiB into 8 MiB DRAM + 6 MiB SSD
                writer.put(key, payload(MiB, seed=100 + i))
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
            assert _home(reader)["hits"] > 0
    finally:
        cluster.close()


def test_after_a_master_restart_home_reads_follow_the_new_master():
    master = ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", *BEATS])
    port = master.port
    daemon = ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                            "--port", "0", "--dram", "16MiB"])
    restarted = None
    try:
        value = payload(8 * KiB, seed=50)
        with kvstore.connect(master.address, transport="tcp", metadata="grpc",
                             location_cache_entries=0) as store:
            wait_for(lambda: store.stats()["master"]["num_nodes"] == 1, "the daemon")
            store.put("hr/failover", value)
            store.put("hr/failover-removed", payload(8 * KiB, seed=51))
            _home_get(store, "hr/failover")
            master.kill()
            restarted = ServerProcess(["master", "--host", "127.0.0.1", "--port", str(port),
                                       *BEATS])
            wait_for(lambda: _exists(store, "hr/failover-removed"), "adoption by the new master")
            with kvstore.connect(restarted.address, transport="tcp", metadata="grpc",
                                 home_reads=False) as writer:
                assert writer.remove("hr/failover-removed", force=True) is True
            with pytest.raises(kvstore.KeyNotFoundError):
                store.get("hr/failover-removed")
            assert _home_get(store, "hr/failover") == value   # the new master's capability
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
