"""Every server socket binds exactly the host it is given: the master's gRPC port, its fast
metadata port and its metrics port, the daemon's data plane and its metrics port. A server
bound to 127.0.0.1 refuses a connection to 127.0.0.2 (another loopback address of this
host) on each of them; ``--metrics-host`` moves only the metrics port."""

from __future__ import annotations

import socket
import subprocess
import urllib.request

import pytest

from raw_master import RawMaster
from kvstore.v1 import master_pb2 as pb
from servers import KVSTORE_BIN, ServerProcess


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    """True iff a TCP connection to host:port is accepted; False if it is refused."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


def _scrape(host: str, port: int) -> str:
    return urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()


def _master_ports(server: ServerProcess) -> tuple[int, int]:
    with RawMaster.over_grpc(server.address) as client:
        stats = client.call("Stats", pb.StatsRequest())
    return stats.fast_port, stats.metrics_port


@pytest.mark.parametrize("mode", ["aio", "threads"])
def test_master_binds_only_its_host_on_every_port(mode):
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", "--grpc-mode", mode,
                        "--metrics-port", "0"]) as server:
        fast_port, metrics_port = _master_ports(server)
        assert fast_port > 0 and metrics_port > 0
        for port in (server.port, fast_port, metrics_port):
            assert _accepts("127.0.0.1", port), port
            assert not _accepts("127.0.0.2", port), port
        assert "kvstore_master_objects" in _scrape("127.0.0.1", metrics_port)


def test_master_metrics_host_moves_only_the_metrics_port():
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                        "--metrics-host", "127.0.0.2"]) as server:
        fast_port, metrics_port = _master_ports(server)
        assert "kvstore_master_objects" in _scrape("127.0.0.2", metrics_port)
        assert not _accepts("127.0.0.1", metrics_port)
        for port in (server.port, fast_port):
            assert _accepts("127.0.0.1", port) and not _accepts("127.0.0.2", port)


def test_daemon_binds_only_its_host_on_data_plane_and_metrics():
    metrics_port = _free_port()
    with ServerProcess(["daemon", "--standalone", "--host", "127.0.0.1", "--dram", "4MiB",
                        "--metrics-port", str(metrics_port)]) as daemon:
        for port in (daemon.port, metrics_port):
            assert _accepts("127.0.0.1", port), port
            assert not _accepts("127.0.0.2", port), port
        assert "kvstore_daemon_reads_total" in _scrape("127.0.0.1", metrics_port)


def test_daemon_metrics_host_moves_only_the_metrics_port():
    metrics_port = _free_port("127.0.0.2")
    with ServerProcess(["daemon", "--standalone", "--host", "127.0.0.1", "--dram", "4MiB",
                        "--metrics-port", str(metrics_port),
                        "--metrics-host", "127.0.0.2"]) as daemon:
        assert "kvstore_daemon_reads_total" in _scrape("127.0.0.2", metrics_port)
        assert not _accepts("127.0.0.1", metrics_port)
        assert _accepts("127.0.0.1", daemon.port) and not _accepts("127.0.0.2", daemon.port)


@pytest.mark.parametrize("server", ["master", "daemon"])
def test_empty_metrics_host_is_a_clear_error(server):
    args = ["master", "--port", "0"] if server == "master" else ["daemon", "--standalone"]
    result = subprocess.run([str(KVSTORE_BIN), *args, "--metrics-port", "0",
                             "--metrics-host", ""], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "must not be empty" in result.stderr
    assert "listening on" not in result.stdout
