"""The master's framed-TCP metadata path against real ``kvstore master`` processes: the same
replies as gRPC for the same state, token, hostile frames, reconnects, metrics, and the
client's choice of path (metadata="auto" | "grpc" | "fast")."""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.request

import grpc
import pytest

import kvstore
from kvstore._errors import (AuthenticationError, ClosedError, ConfigError,
                             InvalidArgumentError, KeyNotFoundError, MasterUnavailableError)
from kvstore.master.config import MasterConfig
from kvstore.rpc import fast_frames as ff
from kvstore.rpc.methods import METHODS
from kvstore.v1 import master_pb2 as pb
from master_helpers import node_info
from raw_master import RawMaster
from servers import ServerProcess

TOKEN = "s3cret"


def _master(*flags: str) -> ServerProcess:
    return ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", *flags])


def _fast_port(server: ServerProcess, token: str | None = None) -> int:
    with RawMaster.over_grpc(server.address, token=token) as client:
        return client.call("Stats", pb.StatsRequest()).fast_port


@pytest.fixture(scope="module")
def master():
    with _master("--token", TOKEN) as server:
        yield server, _fast_port(server, TOKEN)


# -- same replies as gRPC -------------------------------------------------------------------

def _script():
    """(method, request) steps that use every verb, bad input included."""
    keys = [f"k{i}" for i in range(6)]
    return [
        ("RegisterNode", pb.RegisterNodeRequest(node=node_info("n1"))),
        ("RegisterNode", pb.RegisterNodeRequest(node=node_info("n2", host_id="host-b"))),
        ("Heartbeat", pb.HeartbeatRequest(node_id="n1")),
        ("PutStart", pb.PutStartRequest(keys=keys + [""], sizes=[1000] * 7, client_id="w",
                                        replicas=2)),
        ("PutEnd", pb.PutEndRequest(keys=keys[:5], client_id="w")),
        ("PutRevoke", pb.PutRevokeRequest(keys=keys[5:], client_id="w")),
        ("GetReplicas", pb.GetReplicasRequest(keys=keys + ["missing"], client_host_id="host-a",
                                              lease_ttl_ms=5000)),
        ("RenewLease", pb.RenewLeaseRequest(keys=keys[:2], lease_ttl_ms=6000)),
        ("Exists", pb.ExistsRequest(keys=keys + ["missing"])),
        ("Exists", pb.ExistsRequest(keys=["ok", ""])),                     # INVALID_ARGUMENT
        ("MatchPrefix", pb.MatchPrefixRequest(keys=["k0", "k1", "nope", "k2"])),
        ("Pin", pb.PinRequest(keys=["k2", "missing"], hard=True)),
        ("Pin", pb.PinRequest(keys=["k2"], ttl_ms=10 ** 12)),              # INVALID_ARGUMENT
        ("Remove", pb.RemoveRequest(keys=["k2", "k3", "missing"])),
        ("Unpin", pb.UnpinRequest(keys=["k2", "missing"])),
        ("RemovePrefix", pb.RemovePrefixRequest(prefix="k", force=True)),
        ("GetReplicas", pb.GetReplicasRequest(keys=["k0"], lease_ttl_ms=10 ** 9)),  # too long
        ("Stats", pb.StatsRequest()),
        ("ListNodes", pb.ListNodesRequest()),
        ("UnregisterNode", pb.UnregisterNodeRequest(node_id="n2")),
        ("UnregisterNode", pb.UnregisterNodeRequest(node_id="n2")),        # NOT_FOUND
        ("ReleaseLeases", pb.ReleaseLeasesRequest(lease_ids=[1, 2])),     # unknown: ignored
    ]


def _outcome(client, method, request):
    """The reply with fields that name the process or the instant cleared, or the error."""
    try:
        reply = client.call(method, request)
    except kvstore.KVStoreError as exc:
        return type(exc).__name__, str(exc)
    for name in ("master_id", "uptime_s", "fast_port", "lease_id"):   # lease ids are random
        if name in reply.DESCRIPTOR.fields_by_name:
            reply.ClearField(name)
    if method == "ListNodes":
        for node in reply.nodes:
            node.ClearField("last_heartbeat_age_s")
    return reply


def test_every_verb_answers_as_grpc_does_for_the_same_state():
    # Two masters driven through the same script, one over each path: same state, so the
    # replies (allocations and offsets included) and the errors must be identical.
    with _master() as over_grpc, _master() as over_fast:
        grpc_client = RawMaster.over_grpc(over_grpc.address)
        fast_client = RawMaster.over_fast("127.0.0.1", _fast_port(over_fast))
        try:
            num_errors = 0
            for method, request in _script():
                expected = _outcome(grpc_client, method, request)
                assert _outcome(fast_client, method, request) == expected, method
                num_errors += isinstance(expected, tuple)
            assert num_errors == 4  # the bad-input steps failed on both paths
        finally:
            grpc_client.close()
            fast_client.close()


# -- token ------------------------------------------------------------------------------------

def test_a_wrong_or_missing_token_is_refused(master):
    server, fast_port = master
    for token in ("wrong", None):
        with RawMaster.over_fast("127.0.0.1", fast_port, token=token) as client:
            with pytest.raises(AuthenticationError, match="UNAUTHENTICATED"):
                client.call("Stats", pb.StatsRequest())
    with RawMaster.over_fast("127.0.0.1", fast_port, token=TOKEN) as client:
        assert client.call("Stats", pb.StatsRequest()).fast_port == fast_port


# -- hostile frames ---------------------------------------------------------------------------

def _raw(fast_port: int, hello: bytes | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", fast_port), timeout=5)
    if hello is not None:
        sock.sendall(hello)
        status, _, _ = _read_reply(sock)
        assert status == ff.OK
    return sock


def _read_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    header = b""
    while len(header) < ff.REPLY.size:
        chunk = sock.recv(ff.REPLY.size - len(header))
        assert chunk, "closed before a reply"
        header += chunk
    body_len, status, request_id = ff.REPLY.unpack(header)
    body = b""
    while len(body) < body_len:
        body += sock.recv(body_len - len(body))
    return status, request_id, body


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _still_serves_everyone(server, fast_port):
    with RawMaster.over_grpc(server.address, token=TOKEN) as client:
        assert client.call("Exists", pb.ExistsRequest(keys=["x"])).exists == [False]
    with RawMaster.over_fast("127.0.0.1", fast_port, token=TOKEN) as client:
        assert client.call("Exists", pb.ExistsRequest(keys=["x"])).exists == [False]


def test_garbage_instead_of_a_hello_gets_an_error_frame_and_a_close(master):
    server, fast_port = master
    with _raw(fast_port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, message = _read_reply(sock)
        assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert b"bad hello" in message and _closed_by_peer(sock)
    with _raw(fast_port) as sock:                      # right hello, wrong token
        sock.sendall(ff.encode_hello("nope"))
        status, _, _ = _read_reply(sock)
        assert status == grpc.StatusCode.UNAUTHENTICATED.value[0] and _closed_by_peer(sock)
    _still_serves_everyone(server, fast_port)


def test_unknown_method_and_unparsable_body_leave_the_connection_usable(master):
    server, fast_port = master
    with _raw(fast_port, ff.encode_hello(TOKEN)) as sock:
        sock.sendall(ff.encode_request(999, 7, b"whatever"))
        status, request_id, message = _read_reply(sock)
        assert (status, request_id) == (grpc.StatusCode.UNIMPLEMENTED.value[0], 7)
        assert b"unknown method id 999" in message
        sock.sendall(ff.encode_request(METHODS["Exists"].method_id, 8, b"\xff\xff\xff"))
        status, request_id, _ = _read_reply(sock)
        assert (status, request_id) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], 8)
        body = pb.ExistsRequest(keys=["x"]).SerializeToString()
        sock.sendall(ff.encode_request(METHODS["Exists"].method_id, 9, body))
        status, request_id, reply = _read_reply(sock)
        assert (status, request_id) == (ff.OK, 9)
        assert pb.ExistsResponse.FromString(reply).exists == [False]


def test_oversized_and_truncated_frames_end_only_their_connection(master):
    server, fast_port = master
    with _raw(fast_port, ff.encode_hello(TOKEN)) as sock:
        sock.sendall(struct.pack("<IHI", ff.MAX_FRAME_BYTES + 1, 1, 5))
        status, request_id, message = _read_reply(sock)
        assert (status, request_id) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], 5)
        assert b"exceeds the maximum" in message and _closed_by_peer(sock)
    with _raw(fast_port, ff.encode_hello(TOKEN)) as sock:   # half a header, then gone
        sock.sendall(ff.encode_request(METHODS["Stats"].method_id, 1, b"")[:5])
    with _raw(fast_port, ff.encode_hello(TOKEN)) as sock:   # a body cut short
        sock.sendall(ff.encode_request(METHODS["Exists"].method_id, 1, b"x" * 100)[:50])
    with _raw(fast_port) as sock:                           # half a hello
        sock.sendall(ff.encode_hello(TOKEN)[:3])
    _still_serves_everyone(server, fast_port)


# -- client behaviour ---------------------------------------------------------------------------

def test_concurrent_callers_each_get_their_own_reply(master):
    server, fast_port = master
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            for j in range(50):
                reply = client.call("MatchPrefix", pb.MatchPrefixRequest(keys=[f"t{i}-{j}"]))
                assert reply.num_matched == 0
                with pytest.raises(InvalidArgumentError, match=f"keys\\[{i % 3}\\]"):
                    client.call("Exists", pb.ExistsRequest(keys=["a"] * (i % 3) + [""]))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    with RawMaster.over_fast("127.0.0.1", fast_port, token=TOKEN) as client:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    with pytest.raises(ClosedError):
        client.call("Stats", pb.StatsRequest())


# reply_spin_s: block at once; poll far shorter than a round trip, then block; poll until
# every reply (a large one too) has arrived
@pytest.mark.parametrize("reply_spin_s", [0.0, 1e-6, 0.005])
def test_started_calls_overlap_and_answer_like_call_on_both_paths(master, reply_spin_s):
    server, fast_port = master
    with RawMaster.over_fast("127.0.0.1", fast_port, token=TOKEN,
                             reply_spin_s=reply_spin_s) as fast, \
            RawMaster.over_grpc(server.address, token=TOKEN) as slow:
        for client in (fast, slow):
            # two calls in flight from one thread: each holds its own connection
            first = client.start("MatchPrefix", pb.MatchPrefixRequest(keys=["s-a"]))
            second = client.start("Exists", pb.ExistsRequest(keys=["s-a", "s-b"]))
            assert list(second.result().exists) == [False, False]
            assert first.result().num_matched == 0
            failing = client.start("Exists", pb.ExistsRequest(keys=[""]))
            with pytest.raises(InvalidArgumentError, match="keys\\[0\\]"):
                failing.result()
        # a reply larger than the connection's first buffer (64 KiB: one error message per
        # key here) grows it, and the connection stays in step
        request = pb.PutStartRequest(keys=[f"big-{i:06d}" + "x" * 100 for i in range(1000)],
                                     sizes=[1 << 50] * 1000, client_id="w")
        reply = fast.call("PutStart", request)
        assert reply.ByteSize() > 64 * 1024
        assert reply == slow.call("PutStart", request)
        assert fast.call("Exists", pb.ExistsRequest(keys=["s-a"])).exists == [False]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reads_retry_once_after_a_master_restart_but_put_start_does_not():
    fast_port = _free_port()
    flags = ("--fast-port", str(fast_port))
    client = RawMaster.over_fast("127.0.0.1", fast_port, timeout_s=5)
    try:
        with _master(*flags):
            client.call("Exists", pb.ExistsRequest(keys=["a"]))     # pools a connection
        with _master(*flags):
            # the pooled connection is dead: a read retries on a fresh one
            assert client.call("Exists", pb.ExistsRequest(keys=["a"])).exists == [False]
            client.call("Stats", pb.StatsRequest())
        with _master(*flags):
            request = pb.PutStartRequest(keys=["a"], sizes=[10], client_id="w")
            with pytest.raises(MasterUnavailableError, match="connection lost"):
                client.call("PutStart", request)                      # never blindly retried
            assert client.call("PutStart", request).statuses == [pb.ITEM_NO_SPACE]
    finally:
        client.close()
    with pytest.raises(MasterUnavailableError, match="cannot reach"):
        RawMaster.over_fast("127.0.0.1", fast_port).call("Stats", pb.StatsRequest())


def test_fast_calls_are_counted_with_their_transport():
    with _master("--metrics-port", "0") as server:
        with RawMaster.over_grpc(server.address) as client:
            stats = client.call("Stats", pb.StatsRequest())
        with RawMaster.over_fast("127.0.0.1", stats.fast_port) as client:
            client.call("Exists", pb.ExistsRequest(keys=["a", "b"]))
        url = f"http://127.0.0.1:{stats.metrics_port}/metrics"
        lines = set(urllib.request.urlopen(url, timeout=5).read().decode().splitlines())
    assert 'kvstore_master_rpc_total{method="Exists",transport="fast"} 1.0' in lines
    assert 'kvstore_master_rpc_total{method="Stats",transport="grpc"} 1.0' in lines
    assert ('kvstore_master_rpc_seconds_bucket{le="+Inf",method="Exists",transport="fast"} 1.0'
            in lines)
    assert 'kvstore_master_rpc_seconds_count{method="Exists",transport="fast"} 1.0' in lines
    assert 'kvstore_master_rpc_total{method="Exists",transport="grpc"} 0.0' in lines


def test_listening_line_first_then_the_fast_port_and_no_fast_rpc_turns_it_off():
    with _master() as server:
        fast_port = _fast_port(server)
        assert fast_port > 0 and fast_port != server.port
        with kvstore.connect(server.address) as store:
            assert store.stats()["metadata"] == "fast"
            assert store.stats()["master"]["fast_port"] == fast_port
            with pytest.raises(KeyNotFoundError):
                store.get("absent")
        with kvstore.connect(server.address, metadata="grpc") as store:
            assert store.stats()["metadata"] == "grpc"
    assert server.stdout_lines == [f"fast metadata on 127.0.0.1:{fast_port}\n"]
    with _master("--no-fast-rpc") as server:
        assert _fast_port(server) == 0
        with kvstore.connect(server.address) as store:        # auto falls back to gRPC
            assert store.stats()["metadata"] == "grpc"
            assert store.batch_exists(["a"]) == [False]
        with pytest.raises(MasterUnavailableError, match="offers no fast path"):
            kvstore.connect(server.address, metadata="fast")
    with pytest.raises(InvalidArgumentError, match="metadata must be one of"):
        kvstore.connect(server.address, metadata="http")


def test_config_rejects_a_fast_port_out_of_range():
    with pytest.raises(ConfigError, match="fast port"):
        MasterConfig(fast_port=70000)
    assert MasterConfig(fast_port=None).fast_port is None


def test_a_call_fails_by_its_deadline_when_no_reply_comes():
    # A peer that completes the handshake and then never answers (a hung master, as far as
    # the client can tell): the call must fail by its deadline, not hang.
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept_and_stall() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            accepted.append(conn)
            conn.recv(ff.HELLO.size)
            conn.sendall(ff.encode_reply(grpc.StatusCode.OK, 0, b"stalled"))

    thread = threading.Thread(target=accept_and_stall, daemon=True)
    thread.start()
    client = RawMaster.over_fast("127.0.0.1", listener.getsockname()[1], timeout_s=0.3)
    try:
        for _ in range(2):  # the timed-out connection is dropped: the second call opens another
            started = time.monotonic()
            with pytest.raises(MasterUnavailableError, match="DEADLINE_EXCEEDED"):
                client.call("Stats", pb.StatsRequest())
            assert time.monotonic() - started < 2.0
        thread.join(timeout=5)
        assert len(accepted) == 2
    finally:
        client.close()
        for conn in accepted:
            conn.close()
        listener.close()
