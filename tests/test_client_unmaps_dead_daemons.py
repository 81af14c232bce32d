"""A client unmaps what a dead daemon shared with it (issue 10, 10y): its segments (the shm
transport), their location tables (client/shm_locations.py) and its commit ring, so a
client of a daemon restarted many times holds the mappings of the live incarnation only.

Real master and daemon processes; the count is of this process's own mappings of
``/dev/shm/kvstore-*`` objects, read from /proc/self/maps."""

from __future__ import annotations

import gc
import re

from client_cluster import Cluster, payload
from conditions import wait_for
from servers import ServerProcess

import kvstore

KiB = 1 << 10


def _shm_mappings(node_tag: str) -> set[str]:
    """The /dev/shm objects of nodes named ``node_tag*`` this process maps (one name per
    object, however many areas; unlinked ones end in " (deleted)")."""
    names = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            match = re.search(r"(/dev/shm/kvstore-\S*" + re.escape(node_tag) + r".*)$", line)
            if match:
                names.add(match.group(1))
    return names


def _use(store, key: str, seed: int) -> bytes:
    """Put ``key`` (the ring or a commit frame), read it through the master and then from
    the cache (the segment and its location table mapped)."""
    value = payload(8 * KiB, seed)
    store.put(key, value)
    assert store.get(key) == value

    def cached():
        hits = store.stats()["location_cache"]["shm_hits"]
        return store.get(key) == value and store.stats()["location_cache"]["shm_hits"] > hits
    wait_for(cached, f"a cached shm get of {key!r}")
    return value


def test_a_client_of_a_daemon_restarted_many_times_maps_one_incarnation():
    daemon_args = ["daemon", "--host", "127.0.0.1", "--port", "0", "--dram", "8MiB",
                   "--node-id", "unmap-node"]
    cluster = Cluster(num_daemons=0, master_args=("--heartbeat-interval", "200ms"))
    try:
        cluster.daemons.append(ServerProcess([daemon_args[0], "--master", cluster.address,
                                              *daemon_args[1:]]))
        cluster.wait_nodes(1)
        with cluster.connect() as store:
            _use(store, "unmap/0", seed=0)
            first = _shm_mappings("unmap-node")
            # a segment, its location table and the commit ring
            assert len(first) >= 3, first
            for restart in range(1, 6):
                # SIGTERM: the daemon unlinks its names and unregisters, as at a clean stop
                cluster.daemons[0].close()
                cluster.daemons[0] = ServerProcess([daemon_args[0], "--master",
                                                    cluster.address, *daemon_args[1:]])
                wait_for(lambda: store.stats()["master"]["num_nodes"] == 1,
                         "the restarted daemon")
                value = _use(store, f"unmap/{restart}", seed=restart)
                gc.collect()
                mapped = _shm_mappings("unmap-node")
                assert not [name for name in mapped if name.endswith("(deleted)")], mapped
                assert len(mapped) == len(first), (restart, mapped)
                assert store.get(f"unmap/{restart}") == value
    finally:
        cluster.close()
