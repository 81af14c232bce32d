"""A daemon's own object table over its life, against real master processes: evictions and
forced removes reach it, a restarted master never re-adopts an evicted or removed key, a
registration refused as ALREADY_EXISTS is retried, and a daemon SIGSTOPped past
``--node-ttl`` re-registers with its inventory when resumed, its objects readable again."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

import kvstore
from kvstore.daemon.config import DaemonConfig
from kvstore.daemon.server import run_in_thread
from raw_master import RawMaster
from kvstore.v1 import master_pb2
from servers import ServerProcess

BLOCK = 256 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(predicate, timeout_s: float = 20.0) -> bool:
    """Poll state another process makes true (real time: no clock to advance there)."""
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        try:
            if predicate():
                return True
        except kvstore.MasterUnavailableError:
            pass
        time.sleep(0.05)
    return predicate()


def _nodes(address: str):
    with RawMaster.over_grpc(address) as client:
        return list(client.call("ListNodes", master_pb2.ListNodesRequest()).nodes)


def _table_keys(daemon) -> set[str]:
    return set(daemon.daemon.objects.to_inventory().keys)


def _restarted(master: ServerProcess, master_args: list[str]) -> ServerProcess:
    """SIGKILL ``master`` and start a new one on the same address (empty state)."""
    master.kill()
    master.close()
    return ServerProcess(master_args)


def _pause_heartbeats(link) -> None:
    """Stop the daemon's heartbeat thread (registrations run on it), so a test can drive
    the link from its own thread; ``link.start_heartbeats()`` resumes it."""
    link._stop.set()
    link._wake.set()
    link._thread.join(timeout=30)
    link._stop.clear()


def test_evictions_and_removes_reach_the_table_and_are_never_readopted():
    port = _free_port()
    master_args = ["master", "--port", str(port), "--heartbeat-interval", "100ms"]
    master = ServerProcess(master_args)
    daemon = run_in_thread(DaemonConfig(master_addr=master.address, dram_bytes=4 * 1024**2,
                                        node_id="life-node", register_timeout_s=10))
    try:
        keys = [f"life/{i}" for i in range(24)]                 # 6 MiB through 4 MiB
        values = {key: os.urandom(BLOCK) for key in keys}
        with kvstore.connect(master.address, transport="tcp") as store:
            for key in keys:
                store.put(key, values[key])
            assert store.stats()["master"]["evictions"] > 0
            present = [key for key, ok in zip(keys, store.batch_exists(keys)) if ok]
            evicted = sorted(set(keys) - set(present))
            removed = present[0]
            assert store.remove(removed, force=True) is True
            survivors = set(present) - {removed}
        assert evicted and survivors
        # the heartbeats bring both kinds of removal into the daemon's own table
        assert _wait_until(lambda: _table_keys(daemon) == survivors), \
            sorted(_table_keys(daemon) ^ survivors)[:5]

        master = _restarted(master, master_args)                # same address, empty state
        assert _wait_until(lambda: any(n.num_objects == len(survivors)
                                       for n in _nodes(master.address)))
        with kvstore.connect(master.address, transport="tcp") as store:
            assert store.batch_exists(evicted + [removed]) == [False] * (len(evicted) + 1)
            ordered = sorted(survivors)
            assert store.batch_get(ordered) == [values[key] for key in ordered]

            # a registration the master does not take as a repeat (a fresh token: the last
            # one succeeded): the master still lists this node, so it is refused
            # ALREADY_EXISTS; the link unregisters the stale entry and registers again with
            # its inventory, and nothing stored is lost (a repeat after a lost reply: below)
            # NOTE: with the heartbeat thread paused: registrations run on that thread in the
            # daemon, and one from here racing its beats is not a case the daemon has
            link = daemon.daemon.master_link
            _pause_heartbeats(link)
            before = link.num_registrations
            link._register_once()
            assert link.num_registrations == before + 1
            link.start_heartbeats()
            assert [n.num_objects for n in _nodes(master.address)] == [len(survivors)]
            assert store.batch_get(ordered) == [values[key] for key in ordered]
    finally:
        daemon.stop()
        master.close()


def test_puts_placed_while_a_registration_reply_is_lost_survive_a_master_restart():
    # a registration the master applied but whose reply the daemon never got: writers'
    # commits since then carry that registration's secret; the retry (same token) must be
    # answered as the same registration, so those commits apply and nothing is unregistered
    port = _free_port()
    master_args = ["master", "--port", str(port), "--heartbeat-interval", "100ms"]
    master = ServerProcess(master_args)
    daemon = run_in_thread(DaemonConfig(master_addr=master.address, dram_bytes=16 * 1024**2,
                                        node_id="lost-reply", register_timeout_s=10))
    try:
        link = daemon.daemon.master_link
        _pause_heartbeats(link)
        master = _restarted(master, master_args)    # a new master: the daemon registers again
        table = link._table
        table.before_change()
        table.begin_registration()          # what an attempt in flight holds
        link._registration_token = "lost-reply-token"
        link._client.register_node(link._node, table.to_inventory(),
                                   registration_token="lost-reply-token")   # reply "lost"
        keys = [f"lost/{i}" for i in range(8)]
        values = {key: os.urandom(BLOCK) for key in keys}
        with kvstore.connect(master.address) as store:
            for key in keys:
                store.put(key, values[key])
            link.register(timeout_s=10)         # the retry
        link.start_heartbeats()
        assert _wait_until(lambda: set(keys) <= _table_keys(daemon)), \
            sorted(set(keys) - _table_keys(daemon))
        master = _restarted(master, master_args)                # same address, empty state
        assert _wait_until(lambda: any(n.num_objects == len(keys)
                                       for n in _nodes(master.address)))
        with kvstore.connect(master.address) as store:
            assert store.batch_get(keys) == [values[key] for key in keys]
    finally:
        daemon.stop()
        master.close()


def _daemon_objects(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    (line,) = [l for l in text.splitlines() if l.startswith("kvstore_daemon_objects ")]
    return float(line.split()[1])


def test_a_daemon_stopped_past_the_node_ttl_reregisters_with_its_objects():
    metrics_port = _free_port()
    with ServerProcess(["master", "--port", "0", "--node-ttl", "1s",
                        "--heartbeat-interval", "100ms"]) as master, \
            ServerProcess(["daemon", "--master", master.address, "--dram", "16MiB",
                           "--node-id", "sleeper", "--metrics-port", str(metrics_port)]) as daemon:
        keys = [f"sleep/{i}" for i in range(10)]
        values = [os.urandom(BLOCK) for _ in keys]
        with kvstore.connect(master.address, transport="auto") as store:
            assert store.batch_put(keys, values) == [None] * 10
            assert _wait_until(lambda: _daemon_objects(metrics_port) == 10)   # in its table
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                assert _wait_until(lambda: _nodes(master.address) == [])      # dropped
                assert store.batch_exists(keys) == [False] * 10
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
            # its next heartbeat is answered known=false: it registers again with its table
            assert _wait_until(lambda: [(n.node_id, n.num_objects)
                                        for n in _nodes(master.address)] == [("sleeper", 10)])
            assert store.batch_get(keys) == values
        assert daemon.stderr().count("registered node sleeper") == 2
