"""TLS and mutual TLS on every network path: the master's gRPC port, its framed fast path and
the daemons' data plane (tcp transport), with certificates made by scripts/make_tls_certs.sh
(the system's openssl; the tests skip, saying so, where there is none).

Two clusters of real processes: one with mutual TLS and a token (clients must present a
certificate signed by the cluster's CA, and the token), one with server-only TLS. Every
refusal (no client certificate, a wrong CA, a client certificate from another CA, plain text
to a TLS port, TLS to a plain-text port) must be a clear AuthenticationError on each path,
and the servers must keep serving the clients that are right afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from client_cluster import payload

import kvstore
from kvstore import TLSConfig
from kvstore._deadline import Deadline
from kvstore.rpc import MasterClient, grpc_client
from kvstore.rpc.fast_carrier import FastCarrier
from kvstore.transport.base import Target
from kvstore.transport.tcp import TcpTransport
from servers import KVSTORE_BIN, ServerProcess

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tls-test-token"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl is not installed: no certificates to test with")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run([str(REPO / "scripts" / "make_tls_certs.sh"), str(directory)], check=True,
                   capture_output=True)
    return directory


def _server_tls_args(certs: Path, mutual: bool) -> list[str]:
    args = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    return args + (["--tls-ca", str(certs / "ca.pem")] if mutual else [])


class _Cluster:
    def __init__(self, certs: Path, *, mutual: bool, token: str | None, tmp: Path):
        tls_args = _server_tls_args(certs, mutual)
        token_args = ["--token", token] if token else []
        master_ca = [] if mutual else ["--tls-master-ca", str(certs / "ca.pem")]
        daemon_ca = [] if mutual else ["--tls-daemon-ca", str(certs / "ca.pem")]
        self.master = ServerProcess(["master", "--port", "0", *token_args, *tls_args,
                                     *daemon_ca])
        try:
            # NOTE: the daemon prints its listening line only once registered: over TLS
            # (and, for the mutual cluster, with its certificate) to the master
            self.daemon = ServerProcess(["daemon", "--master", self.master.address, "--dram",
                                         "64MiB", "--ssd", f"{tmp}:64MiB", *token_args,
                                         *tls_args, *master_ca])
        except BaseException:
            self.master.close()
            raise
        self.address = self.master.address

    def alive(self) -> bool:
        return self.master.proc.poll() is None and self.daemon.proc.poll() is None

    def close(self) -> None:
        self.daemon.close()
        self.master.close()


@pytest.fixture(scope="module")
def mutual(certs, tmp_path_factory):
    cluster = _Cluster(certs, mutual=True, token=TOKEN, tmp=tmp_path_factory.mktemp("ssd"))
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def server_only(certs, tmp_path_factory):
    cluster = _Cluster(certs, mutual=False, token=None, tmp=tmp_path_factory.mktemp("ssd"))
    yield cluster
    cluster.close()


def _client_tls(certs: Path) -> TLSConfig:
    return TLSConfig(ca=str(certs / "ca.pem"), cert=str(certs / "client.pem"),
                     key=str(certs / "client.key"))


def _round_trip(store: kvstore.KVStore, prefix: str) -> None:
    """Puts and gets that exercise every data-plane path over the store's transport: a
    small value, a striped one (4 MiB: 4 connections), a batch, and the SSD tier (staged)."""
    values = {f"{prefix}/small": payload(1000, 1), f"{prefix}/4MiB": payload(4 << 20, 2)}
    for key, value in values.items():
        store.put(key, value)
    keys = [f"{prefix}/batch/{i}" for i in range(8)]
    batch = [payload(64 << 10, 10 + i) for i in range(8)]
    assert store.batch_put(keys, batch) == [None] * 8
    store.put(f"{prefix}/ssd", payload(3 << 20, 3), tier="ssd")
    for key, value in values.items():
        assert store.get(key) == value
    assert store.batch_get(keys) == batch
    assert store.get(f"{prefix}/ssd") == payload(3 << 20, 3)
    assert store.exists(f"{prefix}/small") and store.match_prefix(keys) == 8
    assert store.remove(f"{prefix}/small")


def _fast_port(cluster, certs, token) -> int:
    with grpc_client(cluster.address, token=token, tls=_client_tls(certs)) as client:
        return client.stats().fast_port


def _first_target(cluster, certs, token) -> Target:
    with grpc_client(cluster.address, token=token, tls=_client_tls(certs)) as client:
        node = client.list_nodes()[0]
    segment = next(s for s in node.segments if s.shm_name)
    return Target(node.node_id, node.host_id, node.data_addr, segment.segment_id, "", 0, 4096)


# ---- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", ["fast", "grpc"])
def test_mutual_tls_round_trip_over_tcp(mutual, certs, metadata):
    with kvstore.connect(mutual.address, token=TOKEN, transport="tcp", metadata=metadata,
                         tls=_client_tls(certs)) as store:
        assert store.metadata_path == metadata
        _round_trip(store, f"mtls/{metadata}")
        transfers = store.stats()["transfers"]
        assert transfers["tcp"]["num_writes"] >= 11 and transfers["tcp"]["num_reads"] >= 11


def test_server_only_tls_round_trip_over_tcp_and_shm(server_only, certs):
    tls = TLSConfig(ca=str(certs / "ca.pem"))
    for transport in ("tcp", "auto"):
        with kvstore.connect(server_only.address, transport=transport, tls=tls) as store:
            assert store.metadata_path == "fast"
            _round_trip(store, f"tls/{transport}")


def test_a_plain_text_store_works_beside_tls_data_planes(server_only, certs):
    """The shm transport never touches the network, so a TLS cluster's same-host DRAM is
    read through the mapping (TLS protects only what crosses a socket)."""
    tls = TLSConfig(ca=str(certs / "ca.pem"))
    with kvstore.connect(server_only.address, transport="shm", tls=tls) as store:
        store.put("tls/shm", b"x" * 5000)
        assert store.get("tls/shm") == b"x" * 5000
        assert "tcp" not in store.stats()["transfers"]


def test_tls_status_command(mutual, certs):
    tls = _client_tls(certs)
    ok = subprocess.run([str(KVSTORE_BIN), "status", "--master", mutual.address, "--token",
                         TOKEN, "--tls-ca", tls.ca, "--tls-cert", tls.cert, "--tls-key",
                         tls.key, "--json"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert '"num_nodes": 1' in ok.stdout
    refused = subprocess.run([str(KVSTORE_BIN), "status", "--master", mutual.address,
                              "--token", TOKEN, "--tls-ca", tls.ca],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "TLS handshake" in refused.stderr


# ---- refusals, path by path ---------------------------------------------------------------

def _refusals(certs: Path) -> dict[str, TLSConfig | None]:
    return {
        "no client certificate": TLSConfig(ca=str(certs / "ca.pem")),
        "wrong CA": TLSConfig(ca=str(certs / "other-ca.pem"), cert=str(certs / "client.pem"),
                              key=str(certs / "client.key")),
        "client certificate of another CA": TLSConfig(
            ca=str(certs / "ca.pem"), cert=str(certs / "other-client.pem"),
            key=str(certs / "other-client.key")),
        "plain text": None,
    }


REFUSALS = ["no client certificate", "wrong CA", "client certificate of another CA",
            "plain text"]


@pytest.mark.parametrize("case", REFUSALS)
def test_mutual_tls_refuses_on_every_path_and_keeps_serving(mutual, certs, case):
    tls = _refusals(certs)[case]
    expected = "requires TLS" if tls is None else "TLS handshake"

    # gRPC (kvstore.connect's discovery call) -----------------------------------------
    deadline = Deadline.after(30)
    with pytest.raises(kvstore.AuthenticationError,
                       match="serves TLS" if tls is None else expected):
        kvstore.connect(mutual.address, token=TOKEN, tls=tls, rpc_timeout_s=5)
    assert deadline.remaining_s() > 20    # refused at once, not retried until a deadline

    # the framed fast path -------------------------------------------------------------
    host = mutual.address.rsplit(":", 1)[0]
    fast = MasterClient(FastCarrier(host, _fast_port(mutual, certs, TOKEN), token=TOKEN,
                                    tls=tls), rpc_timeout_s=5)
    with pytest.raises(kvstore.AuthenticationError, match=expected):
        fast.stats()
    fast.close()

    # the data plane (tcp transport) ---------------------------------------------------
    target = _first_target(mutual, certs, TOKEN)
    transport = TcpTransport(token=TOKEN, tls=tls)
    try:
        with pytest.raises(kvstore.AuthenticationError, match=expected):
            transport.read_into(target, memoryview(bytearray(target.length)), timeout_s=5)
    finally:
        transport.close()

    # ... and the servers serve the right clients afterwards
    assert mutual.alive()
    with kvstore.connect(mutual.address, token=TOKEN, transport="tcp",
                         tls=_client_tls(certs)) as store:
        store.put(f"after/{case}", b"still serving")
        assert store.get(f"after/{case}") == b"still serving"


def test_the_token_is_still_checked_inside_tls(mutual, certs):
    with pytest.raises(kvstore.AuthenticationError, match="token"):
        kvstore.connect(mutual.address, token="wrong", tls=_client_tls(certs))
    transport = TcpTransport(token="wrong", tls=_client_tls(certs))
    try:
        with pytest.raises(kvstore.AuthenticationError, match="token"):
            target = _first_target(mutual, certs, TOKEN)
            transport.read_into(target, memoryview(bytearray(target.length)), timeout_s=5)
    finally:
        transport.close()


def test_tls_client_to_a_plain_text_cluster_is_refused_clearly(certs):
    with ServerProcess(["master", "--port", "0"]) as master:
        with pytest.raises(kvstore.AuthenticationError, match="TLS handshake"):
            kvstore.connect(master.address, tls=_client_tls(certs), rpc_timeout_s=5)
        with kvstore.connect(master.address) as store:      # and it still serves
            assert store.stats()["master"]["num_nodes"] == 0


def test_a_refused_put_names_its_key_and_stores_nothing(mutual, certs):
    """A client whose metadata calls are accepted but whose data-plane connections are not
    (here: a transport without TLS behind a TLS store's metadata) fails the put for that key
    only, and nothing becomes visible."""
    with kvstore.connect(mutual.address, token=TOKEN, transport="tcp",
                         tls=_client_tls(certs)) as store:
        store._transfers.transports[0].close()
        store._transfers.transports[0] = TcpTransport(token=TOKEN)   # plain text
        results = store.batch_put(["refused/key"], [b"v" * 4096])
        assert isinstance(results[0], kvstore.KVStoreError)
        assert "refused/key" in results[0].keys
        assert not store.exists("refused/key")


# ---- configuration ------------------------------------------------------------------------

def test_tls_config_validation(certs, tmp_path):
    with pytest.raises(kvstore.ConfigError, match="both"):
        TLSConfig(cert=str(certs / "server.pem"))
    with pytest.raises(kvstore.ConfigError, match="does not exist"):
        TLSConfig(ca=str(tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(kvstore.ConfigError, match="cannot load"):
        TLSConfig(cert=str(garbage), key=str(garbage)).server_context()
    with pytest.raises(kvstore.ConfigError, match="needs --tls-cert"):
        TLSConfig(ca=str(certs / "ca.pem")).server_context()
    with pytest.raises(kvstore.InvalidArgumentError, match="tls must be"):
        kvstore.connect("127.0.0.1:1", tls={"ca": "x"})
    with pytest.raises(kvstore.InvalidArgumentError, match="plain text"):
        kvstore.local(dram="8MiB", tls=TLSConfig(ca=str(certs / "ca.pem")))


def test_servers_refuse_bad_tls_flags(certs, tmp_path):
    half = subprocess.run([str(KVSTORE_BIN), "master", "--port", "0", "--tls-cert",
                           str(certs / "server.pem")], capture_output=True, text=True,
                          timeout=60)
    assert half.returncode != 0 and "--tls-key" in half.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for command in (["master", "--port", "0"], ["daemon", "--standalone", "--dram", "8MiB"]):
        bad = subprocess.run([str(KVSTORE_BIN), *command, "--tls-cert", str(garbage),
                              "--tls-key", str(garbage)], capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode != 0, command
        assert "listening on" not in bad.stdout
        assert "TLS" in bad.stderr, bad.stderr


def _wait_for_log(server: ServerProcess, text: str, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in server.stderr():
            return True
        time.sleep(0.05)   # waiting on another process's log line: no clock to advance
    return False


WARNING = "neither --token nor --tls-cert"


def test_exposed_servers_warn_at_start(certs):
    with ServerProcess(["master", "--host", "0.0.0.0", "--port", "0"]) as master:
        assert _wait_for_log(master, WARNING)
    with ServerProcess(["daemon", "--standalone", "--host", "0.0.0.0", "--dram", "8MiB"]) \
            as daemon:
        assert _wait_for_log(daemon, WARNING)
    # a token, TLS or a loopback address: no warning (the start line comes after it)
    for args in (["--host", "0.0.0.0", "--token", TOKEN],
                 ["--host", "0.0.0.0", *_server_tls_args(certs, mutual=False)],
                 ["--host", "127.0.0.1"]):
        with ServerProcess(["master", "--port", "0", *args]) as master:
            assert _wait_for_log(master, "listening on")
            assert WARNING not in master.stderr()


def test_a_daemon_that_cannot_verify_its_master_exits_with_the_reason(server_only, certs):
    """Server-only TLS with a private CA: a daemon given neither --tls-ca nor --tls-master-ca
    verifies the master against the system's trust store, fails, and says why (not retried
    for ever: a certificate does not fix itself)."""
    result = subprocess.run([str(KVSTORE_BIN), "daemon", "--master", server_only.address,
                             "--dram", "8MiB", *_server_tls_args(certs, mutual=False)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "TLS handshake" in result.stderr and "listening on" not in result.stdout
    assert server_only.alive()


# ---- the data plane alone, over TLS ---------------------------------------------------------

DATA_SIZES = [0, 1, 4095, 64 * 1024, 1024 * 1024 + 1, 16 * 1024 * 1024]


@pytest.fixture(scope="module")
def tls_data_plane(certs):
    """A standalone daemon (no master: its segment holds no one's objects) serving mutual
    TLS; targets name it by address, segment "dram0"."""
    with ServerProcess(["daemon", "--standalone", "--dram", "48MiB",
                        *_server_tls_args(certs, mutual=True)]) as daemon:
        yield daemon


def _raw_target(daemon: ServerProcess, offset: int, length: int) -> Target:
    return Target("", "", daemon.address, "dram0", "", offset, length)


def test_tls_data_plane_moves_exact_bytes_and_refuses_out_of_range(tls_data_plane, certs):
    transport = TcpTransport(tls=_client_tls(certs))
    try:
        offset = 0
        for size in DATA_SIZES:     # single ranges, striped from 2 MiB up
            data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
            target = _raw_target(tls_data_plane, offset, size)
            transport.write(target, memoryview(data), timeout_s=30)
            out = np.zeros(size, dtype=np.uint8)
            transport.read_into(target, memoryview(out), timeout_s=30)
            assert np.array_equal(out, data), size
            offset += size + 4096
        # a batch with one bad item: the others are moved, the bad one is refused alone
        sources = [np.full(64 * 1024, i, dtype=np.uint8) for i in range(6)]
        targets = [_raw_target(tls_data_plane, 40 * 1024 * 1024 + i * 65536, 65536)
                   for i in range(6)]
        targets[3] = _raw_target(tls_data_plane, 48 * 1024 * 1024, 65536)   # past the end
        results = transport.write_many(list(zip(targets, map(memoryview, sources))),
                                       timeout_s=30)
        assert [r is None for r in results] == [True, True, True, False, True, True]
        assert isinstance(results[3], kvstore.TransferError)
        outs = [np.zeros(65536, dtype=np.uint8) for _ in range(6)]
        results = transport.read_many(list(zip(targets, map(memoryview, outs))), timeout_s=30)
        assert [r is None for r in results] == [True, True, True, False, True, True]
        for i in (0, 1, 2, 4, 5):
            assert np.array_equal(outs[i], sources[i])
    finally:
        transport.close()


def test_bench_transfer_over_tls_locally_and_against_a_master(mutual, certs, tmp_path):
    tls = _client_tls(certs)
    server_files = ["--tls-ca", tls.ca, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                    str(certs / "server.key")]
    client_files = ["--tls-ca", tls.ca, "--tls-cert", tls.cert, "--tls-key", tls.key]
    for name, extra in (("local", ["--dram", "128MiB", *server_files]),
                        ("remote", ["--master", mutual.address, "--token", TOKEN,
                                    "--levels", "client", *client_files])):
        out = tmp_path / f"{name}.json"
        result = subprocess.run([str(KVSTORE_BIN), "bench", "transfer", "--transports", "tcp",
                                 "--sizes", "64KiB", "--duration", "0.02", "--json", str(out),
                                 *extra], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        document = json.loads(out.read_text())
        assert document["settings"]["tls"] is True
        assert {row["transport"] for row in document["rows"]} == {"tcp"}
        assert all(row["gbps"] > 0 for row in document["rows"])
