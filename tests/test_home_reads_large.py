"""Large home reads (client/home_reads.py ``_read_located``, daemon/keyed_reads.py LOCATED,
daemon/dataplane.py ``_check_location``): a first get of a value the tcp transport stripes
asks the key's home for its location (KEYED_READ with FLAG_LOCATE) and reads it striped by
CHECKED_READs carrying the keyed-read capability, without the master; a remove or replace
between the two round trips is refused (LOCATION_STALE, or a checksum mismatch), never
answered with other bytes.

Real master and daemon processes on loopback; clients with ``transport="tcp"``.
"""

from __future__ import annotations

import socket
import threading

import pytest
from client_cluster import Cluster, payload
from conditions import wait_for

import kvstore
from kvstore.client.checksum import checksum
from kvstore.home import home_of, node_seeds
from kvstore.transport import data_frames, keyed_read
from kvstore.transport.checked_read import encode_identity
from kvstore.transport.data_frames import Op, Status

KiB, MiB = 1 << 10, 1 << 20
TIMEOUT_S = 10.0
BEATS = ("--heartbeat-interval", "200ms")
LARGE = 4 * MiB


def _home(store) -> dict:
    return store.stats()["home_reads"]


def _home_node(store, key: str):
    nodes = store._master.get_home_nodes()
    node_id = home_of(key, node_seeds([n.node_id for n in nodes.nodes]))
    return next(n for n in nodes.nodes if n.node_id == node_id)


def _served_at_home(store, key: str, read):
    """``read(key)`` until the key's home serves it (its location lease starts with its
    first up-to-date heartbeat); return what it returned."""
    def served():
        hits = _home(store)["hits"]
        value = read(key)
        return (value,) if _home(store)["hits"] > hits else None
    return wait_for(served, f"a home read of {key!r}")[0]


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(num_daemons=2, dram="128MiB", master_args=BEATS)
    yield cluster
    cluster.close()


@pytest.fixture
def stores(cluster):
    reader = cluster.connect(transport="tcp")
    writer = cluster.connect(transport="tcp", location_cache_entries=0, home_reads=False)
    yield reader, writer
    reader.close()
    writer.close()


def test_a_large_first_get_is_read_by_its_location_at_home_then_from_the_cache(stores):
    reader, writer = stores
    keys = [f"hl/first/{i}" for i in range(3)]
    values = [payload(LARGE, seed=i) for i in range(3)]
    writer.batch_put(keys, values)
    writer.put("hl/first/warm", payload(KiB, seed=9))
    _served_at_home(reader, "hl/first/warm", reader.get)       # the homes' leases hold
    home, cache = _home(reader), reader.stats()["location_cache"]
    assert reader.get(keys[0]) == values[0]
    out = bytearray(LARGE + 7)                     # larger than the value: fine
    assert reader.get_into(keys[1], out) == LARGE and bytes(out[:LARGE]) == values[1]
    got = reader.batch_get([keys[2], "hl/first/warm"])
    assert got == [values[2], payload(KiB, seed=9)]
    after = _home(reader)
    # served at home, none through the master (GetReplicas would leave hits unchanged)
    assert after["hits"] == home["hits"] + 4 and after["located"] == home["located"] + 3
    assert reader.stats()["location_cache"]["entries"] == cache["entries"] + 3
    hits = reader.stats()["location_cache"]["hits"]
    assert reader.batch_get(keys) == values       # again: the cached locations
    assert reader.stats()["location_cache"]["hits"] == hits + 3
    assert _home(reader)["hits"] == after["hits"]


def test_a_large_get_into_a_too_small_out_is_the_master_paths_error(stores):
    reader, writer = stores
    writer.put("hl/small-out", payload(LARGE, seed=20))
    _served_at_home(reader, "hl/small-out", reader.get)
    with pytest.raises(kvstore.InvalidArgumentError):
        reader.get_into("hl/small-out", bytearray(LARGE - 1))
    assert writer.get("hl/small-out") == payload(LARGE, seed=20)


def _raw(data_addr: str, token: str | None = None) -> socket.socket:
    host, port = data_addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    sock.sendall(data_frames.encode_hello(token))
    assert _reply(sock)[0] == Status.OK
    return sock


def _reply(sock) -> tuple[Status, str, int]:
    header = data_frames.recv_exact(sock, data_frames.REPLY.size)
    status, _, msg_len, _, length = data_frames.REPLY.unpack(header)
    return Status(status), data_frames.recv_exact(sock, msg_len).decode(), length


def _locate(sock, key: str, cap: bytes) -> keyed_read.Located:
    sock.sendall(keyed_read.encode_keyed_read(1, key.encode(), cap, 2 * MiB - 1, locate=True))
    status, message, length = _reply(sock)
    assert status == Status.LOCATED, message
    body = data_frames.recv_exact(sock, length)
    head = data_frames.LOCATION.size
    check, offset, size = data_frames.LOCATION.unpack(body[:head])
    return keyed_read.Located(body[head:].decode(), offset, size, check)


def _checked_read(sock, key: str, where: keyed_read.Located, cap: bytes,
                  expected: int | None = None) -> tuple[Status, str, bytes]:
    identity = encode_identity(key, where.checksum if expected is None else expected, cap)
    sock.sendall(data_frames.encode_request(Op.CHECKED_READ, where.segment_id.encode(), 2,
                                            where.offset, where.size_bytes, identity))
    status, message, length = _reply(sock)
    return status, message, data_frames.recv_exact(sock, length) if length else b""


def test_located_ranges_are_read_with_the_keyed_capability_and_refused_once_stale(stores):
    reader, writer = stores
    key = "hl/raw"
    old, new = payload(LARGE, seed=30), payload(LARGE, seed=31)
    writer.put(key, old)
    _served_at_home(reader, key, reader.get)
    node = _home_node(writer, key)
    other = next(n for n in writer._master.get_home_nodes().nodes
                 if n.node_id != node.node_id)
    cap = node.keyed_read_capability
    assert cap                                   # the daemons check reads by default
    forged = bytearray(cap)
    forged[-1] ^= 1
    with _raw(node.data_addr) as sock:
        # without FLAG_LOCATE (a client older than it): TOO_LARGE, as before
        sock.sendall(keyed_read.encode_keyed_read(1, key.encode(), cap, 2 * MiB - 1))
        assert _reply(sock)[:1] == (Status.TOO_LARGE,)
        where = _locate(sock, key, cap)
        assert where.size_bytes == LARGE and where.checksum == checksum(old)
        status, message, body = _checked_read(sock, key, where, cap)
        assert status == Status.OK and body == old, message
        for bad in (b"", bytes(forged), other.keyed_read_capability):
            status, message, _ = _checked_read(sock, key, where, bad)
            assert status == Status.CAPABILITY_REFUSED, message
        # a stripe of the range, as the client reads it
        half = where._replace(offset=where.offset + MiB, size_bytes=MiB)
        sock.sendall(data_frames.encode_request(
            Op.CHECKED_READ, where.segment_id.encode(), 3, half.offset, MiB,
            encode_identity(key, where.checksum, cap)))
        status, _, length = _reply(sock)
        assert status == Status.OK and data_frames.recv_exact(sock, length) == old[MiB:2 * MiB]
        # the window between LOCATED and the read: a confirmed remove, then a replace
        assert writer.remove(key, force=True) is True
        status, message, _ = _checked_read(sock, key, where, cap)
        assert status in (Status.LOCATION_STALE, Status.LOCATION_OFF), message
        writer.put(key, new)
        status, message, _ = _checked_read(sock, key, where, cap)
        assert status != Status.OK, message      # the table holds another checksum
        fresh = _locate(sock, key, cap)
        status, _, body = _checked_read(sock, key, fresh, cap)
        assert status == Status.OK and body == new
    assert reader.get(key) == new


def test_large_home_reads_racing_removes_and_replaces_never_return_other_bytes(cluster):
    values = [payload(LARGE, seed=40 + i) for i in range(3)]
    key = "hl/race"
    with cluster.connect(transport="tcp", location_cache_entries=0) as first, \
            cluster.connect(transport="tcp") as cached, \
            cluster.connect(transport="tcp", location_cache_entries=0,
                            home_reads=False) as writer:
        writer.put(key, values[0])
        _served_at_home(first, key, first.get)
        stop = threading.Event()
        wrong: list[str] = []
        counts = {"ok": 0, "absent": 0}

        def read(store) -> None:
            out = bytearray(LARGE)
            while not stop.is_set():
                for call in (lambda: store.get(key),
                             lambda: bytes(out) if store.get_into(key, out) else b""):
                    try:
                        got = call()
                    except kvstore.KeyNotFoundError:
                        counts["absent"] += 1
                        continue
                    except kvstore.KVStoreError:
                        continue            # e.g. leased by the other reader: retryable
                    if got not in values:
                        wrong.append(f"{len(got)} bytes, checksum {checksum(got):x}")
                    else:
                        counts["ok"] += 1

        readers = [threading.Thread(target=read, args=(s,)) for s in (first, cached)]
        for thread in readers:
            thread.start()
        try:
            for round_ in range(30):
                writer.remove(key, force=True)
                writer.put(key, values[round_ % len(values)])
        finally:
            stop.set()
            for thread in readers:
                thread.join()
        assert not wrong, wrong[:3]
        assert counts["ok"] > 0
        located = _home(first)["located"]
        assert first.get(key) == values[29 % len(values)]
        assert _home(first)["located"] == located + 1    # the path the first reader took


def test_a_tenants_keyed_capability_never_reads_another_tenants_located_range(
        two_tenants_file):
    cluster = Cluster(num_daemons=1, dram="64MiB", token="cluster-secret",
                      master_args=("--tenants", str(two_tenants_file), *BEATS))
    try:
        with kvstore.connect(cluster.address, token="alpha-secret", transport="tcp") as alpha, \
                kvstore.connect(cluster.address, token="beta-secret", transport="tcp") as beta:
            value = payload(LARGE, seed=50)
            beta.put("big", value)
            assert _served_at_home(beta, "big", beta.get) == value     # located, at home
            assert _home(beta)["located"] >= 1
            (alpha_node,) = alpha._master.get_home_nodes().nodes
            (beta_node,) = beta._master.get_home_nodes().nodes
            with _raw(beta_node.data_addr, beta._master.stats().data_token) as sock:
                where = _locate(sock, "beta/big", beta_node.keyed_read_capability)
                # beta's range, checksum and all, with alpha's capability: refused
                status, message, _ = _checked_read(sock, "beta/big", where,
                                                   alpha_node.keyed_read_capability)
                assert status == Status.CAPABILITY_REFUSED, message
                status, _, body = _checked_read(sock, "beta/big", where,
                                                beta_node.keyed_read_capability)
                assert status == Status.OK and body == value
            with pytest.raises(kvstore.KeyNotFoundError):
                alpha.get("big")
    finally:
        cluster.close()
