"""``--advertise-host`` (issue 10): what a master publishes in etcd and what a daemon registers
with the master is an address other hosts can use, also when the server binds a wildcard.
Real master, daemon and etcd processes; clients connect through what was published."""

from __future__ import annotations

import socket
import subprocess

import pytest

from raw_master import RawMaster
from servers import KVSTORE_BIN, ServerProcess

import kvstore
from kvstore._advertise import advertised_host, check_advertise_host
from kvstore._errors import ConfigError
from kvstore.ha.cluster import ClusterKeys, read_leader
from kvstore.ha.etcd import EtcdClient
from kvstore.v1 import master_pb2


def _data_addrs(master) -> list[str]:
    with RawMaster.over_grpc(master.address) as client:
        return [n.data_addr for n in client.call("ListNodes", master_pb2.ListNodesRequest()).nodes]


def _hostname_address() -> str:
    infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)
    return infos[0][4][0]


def test_daemon_on_a_wildcard_registers_the_advertised_host():
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--host", "0.0.0.0",
                           "--port", "0", "--dram", "16MiB",
                           "--advertise-host", "127.0.0.1"]) as daemon:
        port = daemon.address.rpartition(":")[2]
        assert _data_addrs(master) == [f"127.0.0.1:{port}"]
        # a tcp client reaches the data plane at the registered address
        with kvstore.connect(master.address, transport="tcp", timeout_s=10) as store:
            store.put("adv/one", b"x" * 10_000)
            assert store.get("adv/one") == b"x" * 10_000
        assert "--advertise-host" in daemon.stderr()


def test_daemon_on_a_wildcard_without_the_flag_registers_the_hostname_address():
    try:
        expected = _hostname_address()
    except OSError as exc:
        pytest.skip(f"this machine's hostname does not resolve: {exc}")
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--host", "0.0.0.0",
                           "--port", "0", "--dram", "16MiB"]) as daemon:
        port = daemon.address.rpartition(":")[2]
        assert _data_addrs(master) == [f"{expected}:{port}"]
        assert f"hostname {socket.gethostname()!r} resolved" in daemon.stderr()


def test_daemon_on_a_plain_host_registers_it_unchanged():
    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                           "--port", "0", "--dram", "16MiB"]) as daemon:
        assert _data_addrs(master) == [daemon.address]


def test_master_on_a_wildcard_publishes_the_advertised_host_in_etcd(etcd):
    with ServerProcess(["master", "--host", "0.0.0.0", "--port", "0", "--etcd", etcd.url,
                        "--cluster", "adv", "--advertise-host", "127.0.0.1"]) as master:
        client, keys = EtcdClient(etcd.url), ClusterKeys("adv")
        port = master.address.rpartition(":")[2]
        leader = None
        with kvstore.connect(f"etcd://127.0.0.1:{etcd.client_port}/adv", timeout_s=20) as store:
            store.exists("adv/none")            # answered: the leader was found via etcd
            leader = read_leader(client, keys)
        assert leader is not None and leader.grpc_address == f"127.0.0.1:{port}"
        assert leader.fast_address is not None and leader.fast_address.startswith("127.0.0.1:")
        assert "publishing 127.0.0.1:" in master.stderr()


def test_bad_advertise_hosts_are_refused_with_a_clear_error():
    for bad in ("0.0.0.0", "::", "host:1234", "[::1]", "a b"):
        with pytest.raises(ConfigError, match="advertise-host"):
            check_advertise_host(bad)
    for command in (["master", "--port", "0"], ["daemon", "--standalone", "--dram", "1MiB"]):
        out = subprocess.run([str(KVSTORE_BIN), *command, "--advertise-host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "--advertise-host" in out.stderr, out.stderr


def test_advertised_host_rule():
    assert advertised_host("10.1.2.3", None) == ("10.1.2.3", "the bind host")
    assert advertised_host("0.0.0.0", "node7.example")[0] == "node7.example"
    assert advertised_host("0.0.0.0", None, hostname=lambda: "localhost")[0] == "127.0.0.1"
    with pytest.raises(ConfigError, match="no-such-host.invalid.*--advertise-host"):
        advertised_host("0.0.0.0", None, hostname=lambda: "no-such-host.invalid")
