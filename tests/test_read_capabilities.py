"""Read capabilities (issue 14): a daemon whose master issues them refuses every data-plane
READ that does not carry the master's read capability for that range (GetReplicas hands one
out per replica), so a tenant holding the data-plane token cannot READ another tenant's
object by range over tcp; missing, forged, expired and out-of-range capabilities are refused
with a clear reason, the connection stays usable and nothing stored changes.

Real processes: a master with two tenants and one daemon (tests/client_cluster.py); the
attacker speaks the data-plane protocol itself, with the tenant's data-plane token.
"""

from __future__ import annotations

import socket
import time

import pytest
from client_cluster import Cluster, payload

import kvstore
from kvstore import capability
from kvstore.rpc import grpc_client
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status
from kvstore.transport.hostid import local_host_id

TIMEOUT_S = 10.0
CLUSTER_TOKEN = "cluster-secret"


@pytest.fixture(scope="module")
def cluster(two_tenants_file):
    cluster = Cluster(num_daemons=1, dram="64MiB", token=CLUSTER_TOKEN,
                      master_args=("--tenants", str(two_tenants_file)))
    yield cluster
    cluster.close()


def _master(cluster, token: str):
    return grpc_client(cluster.address, token=token)


def _data_token(cluster, token: str) -> str:
    with _master(cluster, token) as master:
        return master.stats().data_token or token


class RawReader:
    """One data-plane connection that sends READ frames (with any capability)."""

    def __init__(self, target, token: str):
        host, port = target.data_addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        self.sock.sendall(data_frames.encode_hello(token))
        assert self._reply()[0] == Status.OK
        self.request_id = 0

    def read(self, target, offset: int, length: int, cap: bytes) -> tuple[Status, str, bytes]:
        self.request_id += 1
        self.sock.sendall(data_frames.encode_request(
            Op.READ, target.segment_id.encode(), self.request_id, offset, length, cap))
        status, message, num_bytes = self._reply()
        data = data_frames.recv_exact(self.sock, num_bytes) if status == Status.OK else b""
        return status, message, data

    def _reply(self) -> tuple[Status, str, int]:
        header = data_frames.recv_exact(self.sock, data_frames.REPLY.size)
        status, _, msg_len, _, length = data_frames.REPLY.unpack(header)
        return Status(status), data_frames.recv_exact(self.sock, msg_len).decode(), length

    def close(self) -> None:
        self.sock.close()


def _replica(cluster, token: str, key: str, **options):
    with _master(cluster, token) as master:
        (replica_set,) = master.get_replicas([key], **options)
    return replica_set.targets[0]


def test_tcp_gets_of_both_tenants_carry_and_pass_their_capabilities(cluster):
    value_a, value_b = payload(90_000, 1), payload(3 << 20, 2)
    with kvstore.connect(cluster.address, token="alpha-secret", transport="tcp") as a, \
            kvstore.connect(cluster.address, token="beta-secret", transport="tcp") as b:
        a.put("doc/a", value_a)
        b.put("doc/b", value_b)     # 3 MiB: a striped read, each stripe with the capability
        assert a.get("doc/a") == value_a
        assert b.get("doc/b") == value_b
        assert b.batch_get(["doc/b", "doc/b"]) == [value_b, value_b]   # pipelined READs
        assert a.stats()["transfers"]["tcp"]["num_errors"] == 0
        assert b.stats()["transfers"]["tcp"]["num_errors"] == 0
    target = _replica(cluster, "alpha-secret", "doc/a")
    assert target.capability, "the master issues a read capability for a tcp reader"


def test_a_tenant_cannot_read_another_tenants_object_by_range(cluster):
    secret_value = payload(40_000, 3)
    with kvstore.connect(cluster.address, token="beta-secret") as b, \
            kvstore.connect(cluster.address, token="alpha-secret") as a:
        b.put("vault/secret", secret_value)
        a.put("mine", payload(40_000, 4))
    victim = _replica(cluster, "beta-secret", "vault/secret")
    own = _replica(cluster, "alpha-secret", "mine")
    assert victim.segment_id == own.segment_id
    reader = RawReader(victim, _data_token(cluster, "alpha-secret"))
    try:
        # no capability: what a tenant with only the data-plane token could send
        status, message, data = reader.read(victim, victim.offset, victim.length, b"")
        assert status == Status.CAPABILITY_REFUSED and not data
        assert "no read capability" in message
        # its own object's capability, for the other tenant's range
        status, message, _ = reader.read(victim, victim.offset, victim.length, own.capability)
        assert status == Status.CAPABILITY_REFUSED
        assert f"allows [{own.offset}, +{own.length})" in message
        # forged: its own capability with the range bytes changed (the MAC no longer fits)
        forged = bytearray(own.capability)
        forged[1:9] = victim.offset.to_bytes(8, "little")
        status, message, _ = reader.read(victim, victim.offset, victim.length, bytes(forged))
        assert status == Status.CAPABILITY_REFUSED and "does not verify" in message
        # garbage
        status, message, _ = reader.read(victim, victim.offset, victim.length, b"\x01" * 20)
        assert status == Status.CAPABILITY_REFUSED and "malformed" in message
        # the connection survived every refusal; its own range reads fine
        status, message, data = reader.read(own, own.offset, own.length, own.capability)
        assert status == Status.OK, message
        assert data == payload(40_000, 4)
        # a part of its own range (a stripe) is allowed, a byte past it is not
        status, _, data = reader.read(own, own.offset + 100, 1000, own.capability)
        assert status == Status.OK and data == payload(40_000, 4)[100:1100]
        status, _, _ = reader.read(own, own.offset, own.length + 1, own.capability)
        assert status == Status.CAPABILITY_REFUSED
    finally:
        reader.close()
    with kvstore.connect(cluster.address, token="beta-secret") as b:
        assert b.get("vault/secret", verify=True) == secret_value   # nothing changed


def test_write_capability_is_no_read_capability_of_a_committed_object(cluster):
    with _master(cluster, "alpha-secret") as master:
        (slots,) = master.put_start(["pending/x"], [5000], client_id="attacker")
        target = slots[0]
        reader = RawReader(target, _data_token(cluster, "alpha-secret"))
        try:
            # a writer may read back the range it is writing (still PENDING) ...
            status, message, _ = reader.read(target, target.offset, target.length,
                                             target.capability)
            assert status == Status.OK, message
        finally:
            reader.close()
        master.put_revoke(["pending/x"], client_id="attacker")
    with kvstore.connect(cluster.address, token="beta-secret") as b:
        b.put("committed/y", payload(5000, 5))
    victim = _replica(cluster, "beta-secret", "committed/y")
    with _master(cluster, "alpha-secret") as master:
        (slots,) = master.put_start(["pending/z"], [5000], client_id="attacker")
        write_cap = slots[0].capability
        master.put_revoke(["pending/z"], client_id="attacker")
    reader = RawReader(victim, _data_token(cluster, "alpha-secret"))
    try:
        # ... but a write capability never opens another range
        status, message, _ = reader.read(victim, victim.offset, victim.length, write_cap)
        assert status == Status.CAPABILITY_REFUSED, message
    finally:
        reader.close()


def test_expired_read_capability_is_refused(cluster):
    with kvstore.connect(cluster.address, token="alpha-secret") as a:
        a.put("short-lived", payload(10_000, 6))
    target = _replica(cluster, "alpha-secret", "short-lived", lease_ttl_s=0.2)
    expiry_ms = capability._FIXED.unpack_from(target.capability)[3]
    reader = RawReader(target, _data_token(cluster, "alpha-secret"))
    try:
        status, message, _ = reader.read(target, target.offset, target.length,
                                         target.capability)
        assert status == Status.OK or "expired" in message   # valid until its expiry
        while time.time() * 1000 <= expiry_ms + 5:           # NOTE: one clock: this host's
            time.sleep(0.05)
        status, message, _ = reader.read(target, target.offset, target.length,
                                         target.capability)
        assert status == Status.CAPABILITY_REFUSED and "expired" in message
    finally:
        reader.close()


def test_shm_readers_get_no_capabilities_for_same_host_replicas(cluster):
    with kvstore.connect(cluster.address, token="alpha-secret") as a:
        a.put("local", payload(1000, 7))
        assert a.get("local") == payload(1000, 7)   # over shm, without a capability
    with _master(cluster, "alpha-secret") as master:
        (shm_set,), _ = master.get_replicas_leased(["local"], client_host_id=local_host_id(),
                                                   shm_reads=True)
        (tcp_set,), _ = master.get_replicas_leased(["local"], client_host_id=local_host_id())
    assert shm_set.targets[0].shm_name and shm_set.targets[0].capability == b""
    assert tcp_set.targets[0].capability


def test_read_and_write_capabilities_do_not_verify_as_each_other():
    secret = capability.new_secret()
    read_cap = capability.issue_read(secret, "n1", "s1", 64, 100, "k", "cluster", 2**62)
    write_cap = capability.issue(secret, "n1", "s1", 64, 100, "k", "cluster", 2**62, 0)
    assert capability.check_read(secret, "n1", "s1", read_cap, 64, 100, "cluster", 0)
    with pytest.raises(capability.CapabilityRefused, match="does not verify"):
        capability.check(secret, "n1", "s1", read_cap, 64, 100, "cluster", 0)
    with pytest.raises(capability.CapabilityRefused, match="read capability does not verify"):
        capability.check_read(secret, "n1", "s1", write_cap, 64, 100, "cluster", 0)
    with pytest.raises(capability.CapabilityRefused, match="another node|does not verify"):
        capability.check_read(secret, "n2", "s1", read_cap, 64, 100, "cluster", 0)
    with pytest.raises(capability.CapabilityRefused, match="reader 'cluster'"):
        capability.check_read(secret, "n1", "s1", read_cap, 64, 100, "tenant-x", 0)


def test_daemon_without_read_checks_serves_unflagged_reads():
    """``--no-read-capabilities`` (clients older than read capabilities): the master issues
    none for the node, and a READ without one is served as before."""
    cluster = Cluster(num_daemons=1, dram="16MiB", daemon_args=("--no-read-capabilities",))
    try:
        with cluster.connect(transport="tcp") as store:
            store.put("old-style", payload(2000, 8))
            assert store.get("old-style") == payload(2000, 8)
        with grpc_client(cluster.address) as master:
            (replica_set,) = master.get_replicas(["old-style"])
        target = replica_set.targets[0]
        assert target.capability == b""
        reader = RawReader(target, None)
        try:
            status, message, data = reader.read(target, target.offset, target.length, b"")
            assert status == Status.OK, message
            assert data == payload(2000, 8)
        finally:
            reader.close()
    finally:
        cluster.close()
