"""Capability-checked writes (issue 14): a daemon refuses every data-plane WRITE that does not
carry the master's capability for exactly that range, and every WRITE over an object
committed after its capability was issued; nothing stored changes and the refused client's
error names the key.

Real processes: one master and one daemon (tests/client_cluster.py), the attacker speaking
the data-plane protocol itself or through the client's own transfer layer.
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from client_cluster import Cluster, payload

from kvstore import TransferError
from kvstore import capability
from kvstore._deadline import Deadline
from kvstore.client.checksum import checksum
from kvstore.client.transfer import Transfers
from kvstore.rpc import grpc_client
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Op, Status
from kvstore.transport.tcp import TcpTransport

TIMEOUT_S = 10.0
VICTIM_BYTES = 100_000
OVERWRITE_BYTES = 1 << 20
# how long a WRITE header waits for a refusal before its payload is sent (only a speed-up:
# a later refusal is read the same way)
REFUSAL_WAIT_S = 0.2


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=1, dram="64MiB")
    yield cluster
    cluster.close()


@pytest.fixture()
def store(cluster):
    with cluster.connect(transport="tcp") as store:
        yield store


@pytest.fixture()
def master(cluster):
    with grpc_client(cluster.address) as client:
        yield client


def replica_of(master, key):
    (replica_set,) = master.get_replicas([key])
    return replica_set.targets[0]


def raw_write(target, offset: int, data: bytes, cap: bytes = b"") -> tuple[Status, str]:
    """One WRITE frame on a fresh connection; the daemon's (status, message).

    The header goes first: a refusal is answered before the payload is read (the daemon
    then closes), so the payload is sent only when no reply came first."""
    host, port = target.data_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.encode_hello(None))
        assert read_reply(sock)[0] == Status.OK
        sock.sendall(data_frames.encode_request(Op.WRITE, target.segment_id.encode(), 1,
                                                offset, len(data), cap))
        readable, _, _ = select.select([sock], [], [], REFUSAL_WAIT_S)
        if not readable:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass   # refused after all: the reply is already in our receive buffer
        return read_reply(sock)


def read_reply(sock: socket.socket) -> tuple[Status, str]:
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, _, msg_len, _, _ = data_frames.REPLY.unpack(header)
    return Status(status), data_frames.recv_exact(sock, msg_len).decode()


def put_victim(store, key: str, seed: int) -> bytes:
    value = payload(VICTIM_BYTES, seed)
    store.put(key, value)
    return value


def test_overwrite_of_committed_object_without_capability_is_refused(store, master):
    value = put_victim(store, "victim-0", 1)
    # the put itself wrote over tcp with the capabilities of a fast-path PutStart reply
    assert store.stats()["metadata"] == "fast"
    assert store.stats()["transfers"]["tcp"]["num_writes"] == 1
    target = replica_of(master, "victim-0")
    status, message = raw_write(target, 0, b"\xee" * OVERWRITE_BYTES)
    assert status == Status.CAPABILITY_REFUSED, message
    assert "no write capability" in message
    assert store.get("victim-0") == value
    assert store.get("victim-0", verify=True) == value


def test_forged_capability_is_refused(store, master):
    value = put_victim(store, "victim-forged", 2)
    target = replica_of(master, "victim-forged")
    forged = capability.issue(b"\x00" * capability.SECRET_BYTES, target.node_id,
                              target.segment_id, target.offset, VICTIM_BYTES,
                              "victim-forged", "cluster", int(time.time() * 1000) + 60_000, 0)
    status, message = raw_write(target, target.offset, b"\xee" * VICTIM_BYTES, forged)
    assert status == Status.CAPABILITY_REFUSED
    assert "does not verify" in message
    assert store.get("victim-forged") == value


def test_refused_client_write_names_the_key(store, master):
    """Through the client's own transfer layer: a write aimed at a committed object's range
    with a capability for another range fails with an error naming the key, and the object
    is intact."""
    value = put_victim(store, "victim-1", 3)
    victim = replica_of(master, "victim-1")
    (targets,) = master.put_start(["attacker-1"], [VICTIM_BYTES], client_id="attacker")
    mine = targets[0]
    aimed = mine._replace(offset=victim.offset)   # my capability, the victim's range
    transfers = Transfers([TcpTransport()])
    try:
        failures = transfers.write([(0, "attacker-1", aimed, memoryview(b"\xee" * VICTIM_BYTES))],
                                   deadline=Deadline.after(TIMEOUT_S))
    finally:
        transfers.close()
    error = failures[0]
    assert isinstance(error, TransferError)
    assert error.keys == ["attacker-1"]
    assert "attacker-1" in str(error) and "CAPABILITY_REFUSED" in str(error)
    assert f"not [{victim.offset}, +{VICTIM_BYTES})" in str(error)
    assert store.get("victim-1") == value
    master.put_revoke(["attacker-1"], client_id="attacker")


def test_capability_allows_exactly_its_range(store, master):
    """Inside its range (a stripe) a capability works; past either end it is refused."""
    (targets,) = master.put_start(["ranged"], [VICTIM_BYTES], client_id="w")
    target = targets[0]
    value = payload(VICTIM_BYTES, 4)
    half = VICTIM_BYTES // 2
    assert raw_write(target, target.offset, value[:half], target.capability)[0] == Status.OK
    assert raw_write(target, target.offset + half, value[half:],
                     target.capability)[0] == Status.OK
    status, message = raw_write(target, target.offset + half, b"\xee" * (half + 64),
                                target.capability)
    assert status == Status.CAPABILITY_REFUSED and "allows" in message
    if target.offset >= 64:
        status, _ = raw_write(target, target.offset - 64, b"\xee" * 128, target.capability)
        assert status == Status.CAPABILITY_REFUSED
    assert master.put_end(["ranged"], [checksum(value)], client_id="w") == [None]
    assert store.get("ranged") == value


def test_capability_replayed_after_the_put_ended_is_refused(store, master):
    (targets,) = master.put_start(["replayed"], [VICTIM_BYTES], client_id="w")
    target = targets[0]
    value = payload(VICTIM_BYTES, 5)
    assert raw_write(target, target.offset, value, target.capability)[0] == Status.OK
    assert master.put_end(["replayed"], [checksum(value)], client_id="w") == [None]
    # durable commit: the daemon knew of the commit before PutEnd answered, so the very
    # first replay is refused (no window)
    status, message = raw_write(target, target.offset, value, target.capability)
    assert status == Status.RANGE_COMMITTED, message
    assert "replayed" in message
    status, _ = raw_write(target, target.offset, b"\xee" * VICTIM_BYTES, target.capability)
    assert status == Status.RANGE_COMMITTED
    assert store.get("replayed") == value


def test_capability_of_a_removed_object_cannot_overwrite_its_successor(store, master):
    """A capability kept past its object's removal: the master allocates the range again,
    the new object is committed, the old capability is refused over it."""
    (targets,) = master.put_start(["first"], [VICTIM_BYTES], client_id="w")
    old = targets[0]
    master.put_revoke(["first"], client_id="w")
    value = put_victim(store, "successor", 6)
    new = replica_of(master, "successor")
    if new.offset != old.offset:
        pytest.skip("the master placed the successor elsewhere")
    status, message = raw_write(old, old.offset, value, old.capability)
    assert status == Status.RANGE_COMMITTED, message
    assert store.get("successor") == value


def test_malformed_capability_is_refused_and_daemon_keeps_serving(store, master):
    value = put_victim(store, "victim-2", 7)
    target = replica_of(master, "victim-2")
    for blob in (b"x", b"\x01" * 60, b"\x09" + b"\x00" * 80):
        status, message = raw_write(target, target.offset, b"\xee" * 4096, blob)
        assert status == Status.CAPABILITY_REFUSED and "malformed" in message
    assert store.get("victim-2") == value
    store.put("after-attacks", b"still works")
    assert store.get("after-attacks") == b"still works"


def test_expired_capability_is_refused():
    c = Cluster(num_daemons=1, dram="16MiB", master_args=("--pending-timeout", "1s"))
    try:
        master = grpc_client(c.address)
        (targets,) = master.put_start(["late"], [4096], client_id="w")
        target = targets[0]
        expiry_ms = int.from_bytes(target.capability[17:25], "little")
        while time.time() * 1000 <= expiry_ms:
            time.sleep((expiry_ms - time.time() * 1000) / 1000 + 0.01)
        status, message = raw_write(target, target.offset, b"\x01" * 4096, target.capability)
        assert status == Status.CAPABILITY_REFUSED
        assert "expired" in message
        master.close()
    finally:
        c.close()


def test_capability_of_another_registration_is_refused():
    """A daemon that re-registers gets a new secret: capabilities issued before stop
    verifying."""
    c = Cluster(num_daemons=1, dram="16MiB")
    try:
        master = grpc_client(c.address)
        (targets,) = master.put_start(["pre-restart"], [4096], client_id="w")
        target = targets[0]
        node_id = target.node_id
        # a master restart has the same effect; here the master forgets the node
        master.unregister_node(node_id)
        c.wait_nodes(1)
        # NOTE: the daemon takes its new secret once the registration reply reaches it
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            status, message = raw_write(target, target.offset, b"\x01" * 4096,
                                        target.capability)
            if status != Status.OK or time.monotonic() > deadline:
                break
        assert status == Status.CAPABILITY_REFUSED
        assert "does not verify" in message
        master.close()
    finally:
        c.close()
