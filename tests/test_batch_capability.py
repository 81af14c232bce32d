"""Batch capabilities (issue 10, 10m): one MAC for every replica one PutStart allocated on
one node, verified once per CLIENT_COMMIT or commit-ring record.

What must hold: the MAC binds every entry (key, segment, offset, size) and their order, the
node, the writer, the sequence and the expiry, so a tampered entry, an entry added, dropped
or reordered, a replay against another node or registration, an expired batch or another
writer is refused (and, through a real daemon, nothing of such a commit is applied); a batch
capability never passes as a write capability nor the other way round; and a real put that
commits with one is adopted by a master restarted from the daemon's inventory.
"""

from __future__ import annotations

import pytest

from client_cluster import payload
from crash_servers import daemon_process, data_plane, master_process, wait_adopted

import kvstore
from kvstore import capability
from kvstore.capability import CapabilityRefused
from kvstore.client.checksum import checksum
from kvstore.rpc import connect_master
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Status
from kvstore.transport.tcp import TcpTransport
from kvstore.v1 import master_pb2

SECRET = b"\x07" * capability.SECRET_BYTES
NODE = "node-a"
NOW_MS = 1_000_000
SEGMENTS = ["dram-0", "dram-0", "ssd-0"]
OFFSETS = [0, 4096, 0]
SIZES = [4096, 8192, 4096]
KEYS = ["k/0", "k/1", "k/2"]


def _issue(**changes):
    args = dict(secret=SECRET, node_id=NODE, writer="cluster", expiry_ms=NOW_MS + 5000,
                node_seq=42, segment_ids=SEGMENTS, offsets=OFFSETS, sizes=SIZES, keys=KEYS)
    args.update(changes)
    return capability.issue_batch(**args)


def _check(blob, secret=SECRET, node_id=NODE, writer="cluster", now_ms=NOW_MS,
           segment_ids=SEGMENTS, offsets=OFFSETS, sizes=SIZES, keys=KEYS):
    return capability.check_batch(secret, node_id, blob, writer, now_ms, list(segment_ids),
                                  list(offsets), list(sizes), list(keys))


def test_a_batch_capability_verifies_its_own_entries():
    blob = _issue()
    cap = _check(blob)
    assert (cap.node_seq, cap.count, cap.writer, cap.expiry_ms) == (42, 3, "cluster",
                                                                    NOW_MS + 5000)
    assert capability.batch_count(blob) == 3
    assert capability.batch_expiry_ms(blob) == NOW_MS + 5000


@pytest.mark.parametrize("field, index, value", [
    ("keys", 1, "k/other"), ("segment_ids", 0, "ssd-0"), ("offsets", 2, 64),
    ("sizes", 0, 4160), ("offsets", 1, 4096 + 2**32), ("keys", 2, "k/2\0")])
def test_a_tampered_entry_is_refused(field, index, value):
    entries = dict(segment_ids=list(SEGMENTS), offsets=list(OFFSETS), sizes=list(SIZES),
                   keys=list(KEYS))
    entries[field][index] = value
    with pytest.raises(CapabilityRefused, match="does not verify"):
        _check(_issue(), **entries)


def test_an_entry_added_dropped_or_reordered_is_refused():
    blob = _issue()
    with pytest.raises(CapabilityRefused, match="for 3 entries, not 4"):
        _check(blob, segment_ids=SEGMENTS + ["dram-0"], offsets=OFFSETS + [65536],
               sizes=SIZES + [4096], keys=KEYS + ["k/added"])
    with pytest.raises(CapabilityRefused, match="for 3 entries, not 2"):
        _check(blob, segment_ids=SEGMENTS[:2], offsets=OFFSETS[:2], sizes=SIZES[:2],
               keys=KEYS[:2])
    order = [1, 0, 2]
    with pytest.raises(CapabilityRefused, match="does not verify"):
        _check(blob, segment_ids=[SEGMENTS[i] for i in order],
               offsets=[OFFSETS[i] for i in order], sizes=[SIZES[i] for i in order],
               keys=[KEYS[i] for i in order])
    # the count is covered by the MAC: restating it for an added entry does not help
    forged = bytearray(blob)
    forged[17:21] = (4).to_bytes(4, "little")
    with pytest.raises(CapabilityRefused, match="does not verify"):
        _check(bytes(forged), segment_ids=SEGMENTS + ["dram-0"], offsets=OFFSETS + [65536],
               sizes=SIZES + [4096], keys=KEYS + ["k/added"])


def test_a_replay_against_another_node_or_registration_is_refused():
    blob = _issue()
    with pytest.raises(CapabilityRefused, match="does not verify"):
        _check(blob, node_id="node-b")          # same secret, another node
    with pytest.raises(CapabilityRefused, match="does not verify"):
        _check(blob, secret=capability.new_secret())   # the node re-registered


def test_an_expired_batch_another_writer_and_malformed_blobs_are_refused():
    blob = _issue()
    with pytest.raises(CapabilityRefused, match="expired 0 ms ago"):
        _check(blob, now_ms=NOW_MS + 5000)
    with pytest.raises(CapabilityRefused, match="belongs to writer 'cluster'"):
        _check(blob, writer="tenant-b")
    for bad in (b"", blob[:10], blob[:-1], blob + b"x", b"\x01" + blob[1:]):
        with pytest.raises(CapabilityRefused, match="malformed|does not verify"):
            _check(bad)
    with pytest.raises(CapabilityRefused, match="out of range"):
        _check(blob, offsets=[0, -1, 0])


def test_batch_and_write_capabilities_never_pass_for_one_another():
    write_cap = capability.issue(SECRET, NODE, "dram-0", 0, 4096, "k/0", "cluster",
                                 NOW_MS + 5000, 42)
    with pytest.raises(CapabilityRefused, match="malformed"):
        _check(write_cap, segment_ids=SEGMENTS[:1], offsets=OFFSETS[:1], sizes=SIZES[:1],
               keys=KEYS[:1])
    one = _issue(segment_ids=SEGMENTS[:1], offsets=OFFSETS[:1], sizes=SIZES[:1],
                 keys=KEYS[:1])
    with pytest.raises(CapabilityRefused):
        capability.check(SECRET, NODE, "dram-0", one, 0, 4096, "cluster", NOW_MS)
    assert capability.batch_count(write_cap) == -1
    assert capability.batch_expiry_ms(write_cap) == 0


def test_issue_refuses_master_side_bugs():
    with pytest.raises(ValueError):
        _issue(keys=KEYS[:2])
    with pytest.raises(ValueError):
        _issue(writer="w" * (capability.MAX_WRITER_BYTES + 1))


# ---- through real master and daemon processes ---------------------------------------------

SIZE = 5000
SLOW_BEAT = ("--heartbeat-interval", "3s", "--node-ttl", "60s")


def _send_commit(sock, commit):
    body = commit.SerializeToString()
    sock.sendall(data_frames.encode_client_commit(7, len(body)) + body)
    status, _, msg_len, _, length = data_frames.REPLY.unpack(
        data_frames.recv_exact(sock, data_frames.REPLY.size))
    message = data_frames.recv_exact(sock, msg_len).decode() if msg_len else ""
    text = data_frames.recv_exact(sock, length).decode() if length else ""
    return status, message, dict(line.split("\t", 1) for line in text.splitlines())


def _commit_of(keys, targets, value, batch):
    return master_pb2.ClientCommit(
        keys=keys, segment_ids=[t.segment_id for t in targets],
        offsets=[t.offset for t in targets], sizes=[t.length for t in targets],
        checksums=[checksum(memoryview(value))] * len(keys), batch_capability=batch)


def test_a_daemon_applies_a_batch_commit_only_when_its_mac_binds_every_entry():
    master = master_process(*SLOW_BEAT)
    port = master.port
    daemons = [daemon_process(master, "--dram", "16MiB") for _ in range(2)]
    client = None
    socks = []
    try:
        with kvstore.connect(master.address, timeout_s=10) as store:
            store.put("anchor", b"a" * SIZE)
        client, _ = connect_master(master.address)
        value = payload(SIZE, seed=21)
        keys = ["b/0", "b/1", "b/2"]
        slots = client.put_start(keys, [SIZE] * 3, client_id="raw-writer", replicas=2)
        assert slots.client_commit
        assert set(slots.node_capabilities) == {t.node_id for t in slots[0]}
        tcp = TcpTransport()
        try:
            for targets in slots:
                for target in targets:
                    tcp.write(target, memoryview(value), timeout_s=10)
        finally:
            tcp.close()
        address = {d.address: d for d in daemons}
        by_node = {}
        for targets in slots:
            for target in targets:
                by_node.setdefault(target.node_id, []).append(target)
        (node_a, targets_a), (node_b, targets_b) = by_node.items()
        sock_a = data_plane(targets_a[0].data_addr)
        sock_b = data_plane(targets_b[0].data_addr)
        socks = [sock_a, sock_b]
        assert set(address) >= {targets_a[0].data_addr, targets_b[0].data_addr}
        batch_a = slots.node_capabilities[node_a]
        # a tampered entry: every entry refused, none applied
        tampered = list(targets_a)
        tampered[1] = tampered[1]._replace(offset=tampered[2].offset)
        status, _, refused = _send_commit(sock_a, _commit_of(keys, tampered, value, batch_a))
        assert status == Status.OK and set(refused) == {"0", "1", "2"}
        assert "does not verify" in refused["1"]
        # an entry dropped (a commit of part of the batch needs the per-entry capabilities)
        status, _, refused = _send_commit(sock_a, _commit_of(keys[:2], targets_a[:2], value,
                                                             batch_a))
        assert set(refused) == {"0", "1"} and "for 3 entries" in refused["0"]
        # node a's batch replayed against node b, for node b's own ranges
        status, _, refused = _send_commit(sock_b, _commit_of(keys, targets_b, value, batch_a))
        assert set(refused) == {"0", "1", "2"} and "does not verify" in refused["0"]
        # the real commits: every entry applied on both nodes
        for sock, node, targets in ((sock_a, node_a, targets_a), (sock_b, node_b, targets_b)):
            status, message, refused = _send_commit(
                sock, _commit_of(keys, targets, value, slots.node_capabilities[node]))
            assert (status, refused) == (Status.OK, {}), message
        total = checksum(memoryview(value))
        assert client.put_end(keys, [total] * 3, client_id="raw-writer",
                              client_committed=True) == [None] * 3
        client.close()
        client = None
        # a master restarted from the daemons' inventories serves every committed key
        master.kill()
        master.close()
        master = master_process(*SLOW_BEAT, port=port)
        wait_adopted(master, keys[-1])
        with kvstore.connect(master.address, timeout_s=10) as store:
            assert store.batch_get(keys) == [value] * 3
    finally:
        for sock in socks:
            sock.close()
        if client is not None:
            client.close()
        for daemon in daemons:
            daemon.close()
        master.close()


def test_an_older_client_gets_no_batch_capability_and_commits_per_entry():
    with master_process(*SLOW_BEAT) as master:
        with daemon_process(master, "--dram", "16MiB"):
            client, _ = connect_master(master.address)
            try:
                slots = client.put_start(["old/0"], [SIZE], client_id="old",
                                         batch_capabilities=False)
                assert slots.client_commit and slots.node_capabilities == {}
                assert slots[0][0].capability
            finally:
                client.close()
            # and a batch put of this client commits through the batch capability
            with kvstore.connect(master.address, timeout_s=10, transport="tcp") as store:
                values = [payload(SIZE, seed=i) for i in range(4)]
                store.batch_put([f"new/{i}" for i in range(4)], values)
                assert store.batch_get([f"new/{i}" for i in range(4)]) == values


def test_a_shm_writer_gets_only_the_batch_capability_and_its_put_survives_a_master_crash():
    from kvstore.transport.hostid import local_host_id

    master = master_process(*SLOW_BEAT)
    port = master.port
    daemon = daemon_process(master, "--dram", "16MiB")
    try:
        client, _ = connect_master(master.address)
        try:
            mine = client.put_start(["shm/probe"], [SIZE], client_id="probe",
                                    shm_write_host_id=local_host_id())
            elsewhere = client.put_start(["shm/probe2"], [SIZE], client_id="probe",
                                         shm_write_host_id="another-host")
            assert mine[0][0].capability == b"" and mine.node_capabilities
            assert elsewhere[0][0].capability and elsewhere.node_capabilities
            client.put_revoke(["shm/probe"], client_id="probe")
            client.put_revoke(["shm/probe2"], client_id="probe")
        finally:
            client.close()
        keys = [f"shm/{i}" for i in range(16)]
        values = [payload(SIZE, seed=40 + i) for i in range(16)]
        with kvstore.connect(master.address, timeout_s=10, transport="shm") as store:
            store.batch_put(keys, values)
        master.kill()
        master.close()
        master = master_process(*SLOW_BEAT, port=port)
        wait_adopted(master, keys[-1])
        with kvstore.connect(master.address, timeout_s=10) as store:
            assert store.batch_get(keys) == values
    finally:
        daemon.close()
        master.close()


def test_a_writer_without_a_replica_capability_commits_only_a_whole_batch():
    from kvstore.client.writer import _committable
    from kvstore.transport.base import Target

    batch = _issue()             # 3 entries
    bare = [[Target("node-a", "h", "a:1", "dram-0", "shm", 64 * i, 64)] for i in range(3)]
    assert _committable(bare, [0, 1, 2], {"node-a": batch})
    assert not _committable(bare, [0, 2], {"node-a": batch})      # a write failed
    assert not _committable(bare, [0, 1, 2], {})                   # no batch at all
    own = [[t[0]._replace(capability=b"cap")] for t in bare]
    assert _committable(own, [0, 2], {"node-a": batch})
