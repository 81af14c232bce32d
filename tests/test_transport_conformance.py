"""One conformance suite, run against every transport (shm, nixl, tcp): each must move the exact
bytes of every size, refuse what lies outside a segment without touching neighbours, report
per item in batches, and fail with kvstore's errors naming the node.

The cluster is real: a `kvstore master` and a `kvstore daemon` process on loopback; the
segments' shm names and addresses come from the master's ListNodes, as a client gets them.
With NIXL installed (``make test`` installs it) the daemon runs with ``--nixl`` and the nixl
transport, in this process, reads and writes its DRAM one-sided (UCX over CMA/TCP here).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from servers import ServerProcess

from kvstore import ClosedError, InvalidArgumentError, TransferError, TransferTimeoutError
from raw_master import RawMaster
from kvstore.transport import local_host_id, make_transports, nixl_installed
from kvstore.transport.base import Target
from kvstore.transport.shm import ShmTransport
from kvstore.transport.tcp import TcpTransport
from kvstore.v1 import master_pb2

SEGMENT_BYTES = 192 * 1024 * 1024
SIZES = [0, 1, 4095, 64 * 1024, 1024 * 1024 + 1, 64 * 1024 * 1024]
TIMEOUT_S = 20.0
NIXL = nixl_installed()
NO_NIXL = "NIXL is not installed (make test installs it: requirements-nixl.txt)"
KINDS = ["shm", pytest.param("nixl", marks=pytest.mark.skipif(not NIXL, reason=NO_NIXL)), "tcp"]


@pytest.fixture(scope="module")
def cluster():
    with ServerProcess(["master", "--port", "0"]) as master:
        # NOTE: the transports are tested on ranges the test picks, not ones the master
        # allocated: the daemon's write capabilities are tested in test_write_capabilities
        with ServerProcess(["daemon", "--no-write-capabilities", "--master", master.address,
                            "--dram",
                            str(SEGMENT_BYTES), "--node-id", "conformance-node"]
                           + (["--nixl"] if NIXL else [])) as daemon:
            with RawMaster.over_grpc(master.address) as client:
                nodes = client.call("ListNodes", master_pb2.ListNodesRequest()).nodes
            yield daemon, nodes[0]


def published(node: master_pb2.NodeInfo):
    """The ``nodes`` directory a client gives the nixl transport, for this one node."""
    return lambda: {node.node_id: node.nixl_metadata}


def open_transport(kind: str, node: master_pb2.NodeInfo):
    return make_transports(kind, nodes=published(node))[0]


def make_target(node: master_pb2.NodeInfo, offset: int, length: int) -> Target:
    segment = node.segments[0]
    return Target(node.node_id, node.host_id, node.data_addr, segment.segment_id,
                  segment.shm_name, offset, length)


@pytest.fixture(params=KINDS)
def transport(request, cluster):
    with open_transport(request.param, cluster[1]) as transport:
        yield transport


def random_bytes(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


@pytest.mark.parametrize("size", SIZES)
def test_roundtrip_is_byte_identical(cluster, transport, size):
    _, node = cluster
    data = random_bytes(size, size)
    target = make_target(node, 4096 + size % 7, size)
    transport.write(target, memoryview(data), timeout_s=TIMEOUT_S)
    out = np.zeros(size, dtype=np.uint8)
    transport.read_into(target, memoryview(out), timeout_s=TIMEOUT_S)
    assert np.array_equal(out, data)


def _nixl_pair(writer: str, reader: str):
    return pytest.param(writer, reader, marks=pytest.mark.skipif(not NIXL, reason=NO_NIXL))


@pytest.mark.parametrize("writer_kind, reader_kind", [
    ("shm", "tcp"), ("tcp", "shm"), _nixl_pair("nixl", "tcp"), _nixl_pair("shm", "nixl")])
def test_transports_see_the_same_segment(cluster, writer_kind, reader_kind):
    _, node = cluster
    writer, reader = open_transport(writer_kind, node), open_transport(reader_kind, node)
    data = random_bytes(1024 * 1024 + 1, 7)
    target = make_target(node, 80 * 1024 * 1024 + 3, len(data))
    writer.write(target, memoryview(data), timeout_s=TIMEOUT_S)
    out = np.zeros(len(data), dtype=np.uint8)
    reader.read_into(target, memoryview(out), timeout_s=TIMEOUT_S)
    assert np.array_equal(out, data)
    writer.close()
    reader.close()


def test_last_bytes_of_segment_are_reachable(cluster, transport):
    _, node = cluster
    data = random_bytes(4096, 3)
    target = make_target(node, SEGMENT_BYTES - 4096, 4096)
    transport.write(target, memoryview(data), timeout_s=TIMEOUT_S)
    out = np.zeros(4096, dtype=np.uint8)
    transport.read_into(target, memoryview(out), timeout_s=TIMEOUT_S)
    assert np.array_equal(out, data)


def test_range_past_segment_end_is_refused_and_writes_nothing(cluster, transport):
    _, node = cluster
    guard = random_bytes(4096, 11)
    guard_target = make_target(node, SEGMENT_BYTES - 4096, 4096)
    transport.write(guard_target, memoryview(guard), timeout_s=TIMEOUT_S)
    past_end = make_target(node, SEGMENT_BYTES - 100, 4096)
    with pytest.raises(TransferError, match="conformance-node"):
        transport.write(past_end, memoryview(np.zeros(4096, np.uint8)), timeout_s=TIMEOUT_S)
    with pytest.raises(TransferError, match="conformance-node"):
        transport.read_into(past_end, memoryview(np.zeros(4096, np.uint8)), timeout_s=TIMEOUT_S)
    # the transport is still usable and the bytes next to the refused range are intact
    out = np.zeros(4096, dtype=np.uint8)
    transport.read_into(guard_target, memoryview(out), timeout_s=TIMEOUT_S)
    assert np.array_equal(out, guard)


def test_buffer_of_wrong_size_is_invalid_argument(cluster, transport):
    _, node = cluster
    target = make_target(node, 0, 100)
    with pytest.raises(InvalidArgumentError):
        transport.write(target, memoryview(bytes(99)), timeout_s=TIMEOUT_S)
    with pytest.raises(InvalidArgumentError):
        transport.read_into(target, memoryview(bytearray(101)), timeout_s=TIMEOUT_S)
    with pytest.raises(InvalidArgumentError):
        transport.read_into(target, memoryview(bytes(100)), timeout_s=TIMEOUT_S)  # read-only


def test_batches_report_per_item_and_keep_order(cluster, transport):
    _, node = cluster
    num_items, item_bytes = 130, 64 * 1024
    base = 96 * 1024 * 1024
    sources = [random_bytes(item_bytes, 100 + i) for i in range(num_items)]
    items = [(make_target(node, base + i * item_bytes, item_bytes), memoryview(src))
             for i, src in enumerate(sources)]
    items[5] = (make_target(node, SEGMENT_BYTES, item_bytes), items[5][1])  # out of range
    results = transport.write_many(items, timeout_s=TIMEOUT_S)
    assert isinstance(results[5], TransferError)
    assert all(r is None for i, r in enumerate(results) if i != 5)
    outs = [np.zeros(item_bytes, np.uint8) for _ in range(num_items)]
    read_items = [(target, memoryview(out)) for (target, _), out in zip(items, outs)]
    results = transport.read_many(read_items, timeout_s=TIMEOUT_S)
    assert isinstance(results[5], TransferError)
    for i in range(num_items):
        if i != 5:
            assert results[i] is None
            assert np.array_equal(outs[i], sources[i]), i


def test_concurrent_threads_write_disjoint_ranges(cluster, transport):
    _, node = cluster
    item_bytes = 3 * 1024 * 1024 + 5
    base = 120 * 1024 * 1024
    sources = [random_bytes(item_bytes, 200 + i) for i in range(6)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            transport.write(make_target(node, base + i * item_bytes, item_bytes),
                            memoryview(sources[i]), timeout_s=TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i in range(6):
        out = np.zeros(item_bytes, np.uint8)
        transport.read_into(make_target(node, base + i * item_bytes, item_bytes),
                            memoryview(out), timeout_s=TIMEOUT_S)
        assert np.array_equal(out, sources[i])


def test_closed_transport_refuses_use(cluster, transport):
    _, node = cluster
    transport.close()
    transport.close()  # idempotent
    with pytest.raises(ClosedError):
        transport.read_into(make_target(node, 0, 1), memoryview(bytearray(1)),
                            timeout_s=TIMEOUT_S)


def test_unreachable_segment_names_the_node(transport):
    target = Target("ghost-node", local_host_id(), "127.0.0.1:1", "dram0",
                    "/kvstore-ghost-does-not-exist", 0, 10)
    with pytest.raises(TransferError, match="ghost-node"):
        transport.read_into(target, memoryview(bytearray(10)), timeout_s=TIMEOUT_S)


def test_can_reach_follows_host_and_shm_name(cluster):
    _, node = cluster
    target = make_target(node, 0, 1)
    assert ShmTransport().can_reach(target)
    other_host = Target(target.node_id, "another-host", target.data_addr, target.segment_id,
                        target.shm_name, 0, 1)
    assert not ShmTransport().can_reach(other_host)
    assert TcpTransport().can_reach(other_host)


def test_tcp_times_out_on_a_silent_peer():
    with socket.create_server(("127.0.0.1", 0)) as silent:
        host, port = silent.getsockname()
        target = Target("silent-node", "h", f"{host}:{port}", "dram0", "", 0, 10)
        started_s = time.monotonic()
        with pytest.raises(TransferTimeoutError, match="silent-node"):
            TcpTransport().read_into(target, memoryview(bytearray(10)), timeout_s=0.3)
        assert time.monotonic() - started_s < 5


def test_make_transports_kinds():
    assert [t.name for t in make_transports()] == ["shm", "tcp"]
    assert [t.name for t in make_transports("shm")] == ["shm"]
    assert [t.name for t in make_transports("tcp", token="t")] == ["tcp"]
    with pytest.raises(InvalidArgumentError, match="auto, shm, nixl, tcp"):
        make_transports("carrier-pigeon")


def _host_id_in_a_new_process(**env: str) -> str:
    code = "from kvstore.transport import local_host_id; print(local_host_id())"
    environment = {k: v for k, v in os.environ.items() if k != "KVSTORE_HOST_ID"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**environment, **env}, check=True)
    return result.stdout.strip()


def test_local_host_id_agrees_across_processes_and_follows_the_override():
    """Two processes of this host get the same id (so shm is used between them), derived
    from the host, and KVSTORE_HOST_ID makes a process look like another host."""
    mine = _host_id_in_a_new_process()
    assert len(mine) == 32 and int(mine, 16) >= 0
    assert _host_id_in_a_new_process() == mine
    assert "KVSTORE_HOST_ID" in os.environ or local_host_id() == mine
    assert _host_id_in_a_new_process(KVSTORE_HOST_ID="elsewhere") == "elsewhere"
    # what the id hashes: a process on another host (another hostname) gets another id
    code = ("import socket; socket.gethostname = lambda: 'not-this-host'; "
            "from kvstore.transport import local_host_id; print(local_host_id())")
    environment = {k: v for k, v in os.environ.items() if k != "KVSTORE_HOST_ID"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60, env=environment, check=True).stdout.strip()
    assert len(other) == 32 and other != mine


def test_batch_of_one_large_range(cluster, transport):
    _, node = cluster
    data = random_bytes(9 * 1024 * 1024 + 3, 5)
    target = make_target(node, 140 * 1024 * 1024, len(data))
    assert transport.write_many([(target, memoryview(data))], timeout_s=TIMEOUT_S) == [None]
    out = np.zeros_like(data)
    assert transport.read_many([(target, memoryview(out))], timeout_s=TIMEOUT_S) == [None]
    assert np.array_equal(out, data)
    assert transport.read_many([], timeout_s=TIMEOUT_S) == []


def test_shm_drops_mappings_of_segments_whose_daemon_left():
    from kvstore._posix_shm import create_shm, unique_shm_name

    transport = ShmTransport()
    segments = [create_shm(unique_shm_name("kvstore-conf"), 4096) for _ in range(2)]
    targets = [Target("n", local_host_id(), "", "dram0", s.name, 0, 5) for s in segments]
    try:
        transport.write(targets[0], memoryview(b"first"), timeout_s=TIMEOUT_S)
        assert bytes(segments[0].view[:5]) == b"first"
        segments[0].unlink()  # its daemon exits: the cached mapping must not be used again
        transport.write(targets[1], memoryview(b"other"), timeout_s=TIMEOUT_S)
        with pytest.raises(TransferError, match="cannot map"):
            transport.write(targets[0], memoryview(b"again"), timeout_s=TIMEOUT_S)
    finally:
        for segment in segments:
            segment.unlink()
            segment.close()
        transport.close()


def test_tcp_batch_to_a_silent_peer_times_out_per_item():
    with socket.create_server(("127.0.0.1", 0)) as silent:
        host, port = silent.getsockname()
        items = [(Target("silent-node", "h", f"{host}:{port}", "dram0", "", i * 10, 10),
                  memoryview(bytearray(10))) for i in range(6)]
        started_s = time.monotonic()
        results = TcpTransport(num_streams=2).read_many(items, timeout_s=0.3)
        assert time.monotonic() - started_s < 5
        assert all(isinstance(r, TransferTimeoutError) for r in results), results


def test_closed_transport_refuses_large_and_batched_use(cluster, transport):
    _, node = cluster
    transport.close()
    big = make_target(node, 0, 8 * 1024 * 1024)
    with pytest.raises(ClosedError):
        transport.write(big, memoryview(bytes(big.length)), timeout_s=TIMEOUT_S)
    # a batch never fails whole: one error per item
    results = transport.read_many([(big, memoryview(bytearray(big.length)))] * 2,
                                  timeout_s=TIMEOUT_S)
    assert len(results) == 2 and all(isinstance(r, ClosedError) for r in results)


def test_shm_refuses_a_segment_whose_name_was_unlinked():
    """A cached mapping of a segment whose daemon is gone (name unlinked) is neither read
    nor written: TransferError naming the node, so the client falls back to another replica;
    a segment under a new name is mapped afresh."""
    from kvstore._posix_shm import create_shm, unique_shm_name

    segment = create_shm(unique_shm_name("kvstore-test-gone"), 1 << 20, prefault=False)
    target = Target("gone-node", local_host_id(), "127.0.0.1:1", "dram0", segment.name, 0, 4)
    with ShmTransport() as shm:
        shm.write(target, memoryview(b"live"), timeout_s=TIMEOUT_S)
        segment.unlink()
        with pytest.raises(TransferError, match="gone-node.*unlinked"):
            shm.read_into(target, memoryview(bytearray(4)), timeout_s=TIMEOUT_S)
        with pytest.raises(TransferError, match="gone-node"):
            shm.write(target, memoryview(b"lost"), timeout_s=TIMEOUT_S)
        assert bytes(segment.view[:4]) == b"live"          # nothing was written after it
        fresh = create_shm(unique_shm_name("kvstore-test-gone"), 1 << 20, prefault=False)
        try:
            moved = target._replace(shm_name=fresh.name)
            shm.write(moved, memoryview(b"next"), timeout_s=TIMEOUT_S)
            assert bytes(fresh.view[:4]) == b"next"
        finally:
            fresh.unlink()
            fresh.close()
    segment.close()


def test_shm_writable_ranges_of_one_batch_check_each_segment_once():
    """``writable_range(target, checked)``: a segment found linked is named in ``checked``
    and not checked again by the batch's later ranges; a segment not in it is, so an
    unlinked one still refuses (TransferError naming the node), and a fresh set checks anew."""
    from kvstore._posix_shm import create_shm, unique_shm_name

    segment = create_shm(unique_shm_name("kvstore-test-ranges"), 1 << 20, prefault=False)
    target = Target("ranges-node", local_host_id(), "127.0.0.1:1", "dram0", segment.name, 0, 4)
    with ShmTransport() as shm:
        checked: set[str] = set()
        view = shm.writable_range(target, checked)
        view[:] = b"mine"   # NOTE: this call mapped the segment, which checked it
        assert bytes(segment.view[:4]) == b"mine"
        second = shm.writable_range(target._replace(offset=8), checked)
        second[:] = b"more"
        assert checked == {segment.name} and bytes(segment.view[8:12]) == b"more"
        shm.writable_range(target._replace(offset=12), checked).release()   # no check
        segment.unlink()
        with pytest.raises(TransferError, match="ranges-node"):
            shm.writable_range(target._replace(offset=16), set())
        with pytest.raises(TransferError, match="ranges-node"):
            shm.writable_range(target._replace(offset=16))
        view.release()
        second.release()
    segment.close()
