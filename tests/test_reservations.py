"""Puts into space reserved ahead (master/reservations.py, client/reservations.py), against
real master and daemon processes: a reserved put takes no PutStart and lands inside its
writer's reservation; two writers' reservations never overlap; a commit outside, over or
after a reservation is refused with nothing stored changed; expiry while a put is in flight
(the put is made again through PutStart, never visible over bytes another put wrote); a
writer that dies (its space returns after the TTL); a master restart; eviction and tenants
with reservations held."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from client_cluster import payload
from crash_servers import daemon_process, master_process, wait_adopted
from reservation_helpers import inside, replica_of
from servers import KVSTORE_BIN

import kvstore
from kvstore._deadline import Deadline
from kvstore.client.checksum import checksum
from kvstore.client.config import ClientConfig
from kvstore.client.reservations import ReservedSpace
from kvstore.rpc import connect_master
from kvstore.rpc.results import ReservationGrant

SLOW_BEAT = ("--heartbeat-interval", "1s", "--node-ttl", "60s")
MiB = 1 << 20


def _cluster(*master_args, dram="64MiB", port=0):
    master = master_process(*SLOW_BEAT, *master_args, port=port)
    try:
        daemon = daemon_process(master, "--dram", dram)
    except BaseException:
        master.close()
        raise
    return master, daemon


def _node_reserved_bytes(store) -> int:
    return sum(node.reserved_bytes for node in store._master.list_nodes())


def _wait(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)   # the master's TTL runs on its own clock, not one we can advance


@pytest.fixture(params=["shm", "tcp"])
def transport(request):
    return request.param


def test_reserved_puts_land_in_the_reservation_and_read_back(transport):
    master, daemon = _cluster()
    try:
        with kvstore.connect(master.address, transport=transport,
                             reserve_bytes=8 * MiB) as store:
            values = {f"k{i}": payload(1000 + 7 * i, seed=i) for i in range(20)}
            store.batch_put(list(values), list(values.values()))
            store.put("single", payload(64 << 10, seed=99))
            space = store._reserved
            assert space.num_reserved == 1, "every put fitted one reservation"
            if transport == "shm":
                # same host: the commits went to the daemon's commit ring after PutEnd
                assert space._grant.commit_ring
                assert store._transfers.committer.num_ring_records == 2
            grant = space._grant
            for key in [*values, "single"]:
                assert inside(grant, replica_of(store, key)), key
            for key, value in values.items():
                assert store.get(key) == value
            assert store.get("single") == payload(64 << 10, seed=99)
            # the unused rest is listed per node (kvstore status)
            used = sum(len(v) + 63 & ~63 for v in values.values()) + (64 << 10)
            assert _node_reserved_bytes(store) == grant.target.length - used
            # a put the reservation does not take (a pin) goes through PutStart
            store.put("pinned", b"x" * 100, hard_pin=True)
            assert not inside(grant, replica_of(store, "pinned"))
            # a key that exists is a success, its value not overwritten
            store.put("k0", b"other bytes")
            assert store.get("k0") == values["k0"]
    finally:
        daemon.close()
        master.close()


def test_status_shows_reserved_bytes_per_node():
    master, daemon = _cluster()
    try:
        with kvstore.connect(master.address, reserve_bytes=4 * MiB) as store:
            store.put("a", b"a" * 1000)
            out = subprocess.run([str(KVSTORE_BIN), "status", "--master", master.address,
                                  "--json"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            nodes = json.loads(out.stdout)["nodes"]
            assert [n["reserved_bytes"] for n in nodes] == [4 * MiB - 1024]
    finally:
        daemon.close()
        master.close()


def test_two_writers_reservations_never_overlap():
    master, daemon = _cluster()
    try:
        with kvstore.connect(master.address, reserve_bytes=4 * MiB) as one, \
                kvstore.connect(master.address, reserve_bytes=4 * MiB) as two:
            for i in range(8):
                one.put(f"one/{i}", payload(3000, seed=i))
                two.put(f"two/{i}", payload(3000, seed=100 + i))
            a, b = one._reserved._grant.target, two._reserved._grant.target
            assert a.segment_id == b.segment_id
            assert a.offset + a.length <= b.offset or b.offset + b.length <= a.offset
            for i in range(8):
                assert one.get(f"two/{i}") == payload(3000, seed=100 + i)
                assert two.get(f"one/{i}") == payload(3000, seed=i)
    finally:
        daemon.close()
        master.close()


def test_commits_outside_over_or_into_anothers_reservation_are_refused():
    master, daemon = _cluster()
    client = None
    try:
        client, _ = connect_master(master.address)
        grant = client.reserve(1 * MiB, client_id="writer-a")
        other = client.reserve(1 * MiB, client_id="writer-b")
        assert isinstance(grant, ReservationGrant) and isinstance(other, ReservationGrant)
        start = grant.target.offset
        value = payload(4096, seed=1)
        tcp_store = kvstore.connect(master.address, transport="tcp")
        try:
            # the bytes are written through the reservation's capability
            transport = tcp_store._transfers.transports[0]
            transport.write(grant.target._replace(offset=start, length=4096),
                            memoryview(value), timeout_s=10)
            total = checksum(memoryview(value))

            def end(keys, offsets, sizes, client_id="writer-a", reservation=grant):
                return client.put_end_reserved(reservation.reservation_id, keys, offsets,
                                               sizes, [total] * len(keys),
                                               client_id=client_id)

            assert end(["ok"], [start], [4096]) == [None]
            # outside the reservation (past its end, and before it), unaligned, overlapping
            refused = end(["past", "before", "odd", "over"],
                          [start + grant.target.length - 64,
                           max(0, start - 4096) if start else start + grant.target.length,
                           start + 4096 + 8, start + 2048], [4096, 4096, 100, 100])
            assert all(isinstance(e, kvstore.InvalidArgumentError) for e in refused), refused
            assert "outside" in str(refused[0]) and "overlaps" in str(refused[3])
            # another writer naming this reservation, and this one naming another's
            assert isinstance(end(["theft"], [start + 8192], [100], client_id="writer-b")[0],
                              kvstore.KeyNotFoundError)
            assert isinstance(end(["theft2"], [other.target.offset], [100],
                                  reservation=other)[0], kvstore.KeyNotFoundError)
            # a replay of the OK commit is OK again (idempotent) and changes nothing
            assert end(["ok"], [start], [4096]) == [None]
            # a second key over the same range is refused; the first keeps its bytes
            assert isinstance(end(["twin"], [start], [4096])[0], kvstore.InvalidArgumentError)
            assert tcp_store.batch_exists(["ok", "past", "before", "odd", "over", "theft",
                                           "theft2", "twin"]) == [True] + [False] * 7
            assert tcp_store.get("ok") == value
            # bad arguments fail the whole call
            with pytest.raises(kvstore.InvalidArgumentError):
                client.put_end_reserved(grant.reservation_id, ["x", "y"], [start], [1, 1],
                                        [], client_id="writer-a")
            with pytest.raises(kvstore.InvalidArgumentError):
                client.reserve(0, client_id="writer-a")
        finally:
            tcp_store.close()
    finally:
        if client is not None:
            client.close()
        daemon.close()
        master.close()


def test_a_reservation_that_expires_while_a_put_is_in_flight(transport):
    """Written inside the reservation, then the master's TTL passes and its space is taken
    back and handed to another writer before the PutEnd arrives: the PutEnd is refused,
    nothing becomes visible, the other writer's objects keep their bytes, and the next put
    of the key succeeds (a new reservation or PutStart)."""
    master, daemon = _cluster("--reservation-ttl", "1s")
    try:
        with kvstore.connect(master.address, transport=transport,
                             reserve_bytes=4 * MiB) as store, \
                kvstore.connect(master.address, transport=transport) as other:
            late = payload(2000, seed=2)
            grant, (offset,) = store._reserved.place(store._master, [len(late)],
                                                     Deadline.after(10))
            target = grant.target._replace(offset=offset, length=len(late))
            assert store._transfers.write([(0, "late", target, memoryview(late))],
                                          deadline=Deadline.after(10)) == {}
            _wait(lambda: _node_reserved_bytes(store) == 0, "the reservation never expired")
            others = {f"other/{i}": payload(5000, seed=50 + i) for i in range(40)}
            other.batch_put(list(others), list(others.values()))
            ended = store._master.put_end_reserved(
                grant.reservation_id, ["late"], [offset], [len(late)],
                [checksum(memoryview(late))], client_id=store.client_id)
            assert isinstance(ended[0], kvstore.KeyNotFoundError) and "expired" in \
                str(ended[0]), ended
            assert not store.exists("late")
            for key, value in others.items():
                assert other.get(key) == value, key
            store.put("late", late)
            assert store.get("late") == late
    finally:
        daemon.close()
        master.close()


def test_a_tcp_write_past_the_reservations_ttl_is_refused_by_the_daemon():
    """A writer whose clock still calls its reservation usable (frozen here) after the
    master's TTL: its tcp WRITEs carry an expired capability, which the daemon refuses
    before a byte lands; the batch put fails clearly and nothing is stored. (A single tcp
    put is one WRITE_RESERVED, which then goes through PutStart instead:
    tests/test_write_reserved.py.)"""
    master, daemon = _cluster("--reservation-ttl", "1s")
    try:
        with kvstore.connect(master.address, transport="tcp",
                             reserve_bytes=4 * MiB) as store, \
                kvstore.connect(master.address, transport="tcp") as other:
            frozen = [0.0]
            store._reserved = ReservedSpace(4 * MiB, store.client_id, store.host_id,
                                            clock=lambda: frozen[0])
            store.put("before", payload(2000, seed=1))
            _wait(lambda: _node_reserved_bytes(store) == 0, "the reservation never expired")
            others = {f"other/{i}": payload(5000, seed=50 + i) for i in range(40)}
            other.batch_put(list(others), list(others.values()))
            failed = store.batch_put(["late", "late2"], [payload(2000, seed=2)] * 2)
            assert all(isinstance(e, kvstore.TransferError) and "expired" in str(e)
                       for e in failed), failed
            assert store.batch_exists(["late", "late2"]) == [False, False]
            for key, value in others.items():
                assert other.get(key) == value, key
            assert store.get("before") == payload(2000, seed=1)
    finally:
        daemon.close()
        master.close()


_DYING_WRITER = """
import sys, kvstore
store = kvstore.connect(sys.argv[1], reserve_bytes=8 << 20)
store.put("from-the-dead", b"d" * 1000)
print("put", flush=True)
sys.stdin.readline()
"""


def test_a_writer_that_dies_gives_its_reservation_back_after_the_ttl():
    master, daemon = _cluster("--reservation-ttl", "1s")
    writer = None
    try:
        writer = subprocess.Popen([sys.executable, "-c", _DYING_WRITER, master.address],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "put"
        with kvstore.connect(master.address) as store:
            assert _node_reserved_bytes(store) == 8 * MiB - 1024
            writer.kill()
            writer.wait(timeout=30)
            _wait(lambda: _node_reserved_bytes(store) == 0, "the dead writer's space stayed")
            (node,) = store._master.list_nodes()
            assert node.used_bytes == 1024, "only the committed object is left in use"
            assert store.get("from-the-dead") == b"d" * 1000
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        daemon.close()
        master.close()


def test_a_master_restart_forgets_reservations_and_keeps_committed_puts():
    master, daemon = _cluster()
    port = master.port
    restarted = None
    try:
        # NOTE: gRPC: the restarted master listens on the same gRPC port (its fast port is
        # picked anew)
        with kvstore.connect(master.address, reserve_bytes=4 * MiB, timeout_s=30,
                             metadata="grpc") as store:
            store.put("anchor", payload(3000, seed=3))
            grant = store._reserved._grant
            master.kill()
            master.close()
            restarted = master_process(*SLOW_BEAT, port=port)
            wait_adopted(restarted, "anchor", daemon)
            # the committed put came back from the daemon's inventory
            assert store.get("anchor") == payload(3000, seed=3)
            # the old reservation is unknown to the new master: the put goes through
            # PutStart (or a new reservation) and succeeds
            store.put("after", payload(3000, seed=4))
            assert store.get("after") == payload(3000, seed=4)
            assert store._reserved._grant is not grant
            # the new master knows no reservation of the old one
            assert _node_reserved_bytes(store) in (0, 4 * MiB - 3008)
    finally:
        if restarted is not None:
            restarted.close()
        daemon.close()
        master.close()


def test_eviction_never_hands_out_a_live_reservation():
    """A reservation counts as used: a burst of other puts that fills the node evicts
    objects, never places one inside the reservation, and the reserved put still lands."""
    master, daemon = _cluster(dram="16MiB")
    try:
        with kvstore.connect(master.address, reserve_bytes=2 * MiB) as holder, \
                kvstore.connect(master.address) as filler:
            holder.put("held/0", payload(1000, seed=0))
            grant = holder._reserved._grant
            assert grant.target.length <= 2 * MiB
            for i in range(64):    # 64 x 512 KiB = 32 MiB through a 16 MiB node
                filler.put(f"fill/{i}", payload(512 << 10, seed=i))
            stats = filler.stats()["master"]
            assert stats["evictions"] > 0, stats
            for i in range(64):
                if filler.exists(f"fill/{i}"):
                    assert not inside(grant, replica_of(filler, f"fill/{i}")), i
            holder.put("held/1", payload(1000, seed=1))
            assert inside(grant, replica_of(holder, "held/1"))
            assert holder.get("held/1") == payload(1000, seed=1)
    finally:
        daemon.close()
        master.close()


def test_a_grant_stays_below_the_high_watermark():
    master, daemon = _cluster(dram="16MiB")
    client = None
    try:
        client, _ = connect_master(master.address)
        grant = client.reserve(1 << 40, client_id="greedy")
        assert isinstance(grant, ReservationGrant)
        assert grant.target.length <= int(16 * MiB * 0.95 * 0.25)
        refusal = client.reserve(1 << 40, client_id="greedy", min_bytes=1 << 40)
        assert isinstance(refusal, str) and "below" in refusal
    finally:
        if client is not None:
            client.close()
        daemon.close()
        master.close()


def test_tenants_put_through_putstart_within_their_quota(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[[tenant]]\nname = "t"\ntoken = "tenant-token"\n'
                       '[tenant.quota]\ndram = 1048576\n')
    master = master_process(*SLOW_BEAT, "--token", "cluster-token", "--tenants",
                            str(tenants))
    daemon = None
    try:
        daemon = daemon_process(master, "--dram", "64MiB", "--token", "cluster-token")
        with kvstore.connect(master.address, token="tenant-token",
                             reserve_bytes=4 * MiB) as store:
            store.put("a", b"a" * 1000)
            assert store._reserved.num_reserved == 0
            assert "tenant" in store._reserved.last_refusal
            assert store.get("a") == b"a" * 1000
            with pytest.raises(kvstore.CapacityError):
                store.put("big", b"b" * (2 * MiB))
    finally:
        if daemon is not None:
            daemon.close()
        master.close()


def test_reserve_bytes_is_validated():
    for bad in (-1, True, 1.5):
        with pytest.raises(kvstore.InvalidArgumentError):
            ClientConfig(reserve_bytes=bad)


def test_a_reservation_is_not_used_once_half_its_ttl_passed():
    master, daemon = _cluster()
    try:
        with kvstore.connect(master.address, reserve_bytes=4 * MiB) as store:
            now = [0.0]
            space = store._reserved = ReservedSpace(4 * MiB, store.client_id, store.host_id,
                                                    clock=lambda: now[0])
            store.put("a", b"a" * 100)
            first = space._grant
            now[0] += first.ttl_s * 0.5
            store.put("b", b"b" * 100)
            assert space._grant is not first and space.num_reserved == 2
            assert inside(space._grant, replica_of(store, "b"))
    finally:
        daemon.close()
        master.close()


def test_without_client_commits_the_master_pushes_reserved_puts():
    """--no-client-commit: the reserved PutEnd carries no capabilities and waits for the
    master's push instead; the put is just as readable, and no ring record is written."""
    master, daemon = _cluster("--no-client-commit")
    try:
        with kvstore.connect(master.address, reserve_bytes=4 * MiB) as store:
            store.put("pushed", payload(3000, seed=5))
            assert store._reserved.num_reserved == 1
            assert store._transfers.committer.num_ring_records == 0
            assert store.get("pushed") == payload(3000, seed=5)
    finally:
        daemon.close()
        master.close()


def test_a_failover_to_a_standby_forgets_reservations_and_keeps_committed_puts(etcd):
    """HA: the leader granted the writer a reservation and took reserved puts; SIGKILLed,
    a standby takes over knowing no reservation. The acknowledged puts survive (their
    commits reached the daemon before each put returned), and the next puts succeed (the
    old reservation's PutEnd is refused by the new leader, so they go through PutStart or
    a new grant)."""
    from ha_cluster import HaCluster

    cluster = HaCluster(etcd, num_masters=2, num_daemons=1)
    try:
        leader = cluster.wait_leader(min_epoch=1)
        with kvstore.connect(cluster.spec, reserve_bytes=4 * MiB, timeout_s=30) as store:
            _wait(lambda: store._master.list_nodes(), "the daemon never registered")
            before = {f"ha/{i}": payload(4000, seed=i) for i in range(10)}
            store.batch_put(list(before), list(before.values()))
            old = store._reserved._grant
            assert old is not None and store._reserved.num_reserved == 1
            cluster.master_of(leader).kill()
            cluster.wait_leader(min_epoch=leader.epoch + 1)
            after = {f"ha/after/{i}": payload(4000, seed=100 + i) for i in range(10)}
            assert store.batch_put(list(after), list(after.values())) == [None] * 10
            assert store._reserved._grant is not old
            for key, value in {**before, **after}.items():
                assert store.get(key) == value, key
    finally:
        cluster.close()
