"""NIXL writes are capability-checked (issue 14): before a one-sided NIXL WRITE the nixl
transport asks the daemon (CHECK_WRITE on its data plane) and writes only the ranges the
daemon allowed; a refused write changes nothing stored and its error names the key.

Real processes: one master and one ``kvstore daemon --nixl`` on loopback; the writer is the
client's own transfer layer over the nixl transport, or the data-plane protocol itself.
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from client_cluster import payload
from servers import ServerProcess

import kvstore
from kvstore import AuthenticationError, TransferError
from kvstore import capability
from kvstore._deadline import Deadline
from kvstore.client.checksum import checksum
from kvstore.client.transfer import Transfers
from kvstore.rpc import grpc_client
from kvstore.transport import data_frames, make_transports, nixl_installed
from kvstore.transport.data_frames import Op, Status

pytestmark = pytest.mark.skipif(not nixl_installed(), reason="NIXL is not installed "
                                "(make test installs it: requirements-nixl.txt)")
TIMEOUT_S = 20.0
VICTIM_BYTES = 100_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def master():
    with ServerProcess(["master", "--port", "0"]) as master:
        with ServerProcess(["daemon", "--master", master.address, "--dram", "64MiB", "--nixl",
                            "--node-id", "nixl-guarded", "--metrics-port",
                            str(METRICS_PORT)]):
            yield master


@pytest.fixture()
def store(master):
    with kvstore.connect(master.address, transport="nixl") as store:
        yield store


@pytest.fixture()
def client(master):
    with grpc_client(master.address) as client:
        yield client


def replica_of(client, key: str):
    (replica_set,) = client.get_replicas([key])
    return replica_set.targets[0]


def nixl_write(master, items, token: str | None = None) -> dict:
    """Write (index, key, target, bytes) items through the client's transfer layer over a
    fresh nixl transport; index -> error of the failed ones."""
    with grpc_client(master.address) as client:
        published = {n.node_id: n.nixl_metadata for n in client.list_nodes()}
    transfers = Transfers(make_transports("nixl", token=token, nodes=lambda: published))
    try:
        return transfers.write([(i, key, target, memoryview(data))
                                for i, key, target, data in items],
                               deadline=Deadline.after(TIMEOUT_S))
    finally:
        transfers.close()


def metric(name: str) -> float:
    """A counter of the module daemon's /metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics",
                                  timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the daemon's metrics")


def test_put_and_get_over_nixl_are_checked_and_work(store, master):
    before = metric("kvstore_daemon_write_checks_total")
    value = payload(3 * VICTIM_BYTES, 1)
    store.put("checked", value)
    assert store.stats()["transfers"]["nixl"]["num_writes"] == 1
    assert store.get("checked", verify=True) == value
    keys = [f"checked-{i}" for i in range(5)]
    assert store.batch_put(keys, [payload(4096, 10 + i) for i in range(5)]) == [None] * 5
    assert metric("kvstore_daemon_write_checks_total") == before + 6


def test_overwrite_of_committed_object_with_another_ranges_capability_is_refused(
        store, client, master):
    value = payload(VICTIM_BYTES, 2)
    store.put("victim", value)
    victim = replica_of(client, "victim")
    (targets,) = client.put_start(["attacker"], [VICTIM_BYTES], client_id="attacker")
    aimed = targets[0]._replace(offset=victim.offset)   # my capability, the victim's range
    failures = nixl_write(master, [(0, "attacker", aimed, b"\xee" * VICTIM_BYTES)])
    error = failures[0]
    assert isinstance(error, TransferError)
    assert error.keys == ["attacker"]
    assert "'attacker'" in str(error) and "CAPABILITY_REFUSED" in str(error)
    assert "nixl-guarded" in str(error)
    assert store.get("victim", verify=True) == value
    client.put_revoke(["attacker"], client_id="attacker")


def test_write_without_or_with_a_forged_capability_is_refused(store, client, master):
    value = payload(VICTIM_BYTES, 3)
    store.put("victim-2", value)
    victim = replica_of(client, "victim-2")
    forged = capability.issue(b"\x00" * capability.SECRET_BYTES, victim.node_id,
                              victim.segment_id, victim.offset, VICTIM_BYTES, "victim-2",
                              "cluster", int(time.time() * 1000) + 60_000, 0)
    failures = nixl_write(master, [
        (0, "bare", victim._replace(capability=b""), b"\xee" * VICTIM_BYTES),
        (1, "forged", victim._replace(capability=forged), b"\xee" * VICTIM_BYTES)])
    assert "no write capability" in str(failures[0]) and failures[0].keys == ["bare"]
    assert "does not verify" in str(failures[1]) and failures[1].keys == ["forged"]
    assert store.get("victim-2", verify=True) == value


def test_capability_replayed_after_the_put_ended_is_refused(store, client, master):
    (targets,) = client.put_start(["replayed"], [VICTIM_BYTES], client_id="w")
    target = targets[0]
    value = payload(VICTIM_BYTES, 4)
    assert nixl_write(master, [(0, "replayed", target, value)]) == {}
    assert client.put_end(["replayed"], [checksum(value)], client_id="w") == [None]
    failures = nixl_write(master, [(0, "replayed", target, b"\xee" * VICTIM_BYTES)])
    assert "RANGE_COMMITTED" in str(failures[0]) and failures[0].keys == ["replayed"]
    assert store.get("replayed", verify=True) == value


def test_one_refused_range_fails_only_its_key_in_a_batch(store, client, master):
    value = payload(VICTIM_BYTES, 5)
    store.put("victim-3", value)
    victim = replica_of(client, "victim-3")
    keys = ["ok-0", "bad", "ok-1"]
    slots = client.put_start(keys, [VICTIM_BYTES] * 3, client_id="w")
    good = [payload(VICTIM_BYTES, 50 + i) for i in range(3)]
    items = [(0, "ok-0", slots[0][0], good[0]),
             (1, "bad", slots[1][0]._replace(offset=victim.offset), b"\xee" * VICTIM_BYTES),
             (2, "ok-1", slots[2][0], good[2])]
    failures = nixl_write(master, items)
    assert list(failures) == [1] and failures[1].keys == ["bad"]
    assert client.put_end(["ok-0", "ok-1"], [checksum(good[0]), checksum(good[2])],
                          client_id="w") == [None, None]
    client.put_revoke(["bad"], client_id="w")
    assert store.get("ok-0", verify=True) == good[0]
    assert store.get("ok-1", verify=True) == good[2]
    assert store.get("victim-3", verify=True) == value


def test_wrong_token_for_the_data_plane_is_refused():
    with ServerProcess(["master", "--port", "0", "--token", "sesame"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "64MiB", "--nixl",
                           "--node-id", "nixl-token", "--token", "sesame"]):
        with kvstore.connect(master.address, token="sesame", transport="nixl") as store:
            value = payload(VICTIM_BYTES, 6)
            store.put("kept", value)
            with grpc_client(master.address, token="sesame") as client:
                (targets,) = client.put_start(["intruder"], [VICTIM_BYTES], client_id="w")
                transfers = Transfers(make_transports("nixl", token="wrong", nodes=lambda: {
                    n.node_id: n.nixl_metadata for n in client.list_nodes()}))
                try:
                    failures = transfers.write(
                        [(0, "intruder", targets[0], memoryview(b"\xee" * VICTIM_BYTES))],
                        deadline=Deadline.after(TIMEOUT_S))
                finally:
                    transfers.close()
                assert isinstance(failures[0], AuthenticationError)
                assert failures[0].keys == ["intruder"]
            assert store.get("kept", verify=True) == value


def test_refused_check_leaves_the_connection_usable(store, client):
    """Wire level: a refused CHECK_WRITE is answered and the connection serves the next
    request (no payload follows a check, unlike a refused WRITE)."""
    value = payload(VICTIM_BYTES, 7)
    store.put("victim-4", value)
    victim = replica_of(client, "victim-4")
    host, port = victim.data_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.encode_hello(None))
        assert read_reply(sock)[0] == Status.OK
        segment = victim.segment_id.encode()
        sock.sendall(data_frames.encode_request(Op.CHECK_WRITE, segment, 1, victim.offset,
                                                VICTIM_BYTES))
        status, message = read_reply(sock)
        assert status == Status.CAPABILITY_REFUSED and "no write capability" in message
        sock.sendall(data_frames.encode_request(Op.CHECK_WRITE, segment, 2, 1 << 40, 10))
        assert read_reply(sock)[0] == Status.OUT_OF_RANGE
        sock.sendall(data_frames.encode_request(Op.READ, segment, 3, victim.offset,
                                                VICTIM_BYTES, victim.capability))
        assert read_reply(sock)[0] == Status.OK
        assert data_frames.recv_exact(sock, VICTIM_BYTES) == value
    assert store.get("victim-4", verify=True) == value


def read_reply(sock: socket.socket) -> tuple[Status, str]:
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, _, msg_len, _, _ = data_frames.REPLY.unpack(header)
    return Status(status), data_frames.recv_exact(sock, msg_len).decode()


def test_daemon_without_write_capabilities_allows_every_range(master):
    """``--no-write-capabilities`` (older clients): the checks allow any range, as tcp does."""
    with ServerProcess(["daemon", "--master", master.address, "--dram", "16MiB", "--nixl",
                        "--node-id", "nixl-open", "--no-write-capabilities"]):
        with grpc_client(master.address) as client:
            node = next(n for n in client.list_nodes() if n.node_id == "nixl-open")
            segment = node.segments[0]
            from kvstore.transport.base import Target
            target = Target(node.node_id, node.host_id, node.data_addr, segment.segment_id,
                            segment.shm_name, 4096, 4096)
            data = np.arange(4096, dtype=np.uint32).astype(np.uint8)
            assert nixl_write(master, [(0, "free", target, data.tobytes())]) == {}
            with make_transports("tcp")[0] as tcp:
                out = np.zeros(4096, dtype=np.uint8)
                tcp.read_into(target, memoryview(out), timeout_s=TIMEOUT_S)
            assert np.array_equal(out, data)
            client.unregister_node("nixl-open")
