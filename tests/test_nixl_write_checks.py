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
from kvstore.transport import check_batch, data_frames, make_transports, nixl_installed, \
    nixl_meta
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


def as_old_daemon(data: bytes, node_id: str) -> bytes:
    """A node's NIXL metadata as a daemon older than CHECK_WRITES publishes it."""
    info = nixl_meta.unpack(data, node_id)
    if info is None:
        return data
    return nixl_meta.pack(nixl_meta.NodeNixlInfo(info.agent_name, info.segments,
                                                 info.agent_metadata, batched_checks=False))


def nixl_write(master, items, token: str | None = None, *, old_daemon: bool = False) -> dict:
    """Write (index, key, target, bytes) items through the client's transfer layer over a
    fresh nixl transport; index -> error of the failed ones. ``old_daemon``: the transport
    sees the daemons' metadata without ``batched_checks`` (one CHECK_WRITE per range)."""
    with grpc_client(master.address) as client:
        published = {n.node_id: (as_old_daemon(n.nixl_metadata, n.node_id) if old_daemon
                                 else n.nixl_metadata) for n in client.list_nodes()}
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
    requests_before = metric("kvstore_daemon_write_check_requests_total")
    value = payload(3 * VICTIM_BYTES, 1)
    store.put("checked", value)
    assert store.stats()["transfers"]["nixl"]["num_writes"] == 1
    assert store.get("checked", verify=True) == value
    keys = [f"checked-{i}" for i in range(5)]
    assert store.batch_put(keys, [payload(4096, 10 + i) for i in range(5)]) == [None] * 5
    assert metric("kvstore_daemon_write_checks_total") == before + 6
    # one CHECK_WRITES request per batch (this daemon advertises op 7), not one per range
    assert metric("kvstore_daemon_write_check_requests_total") == requests_before + 2


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


@pytest.mark.parametrize("old_daemon", [False, True], ids=["batched", "per-range"])
def test_one_refused_range_fails_only_its_key_in_a_batch(store, client, master, old_daemon):
    """Batched (one CHECK_WRITES) and, as to a daemon older than it, one CHECK_WRITE per range:
    the same per-range answers; the refused range's key is named and nothing of it lands."""
    tag = "old" if old_daemon else "new"
    value = payload(VICTIM_BYTES, 5)
    store.put(f"victim-3-{tag}", value)
    victim = replica_of(client, f"victim-3-{tag}")
    keys = [f"ok-0-{tag}", f"bad-{tag}", f"ok-1-{tag}"]
    slots = client.put_start(keys, [VICTIM_BYTES] * 3, client_id="w")
    good = [payload(VICTIM_BYTES, 50 + i) for i in range(3)]
    items = [(0, keys[0], slots[0][0], good[0]),
             (1, keys[1], slots[1][0]._replace(offset=victim.offset), b"\xee" * VICTIM_BYTES),
             (2, keys[2], slots[2][0], good[2])]
    requests_before = metric("kvstore_daemon_write_check_requests_total")
    failures = nixl_write(master, items, old_daemon=old_daemon)
    assert list(failures) == [1] and failures[1].keys == [keys[1]]
    assert repr(keys[1]) in str(failures[1]) and "CAPABILITY_REFUSED" in str(failures[1])
    assert metric("kvstore_daemon_write_check_requests_total") == \
        requests_before + (3 if old_daemon else 1)
    assert client.put_end([keys[0], keys[2]], [checksum(good[0]), checksum(good[2])],
                          client_id="w") == [None, None]
    client.put_revoke([keys[1]], client_id="w")
    assert store.get(keys[0], verify=True) == good[0]
    assert store.get(keys[2], verify=True) == good[2]
    assert store.get(f"victim-3-{tag}", verify=True) == value


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


def check_writes_request(request_id: int, ranges, count: int | None = None) -> bytes:
    (n, body), = check_batch.encode_ranges(ranges)
    return data_frames.REQUEST.pack(data_frames.REQUEST_MAGIC, Op.CHECK_WRITES, 0, 0,
                                    request_id, n if count is None else count,
                                    len(body)) + body


def test_check_writes_answers_each_range_in_one_reply(store, client):
    """Wire level: one CHECK_WRITES with an allowed range between two refused ones is
    answered by one reply listing only the refused ones (index, status, reason); the
    connection then serves the next request."""
    value = payload(VICTIM_BYTES, 8)
    store.put("victim-5", value)
    victim = replica_of(client, "victim-5")
    (targets,) = client.put_start(["fresh"], [VICTIM_BYTES], client_id="cluster")
    fresh = targets[0]
    host, port = victim.data_addr.rsplit(":", 1)
    segment = victim.segment_id.encode()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.encode_hello(None))
        assert read_reply(sock)[0] == Status.OK
        sock.sendall(check_writes_request(9, [
            (segment, victim.offset, VICTIM_BYTES, b""),
            (fresh.segment_id.encode(), fresh.offset, fresh.length, fresh.capability),
            (segment, 1 << 40, 10, fresh.capability),
            (b"no-such-segment", 0, 10, b"")]))
        header = data_frames.recv_exact(sock, data_frames.REPLY.size)
        status, _, msg_len, request_id, length = data_frames.REPLY.unpack(header)
        assert (status, msg_len, request_id) == (Status.OK, 0, 9)
        refused = check_batch.decode_refusals(data_frames.recv_exact(sock, length), 4)
        assert sorted(refused) == [0, 2, 3]
        assert refused[0][0] == Status.CAPABILITY_REFUSED
        assert "no write capability" in refused[0][1]
        assert refused[2][0] == Status.OUT_OF_RANGE
        assert refused[3][0] == Status.NO_SEGMENT
        sock.sendall(data_frames.encode_request(Op.READ, segment, 10, victim.offset,
                                                VICTIM_BYTES, victim.capability))
        assert read_reply(sock)[0] == Status.OK
        assert data_frames.recv_exact(sock, VICTIM_BYTES) == value
    client.put_revoke(["fresh"], client_id="cluster")
    assert store.get("victim-5", verify=True) == value


@pytest.mark.parametrize("frame", ["count", "truncated", "empty-segment"])
def test_malformed_check_writes_is_a_bad_frame(store, client, frame):
    """A CHECK_WRITES body that disagrees with its header, is cut short or names an empty
    segment id gets BAD_FRAME and a close; the daemon serves the next connection."""
    store.put(f"before-{frame}", payload(4096, 10))
    victim = replica_of(client, f"before-{frame}")
    segment = victim.segment_id.encode()
    if frame == "count":
        request = check_writes_request(1, [(segment, 0, 10, b"")], count=2)
    elif frame == "truncated":
        request = check_writes_request(1, [(segment, 0, 10, b"")])[:-3]
        request = request[:data_frames.REQUEST.size - 8] + \
            (len(request) - data_frames.REQUEST.size).to_bytes(8, "little") + \
            request[data_frames.REQUEST.size:]
    else:
        entry = check_batch.RANGE.pack(0, 0, 0, 10)
        request = data_frames.REQUEST.pack(data_frames.REQUEST_MAGIC, Op.CHECK_WRITES, 0, 0,
                                           1, 1, len(entry)) + entry
    host, port = victim.data_addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.sendall(data_frames.encode_hello(None))
        assert read_reply(sock)[0] == Status.OK
        sock.sendall(request)
        status, message = read_reply(sock)
        assert status == Status.BAD_FRAME and "CHECK_WRITES" in message
        assert sock.recv(1) == b""      # closed
    value = payload(4096, 9)
    store.put(f"after-{frame}", value)
    assert store.get(f"after-{frame}", verify=True) == value


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
