"""A home read may serve a key before its put's PutEnd answered (the writer commits to the
daemon first: WRITE_COMMIT, CLIENT_COMMIT, the commit ring), and that breaks no promise
(docs/ARCHITECTURE.md, Home reads, "Before PutEnd"): the bytes served are the writer's,
whole and checksummed; a master that dies before answering leaves the key readable (the
rebuilt master adopts it from the daemon's table); a master that refuses the PutEnd has
the daemon drop the key before the writer hears of the refusal, so no read serves it after
the put's failure is reported.

Real master and daemon processes on loopback; tcp clients. The master is held at the
right point (SIGSTOP, tests/stopped_process.py) or the refusal made by a PutRevoke, from
inside the writer's own PutEnd call, never by timing."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from client_cluster import Cluster, payload
from conditions import wait_for
from servers import ServerProcess
from stopped_process import stop_process

import kvstore

KiB = 1 << 10
BEATS = ("--heartbeat-interval", "200ms")


def _home_hits(store) -> int:
    """The keys home reads served (read locally: ``stats()`` would ask the master too)."""
    return store._home.num_hits


def _warm(reader, writer, key: str) -> None:
    """Have ``reader`` hold the node list and the daemon its location lease: one home read
    of another key served."""
    writer.put(key, payload(4 * KiB, seed=99))

    def served():
        hits = _home_hits(reader)
        return reader.get(key) == payload(4 * KiB, seed=99) and _home_hits(reader) > hits
    wait_for(served, "a first home read")


def _hold_put_end(writer, before) -> None:
    """Run ``before()`` inside the writer's next PutEnd call, before it is sent (the
    daemon has the writer's commit by then: a single tcp put commits in its write)."""
    master = writer._master
    real = master.put_end

    def put_end(*args, **kwargs):
        master.put_end = real
        before()
        return real(*args, **kwargs)
    master.put_end = put_end


def test_a_key_read_before_put_end_stays_readable_when_the_master_dies():
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=BEATS)
    port = cluster.master.port
    restarted = None
    try:
        # NOTE: metadata over gRPC: the restarted master listens on the same gRPC port
        # (its fast-path port is a new one)
        with cluster.connect(transport="tcp", location_cache_entries=0,
                             metadata="grpc") as reader, \
                cluster.connect(transport="tcp", home_reads=False, metadata="grpc") as writer:
            _warm(reader, writer, "before/warm")
            value = payload(8 * KiB, seed=1)
            stopped = threading.Event()
            _hold_put_end(writer, lambda: (stop_process(cluster.master.proc.pid),
                                           stopped.set()))
            outcome = []
            thread = threading.Thread(target=lambda: outcome.append(_put(writer, value)))
            thread.start()
            assert stopped.wait(30)
            # the master never saw this PutEnd, yet the daemon serves the writer's bytes
            hits = _home_hits(reader)
            assert reader.get("before/dies") == value
            assert _home_hits(reader) == hits + 1
            os.kill(cluster.master.proc.pid, signal.SIGKILL)
            cluster.master.proc.wait(timeout=30)
            restarted = ServerProcess(["master", "--host", "127.0.0.1", "--port", str(port),
                                       *BEATS])
            thread.join(timeout=60)
            # the writer was not told success (its master died), ...
            assert outcome and isinstance(outcome[0], kvstore.KVStoreError), outcome
            # ... but what a reader saw is not rolled back: adopted from the daemon's table
            wait_for(lambda: _exists(reader, "before/dies"), "adoption by the new master")
            with cluster.connect(transport="tcp", home_reads=False, metadata="grpc",
                                 location_cache_entries=0) as plain:
                assert plain.get("before/dies") == value
            assert reader.get("before/dies") == value
    finally:
        cluster.close()
        if restarted is not None:
            restarted.close()


def test_a_key_whose_put_end_is_refused_is_gone_before_the_writer_hears_it():
    cluster = Cluster(num_daemons=1, dram="16MiB", master_args=BEATS)
    try:
        with cluster.connect(transport="tcp", location_cache_entries=0) as reader, \
                cluster.connect(transport="tcp", home_reads=False) as writer:
            _warm(reader, writer, "before/warm")
            value = payload(8 * KiB, seed=2)
            seen = []

            def read_then_revoke():
                hits = _home_hits(reader)
                seen.append(reader.get("before/refused"))       # committed on the daemon
                seen.append(_home_hits(reader) - hits)
                # the master's refusal: it drops the PENDING object (as its pending reclaim
                # would), so the PutEnd that follows finds the key not pending
                writer._master.put_revoke(["before/refused"], client_id=writer.client_id)
            _hold_put_end(writer, read_then_revoke)
            with pytest.raises(kvstore.KeyNotFoundError):
                writer.put("before/refused", value)
            assert seen == [value, 1]
            # told of the failure: no read serves the key, at home or through the master
            hits = _home_hits(reader)
            with pytest.raises(kvstore.KeyNotFoundError):
                reader.get("before/refused")
            assert _home_hits(reader) == hits
            assert not reader.exists("before/refused")
            assert writer.put("before/refused", value) is None    # a retry stores it anew
            assert reader.get("before/refused") == value
    finally:
        cluster.close()


def _put(store, value: bytes):
    try:
        return store.put("before/dies", value, timeout_s=20)
    except kvstore.KVStoreError as exc:
        return exc


def _exists(store, key: str) -> bool:
    try:
        return store.exists(key)
    except kvstore.MasterUnavailableError:
        return False             # the new master is not up yet
