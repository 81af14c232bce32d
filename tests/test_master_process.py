"""The real ``kvstore master`` process: listening line, exact bind, signals, token, garbage
on the port, metrics endpoint, real-time lease and node TTLs, status CLI, bad flags."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest

import kvstore
from raw_master import RawMaster
from kvstore.v1 import master_pb2 as pb
from master_helpers import exists, get, put, register
from servers import KVSTORE_BIN, ServerProcess


def _master(*flags: str, env=None) -> ServerProcess:
    return ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", *flags], env=env)


@pytest.mark.parametrize("mode", ["aio", "threads"])
def test_process_serves_put_and_get_and_stops_on_sigterm(mode):
    with _master("--grpc-mode", mode) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        with RawMaster.over_grpc(server.address) as client:
            register(client, "n1")
            put(client, ["a", "b"])
            assert exists(client, ["a", "b", "c"]) == [True, True, False]
            assert list(get(client, ["a"]).statuses) == [pb.ITEM_OK]
        server.proc.terminate()
        assert server.proc.wait(timeout=10) == 0
        assert "Traceback" not in server.stderr()


def test_binds_exactly_the_host_given():
    with _master() as server:
        with socket.socket() as sock:
            sock.settimeout(2)
            with pytest.raises(OSError):
                sock.connect(("127.0.0.2", server.port))     # another loopback address


def test_port_in_use_is_a_clear_error():
    with _master() as server:
        result = subprocess.run([str(KVSTORE_BIN), "master", "--port", str(server.port)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
        assert f"cannot bind the master to 127.0.0.1:{server.port}" in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--low-watermark", "0.99"], "watermarks must satisfy"),
    (["--lease-ttl", "soon"], "invalid duration"),
    (["--heartbeat-interval", "20s"], "heartbeat interval"),
])
def test_bad_flags_exit_with_a_message(flags, message):
    result = subprocess.run([str(KVSTORE_BIN), "master", "--port", "0", *flags],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.parametrize("mode", ["threads", "aio"])
def test_token_is_required_when_set(mode):
    with _master("--grpc-mode", mode, env={"KVSTORE_TOKEN": "s3cret"}) as server:
        for token in (None, "wrong"):
            with RawMaster.over_grpc(server.address, token=token) as client:
                with pytest.raises(kvstore.AuthenticationError, match="UNAUTHENTICATED"):
                    client.call("Exists", pb.ExistsRequest(keys=["a"]))
        with RawMaster.over_grpc(server.address, token="s3cret") as client:
            assert exists(client, ["a"]) == [False]


def test_garbage_on_the_port_does_not_stop_the_master():
    with _master() as server:
        for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 8,
                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 100):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(junk)
                sock.settimeout(2)
                try:
                    sock.recv(1024)
                except OSError:
                    pass
        with RawMaster.over_grpc(server.address) as client:
            register(client, "n1")
            put(client, ["still-here"])
            assert exists(client, ["still-here"]) == [True]
        assert server.proc.poll() is None


def test_metrics_endpoint_serves_counters_and_tier_gauges():
    with _master("--metrics-port", "0") as server:
        with RawMaster.over_grpc(server.address) as client:
            register(client, "n1")
            put(client, ["a", "b"], [1000, 3000])      # 1024 + 3008 allocated
            get(client, ["a", "missing"])
            metrics_port = client.call("Stats", pb.StatsRequest()).metrics_port
        assert metrics_port > 0
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    lines = set(text.splitlines())
    assert "kvstore_master_objects 2.0" in lines
    assert 'kvstore_master_tier_used_bytes{tier="dram"} 4032.0' in lines
    assert 'kvstore_master_tier_replicas{tier="dram"} 2.0' in lines
    assert "kvstore_master_hits_total 1.0" in lines
    assert "kvstore_master_misses_total 1.0" in lines
    assert "kvstore_master_demotions_total 0.0" in lines
    assert "kvstore_master_moves_in_flight 0.0" in lines
    assert "kvstore_master_evictions_total 0.0" in lines
    assert 'kvstore_master_rpc_total{method="PutStart",transport="grpc"} 1.0' in lines
    assert any(l.startswith('kvstore_master_rpc_seconds_count{method="GetReplicas",'
                            'transport="grpc"} 1.0') for l in lines)


def _wait_for(predicate, timeout_s: float = 20.0) -> bool:
    """Poll another process's state until ``predicate()`` holds (no clock to advance there)."""
    deadline_s = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline_s:
            return False
        time.sleep(0.02)
    return True


def test_real_lease_and_node_ttls():
    """The real process's clock ends a lease and drops a silent node: waits are on the
    observable outcome (no fixed sleeps), and each outcome is checked to come no earlier
    than its TTL allows, measured from before the call that started it."""
    lease_s, node_ttl_s = 0.5, 1.5
    with _master("--lease-ttl", "500ms", "--node-ttl", "1500ms",
                 "--heartbeat-interval", "100ms") as server:
        with RawMaster.over_grpc(server.address) as client:
            register(client, "n1")
            assert list(put(client, ["k"]).statuses) == [pb.ITEM_OK]
            leased_at = time.monotonic()
            assert list(get(client, ["k"]).statuses) == [pb.ITEM_OK]
            remove = pb.RemoveRequest(keys=["k"])
            assert list(client.call("Remove", remove).statuses) == [pb.ITEM_LEASED]
            statuses: list[list[int]] = []

            def removed() -> bool:
                client.call("Heartbeat", pb.HeartbeatRequest(node_id="n1"))  # keep n1 alive
                statuses.append(list(client.call("Remove", remove).statuses))
                return statuses[-1] != [pb.ITEM_LEASED]

            assert _wait_for(removed), "the lease never ended"
            assert time.monotonic() - leased_at >= lease_s
            assert statuses[-1] == [pb.ITEM_OK] and exists(client, ["k"]) == [False]

            silent_from = time.monotonic()
            client.call("Heartbeat", pb.HeartbeatRequest(node_id="n1"))   # n1's last one
            assert list(put(client, ["k2"]).statuses) == [pb.ITEM_OK]
            assert exists(client, ["k2"]) == [True]
            assert _wait_for(lambda: exists(client, ["k2"]) == [False]), "n1 was never dropped"
            assert time.monotonic() - silent_from >= node_ttl_s
            assert client.call("Stats", pb.StatsRequest()).num_nodes == 0


def test_status_cli_table_and_json():
    with _master() as server:
        with RawMaster.over_grpc(server.address) as client:
            register(client, "node-7")
            put(client, ["a", "b", "c"])
        table = subprocess.run([str(KVSTORE_BIN), "status", "--master", server.address],
                               capture_output=True, text=True, timeout=30)
        raw = subprocess.run([str(KVSTORE_BIN), "status", "--master", server.address,
                              "--json"], capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and "node-7" in table.stdout and "DRAM" in table.stdout
    assert "objects 3" in table.stdout
    status = json.loads(raw.stdout)
    assert status["num_objects"] == 3 and status["nodes"][0]["node_id"] == "node-7"
    assert status["fast_port"] > 0 and f"fast metadata port {status['fast_port']}" in table.stdout
    counters = {"hits": 0, "demotions": 0, "promotions": 0, "evictions": 0}
    assert status["tiers"][0] == {"tier": "DRAM", "used_bytes": 3072,
                                  "capacity_bytes": 4 << 20, "num_replicas": 3, **counters}
    assert status["nodes"][0]["tiers"] == status["tiers"]      # one node: its tiers are all
    assert "DEMOTIONS" in table.stdout and "PROMOTIONS" in table.stdout


def test_status_cli_reports_an_unreachable_master():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]                          # bound, never listening
        result = subprocess.run([str(KVSTORE_BIN), "status", "--master", f"127.0.0.1:{port}",
                                 "--timeout", "2"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_master_startup_does_not_import_torch():
    code = ("import sys, kvstore.master.cli, kvstore.master.server, kvstore.status_cli; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([str(KVSTORE_BIN.with_name("python")), "-c", code],
                          timeout=60).returncode == 0
