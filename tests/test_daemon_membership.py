"""The daemon against a real master process: registration, heartbeats, clean and unclean
exits, master restarts (the inventory is adopted, no stored block lost) and a master that
comes up after the daemon."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
import xxhash
from servers import KVSTORE_BIN, ServerProcess

from kvstore import MasterUnavailableError, TransferError
from kvstore.daemon.config import DaemonConfig
from kvstore.daemon.server import run_in_thread
from raw_master import RawMaster
from kvstore.transport import local_host_id
from kvstore.transport.base import Target
from kvstore.transport.tcp import TcpTransport
from kvstore.v1 import master_pb2

FAST_BEAT = ["--heartbeat-interval", "100ms"]


def list_nodes(master_addr: str, token: str | None = None):
    with RawMaster.over_grpc(master_addr, token=token) as client:
        return list(client.call("ListNodes", master_pb2.ListNodesRequest()).nodes)


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    """Poll a condition that another process makes true (real time: no clock to advance).

    A master that is not reachable yet counts as "not yet" (NOTE: gRPC shares subchannels
    per process, so a new channel may briefly see the backoff state of an older one).
    """
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        try:
            if predicate():
                return True
        except MasterUnavailableError:
            pass
        time.sleep(interval_s)
    return predicate()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaemonPopen:
    """A ``kvstore daemon`` started with Popen (not ServerProcess, which blocks until the
    listening line): its stderr and stdout lines are collected as they come, so a test can
    wait on what the daemon logs and check what it has printed so far."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([str(KVSTORE_BIN), "daemon", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=lambda s=stream, l=lines: l.extend(iter(s.readline, "")),
                             daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def num_logged(self, text: str) -> int:
        return sum(text in line for line in list(self.err))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for reader in self._readers:      # every line it wrote is collected after this
            reader.join(timeout=10)


def test_daemon_registers_its_segments(tmp_path):
    with ServerProcess(["master", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "16MiB",
                           "--ssd", f"{tmp_path}:8MiB", "--node-id", "reg-node",
                           # NOTE: writes a range of its own choosing (not allocated)
                           "--no-write-capabilities"]) as daemon:
        (node,) = list_nodes(master.address)
        assert (node.node_id, node.data_addr, node.host_id) == \
            ("reg-node", daemon.address, local_host_id())
        dram, ssd = node.segments
        assert (dram.tier, dram.capacity_bytes) == (master_pb2.TIER_DRAM, 16 * 1024**2)
        assert dram.shm_name.startswith("/kvstore-reg-node-") and not dram.path
        assert (ssd.tier, ssd.capacity_bytes, ssd.shm_name) == (master_pb2.TIER_SSD,
                                                                8 * 1024**2, "")
        # both files exist, owner-only
        assert os.stat(f"/dev/shm{dram.shm_name}").st_mode & 0o777 == 0o600
        assert os.stat(ssd.path).st_mode & 0o777 == 0o600
        # the SSD segment is served over the data plane
        transport = TcpTransport()
        data = np.random.default_rng(2).integers(0, 256, 3 * 1024**2, np.uint8)
        target = Target(node.node_id, node.host_id, node.data_addr, "ssd0", "", 12345,
                        len(data))
        transport.write(target, memoryview(data), timeout_s=10)
        out = np.zeros_like(data)
        transport.read_into(target, memoryview(out), timeout_s=10)
        assert np.array_equal(out, data)
        transport.close()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=10) == 0
        # unregistered at once (the node TTL is 10 s), shm gone; the SSD data file stays
        # (its objects survive restarts: tests/test_daemon_ssd.py)
        assert list_nodes(master.address) == []
        assert not os.path.exists(f"/dev/shm{dram.shm_name}")
        assert os.path.basename(ssd.path) == "kvstore-ssd.data" and os.path.exists(ssd.path)


def test_two_daemons_get_distinct_shm_names():
    with ServerProcess(["master", "--port", "0"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "4MiB"]), \
            ServerProcess(["daemon", "--master", master.address, "--dram", "4MiB"]):
        nodes = list_nodes(master.address)
        assert len(nodes) == 2
        assert nodes[0].node_id != nodes[1].node_id
        assert nodes[0].segments[0].shm_name != nodes[1].segments[0].shm_name


#: The node TTL of the liveness test. NOTE: far above the heartbeat interval (FAST_BEAT,
#: 100 ms) on purpose: on a loaded machine a daemon's heartbeats are sometimes late (the
#: largest gap between two, as the master saw it: 0.38 s at load 13.5, beside three CPU
#: burners), and a TTL of 500 ms (the old value) then dropped a live daemon now and then.
LIVENESS_TTL_S = 2.0


def test_killed_daemon_is_dropped_after_node_ttl():
    # NOTE: a host id of this test's own: every daemon that starts on a host reaps the shm a
    # dead daemon of that host left (orphans.py), so with the machine's id a daemon of any
    # other test or checkout running meanwhile removed the killed daemon's segment before
    # this test looked for it; its daemons alone share this id
    own_host = {"KVSTORE_HOST_ID": uuid.uuid4().hex}
    with ServerProcess(["master", "--port", "0", "--node-ttl", f"{LIVENESS_TTL_S}s",
                        *FAST_BEAT]) as master:
        daemon = ServerProcess(["daemon", "--master", master.address, "--dram", "4MiB"],
                               env=own_host)
        nodes = list_nodes(master.address)
        assert len(nodes) == 1
        node_id, shm_name = nodes[0].node_id, nodes[0].segments[0].shm_name
        # still listed while it heartbeats, although more than a TTL passes: listed at every
        # look, never dropped (a dropped daemon re-registers, and says so in its log)
        listed_since_s = time.monotonic()
        while time.monotonic() - listed_since_s < 1.2 * LIVENESS_TTL_S:
            assert [n.node_id for n in list_nodes(master.address)] == [node_id]
            time.sleep(0.1)
        daemon.kill()
        assert "re-registering" not in daemon.stderr()
        killed_at_s = time.monotonic()
        assert wait_until(lambda: list_nodes(master.address) == [],
                          timeout_s=LIVENESS_TTL_S + 10)
        # dropped for its silence (a TTL after its last heartbeat), not at once
        assert time.monotonic() - killed_at_s >= LIVENESS_TTL_S / 2
        daemon.close()
        # a SIGKILLed daemon cannot unlink its shm; the next daemon on this host reaps it
        assert os.path.exists(f"/dev/shm{shm_name}")
        with ServerProcess(["daemon", "--master", master.address, "--dram", "4MiB"],
                           env=own_host):
            assert not os.path.exists(f"/dev/shm{shm_name}")


def put_objects(master_addr: str, num_objects: int, size_bytes: int) -> dict[str, bytes]:
    """Put objects the way a client does: PutStart, bytes over tcp, PutEnd."""
    keys = [f"restart/{i}" for i in range(num_objects)]
    values = {key: os.urandom(size_bytes) for key in keys}
    with RawMaster.over_grpc(master_addr) as client, TcpTransport() as transport:
        reply = client.call("PutStart", master_pb2.PutStartRequest(
            keys=keys, sizes=[size_bytes] * num_objects, client_id="writer"))
        assert list(reply.statuses) == [master_pb2.ITEM_OK] * num_objects
        for i, key in enumerate(keys):
            j = reply.replica_start[i]
            segment = reply.segments[reply.replica_segment[j]]
            node = reply.nodes[segment.node_index]
            target = Target(node.node_id, node.host_id, node.data_addr, segment.segment_id,
                            segment.shm_name, reply.replica_offset[j], size_bytes,
                            reply.replica_capability[j])
            transport.write(target, memoryview(values[key]), timeout_s=10)
        client.call("PutEnd", master_pb2.PutEndRequest(
            keys=keys, client_id="writer",
            checksums=[xxhash.xxh64_intdigest(values[key]) for key in keys]))
    return values


def read_objects(master_addr: str, keys: list[str]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with RawMaster.over_grpc(master_addr) as client, TcpTransport() as transport:
        reply = client.call("GetReplicas", master_pb2.GetReplicasRequest(keys=keys))
        for i, key in enumerate(keys):
            if reply.statuses[i] != master_pb2.ITEM_OK:
                out[key] = None
                continue
            j = reply.replica_start[i]
            segment = reply.segments[reply.replica_segment[j]]
            node = reply.nodes[segment.node_index]
            buffer = bytearray(reply.sizes[i])
            transport.read_into(Target(node.node_id, node.host_id, node.data_addr,
                                       segment.segment_id, segment.shm_name,
                                       reply.replica_offset[j], reply.sizes[i],
                                       reply.replica_read_capability[j]),
                                memoryview(buffer), timeout_s=10)
            out[key] = bytes(buffer)
    return out


def test_master_restart_adopts_the_daemons_inventory():
    port = free_port()
    master_args = ["master", "--port", str(port), "--node-ttl", "2s", *FAST_BEAT]
    master = ServerProcess(master_args)
    daemon = run_in_thread(DaemonConfig(master_addr=master.address, dram_bytes=32 * 1024**2,
                                        node_id="restart-node", register_timeout_s=10))
    try:
        values = put_objects(master.address, num_objects=40, size_bytes=100_000)
        # the heartbeats bring the 40 commits into the daemon's own table
        assert wait_until(lambda: len(daemon.daemon.objects) == 40)
        master.kill()
        master.close()
        master = ServerProcess(master_args)
        # the daemon notices (known=false), re-registers, and the master adopts its objects
        assert wait_until(lambda: any(n.num_objects == 40 for n in list_nodes(master.address)))
        # NOTE: the daemon counts a registration once the reply is back, which can be just
        # after the master lists the adopted objects
        assert wait_until(lambda: daemon.daemon.master_link.num_registrations == 2)
        assert read_objects(master.address, list(values)) == values
        # the change log continues: a remove reaches the daemon's table
        with RawMaster.over_grpc(master.address) as client:
            client.call("Remove", master_pb2.RemoveRequest(keys=["restart/0"], force=True))
        assert wait_until(lambda: len(daemon.daemon.objects) == 39)
        assert daemon.daemon.objects.get("restart/0") is None
    finally:
        daemon.stop()
        master.close()


def test_daemon_waits_for_a_master_that_starts_later():
    port = free_port()
    daemon = DaemonPopen("--master", f"127.0.0.1:{port}", "--dram", "4MiB", "--node-id", "early")
    try:
        # the daemon runs and has been refused twice: it is retrying against nothing
        assert wait_until(lambda: daemon.num_logged("retrying registration") >= 2,
                          timeout_s=60), "".join(daemon.err)
        assert daemon.proc.poll() is None
        assert not any("listening on" in line for line in daemon.out), \
            "the daemon must not report listening before it has registered"
        with ServerProcess(["master", "--port", str(port)]) as master:
            assert wait_until(lambda: any("listening on" in line for line in daemon.out),
                              timeout_s=30), "".join(daemon.err)
            # by the time it says so, it is registered
            assert [n.node_id for n in list_nodes(master.address)] == ["early"]
    finally:
        daemon.close()


def test_token_is_required_by_master_and_data_plane():
    env = {"KVSTORE_TOKEN": "tok"}
    with ServerProcess(["master", "--port", "0"], env=env) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "4MiB",
                           "--no-write-capabilities"], env=env) as daemon:
        (node,) = list_nodes(master.address, token="tok")
        target = Target(node.node_id, node.host_id, daemon.address, "dram0", "", 0, 3)
        with TcpTransport(token="tok") as transport:
            transport.write(target, memoryview(b"abc"), timeout_s=10)
        wrong = subprocess.run([str(KVSTORE_BIN), "daemon", "--master", master.address,
                                "--dram", "4MiB", "--token", "bad"],
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode != 0
        assert "UNAUTHENTICATED" in wrong.stderr
        assert "listening on" not in wrong.stdout


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_available(), reason="CUDA is available: --gpu works here "
                    "(test_gpu_tier_serves_reads_and_writes)")
def test_gpu_tier_without_cuda_is_a_clear_error():
    result = subprocess.run([str(KVSTORE_BIN), "daemon", "--standalone", "--dram", "4MiB",
                             "--gpu", "cuda:0:1GiB"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "not supported on this build" in result.stderr
    assert "listening on" not in result.stdout


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU and a CUDA build of torch")
def test_gpu_tier_serves_reads_and_writes():
    data = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    with ServerProcess(["daemon", "--standalone", "--dram", "4MiB", "--node-id", "gpu-node",
                        "--gpu", "cuda:0:64MiB"]) as daemon, TcpTransport() as transport:
        target = Target("gpu-node", "h", daemon.address, "hbm0", "", 1 << 20, len(data))
        transport.write(target, memoryview(data), timeout_s=30)
        out = bytearray(len(data))
        transport.read_into(target, memoryview(out), timeout_s=30)
        assert bytes(out) == data
        with pytest.raises(TransferError):                     # past the segment's end
            transport.read_into(target._replace(offset=64 << 20), memoryview(out),
                                timeout_s=30)


def test_metrics_count_data_plane_traffic():
    import urllib.request

    port = free_port()
    with ServerProcess(["daemon", "--standalone", "--dram", "4MiB", "--node-id", "metrics-node",
                        "--metrics-port", str(port)]) as daemon, TcpTransport() as transport:
        target = Target("metrics-node", "h", daemon.address, "dram0", "", 0, 1000)
        transport.write(target, memoryview(bytes(1000)), timeout_s=10)
        transport.read_into(target, memoryview(bytearray(1000)), timeout_s=10)
        with pytest.raises(TransferError):
            transport.read_into(Target("metrics-node", "h", daemon.address, "dram0", "",
                                       4 * 1024**2, 1), memoryview(bytearray(1)), timeout_s=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        lines = set(text.decode().splitlines())
        assert "kvstore_daemon_writes_total 1.0" in lines
        assert "kvstore_daemon_reads_total 1.0" in lines
        assert "kvstore_daemon_written_bytes_total 1000.0" in lines
        assert "kvstore_daemon_errors_total 1.0" in lines
        assert 'kvstore_daemon_segment_capacity_bytes{segment="dram0",tier="dram"} 4.194304e+06' \
            in lines


def test_sigterm_while_waiting_for_the_master_exits_cleanly():
    port = free_port()
    daemon = DaemonPopen("--master", f"127.0.0.1:{port}", "--dram", "4MiB",
                         "--node-id", "impatient")
    try:
        # wait until it is retrying (its log says so), then ask it to stop
        assert wait_until(lambda: daemon.num_logged("retrying registration") >= 1,
                          timeout_s=60), "".join(daemon.err)
        assert any(n.startswith("kvstore-impatient-") for n in os.listdir("/dev/shm"))
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=15) == 0, "".join(daemon.err)
    finally:
        daemon.close()
    assert not any("listening on" in line for line in daemon.out)
    assert not any(n.startswith("kvstore-impatient-") for n in os.listdir("/dev/shm"))