"""The windows of a failover in which an acknowledged put could be lost (issue 10, 10y: the
once-seen loss in test_sigkill_leader_under_load_standby_takes_over), each held open on
purpose with real processes on a real etcd: a daemon that reports to the new leader only
after its takeover wait, and a writer that revokes and retries whole a put the old leader
had committed. Every acknowledged object must be served with its bytes afterwards."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from ha_cluster import HaCluster
from stopped_process import stop_process
from test_master_ha import _nodes, _wait

import kvstore


def _value(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, 16 * 1024, np.uint8).tobytes()


def _replica_nodes(store, key: str) -> set[str]:
    found, _ = store._master.get_replicas_leased([key])
    return {t.node_id for t in found[0].targets}


def _connect(cluster):
    # NOTE: every get through the master: no location cache or home read may reach the
    # stopped daemon directly (a same-host shm get would, and would block on nothing)
    return kvstore.connect(cluster.spec, timeout_s=30, location_cache_entries=0,
                           home_reads=False)


def test_a_daemon_back_after_the_takeover_wait_brings_its_acknowledged_objects(etcd):
    cluster, leader = _started(etcd, num_masters=2, num_daemons=2,
                                     master_args=("--takeover-wait", "1s"))
    late = None
    try:
        store = _connect(cluster)
        keys = [f"late/{i}" for i in range(32)]
        assert store.batch_put(keys, [_value(i) for i in range(32)]) == [None] * 32
        late_id = next(n.node_id for n in _nodes(leader.grpc_address)
                       if n.data_addr == cluster.daemons[0].address)
        on_late = [k for k in keys if _replica_nodes(store, k) == {late_id}]
        assert on_late, "no key on the daemon to stop"
        late = cluster.daemons[0].proc.pid
        stop_process(late)                     # it cannot report to the new leader
        cluster.master_of(leader).kill()
        new_leader = cluster.wait_leader(min_epoch=leader.epoch + 1)
        # the new leader serves past its takeover wait without the stopped daemon: a key of
        # that daemon is unknown there, and a writer's retry puts it on the other daemon
        assert store.put("late/new", _value(100)) is None
        assert [n.node_id for n in _nodes(new_leader.grpc_address)] != [late_id]
        assert not store.exists(on_late[0])
        assert store.put(on_late[0], _value(keys.index(on_late[0]))) is None
        os.kill(late, signal.SIGCONT)
        late = None
        _wait(lambda: len(_nodes(new_leader.grpc_address)) == 2, 30, "the late daemon back")
        # its registration brought every acknowledged object it holds: all served, right
        assert store.batch_get(keys) == [_value(i) for i in range(32)]
        assert store.get("late/new") == _value(100)
        assert _replica_nodes(store, on_late[0]) >= {late_id}
        store.close()
    finally:
        if late is not None:
            os.kill(late, signal.SIGCONT)
        cluster.close()


def test_a_revoke_and_a_whole_retry_after_a_lost_put_end_reply_keep_the_object(etcd):
    # what a writer does when the old leader committed its put but the reply was lost with
    # the leader: PutRevoke (best effort), then the put again from PutStart at the new one
    cluster, leader = _started(etcd, num_masters=2, num_daemons=1)
    try:
        store = _connect(cluster)
        assert store.put("lost-reply/k", _value(1)) is None       # committed by the old one
        cluster.master_of(leader).kill()
        cluster.wait_leader(min_epoch=leader.epoch + 1)
        (revoked,) = store._master.put_revoke(["lost-reply/k"], client_id=store.client_id)
        assert isinstance(revoked, kvstore.KeyNotFoundError)    # not pending: left alone
        assert store.get("lost-reply/k") == _value(1)
        assert store.put("lost-reply/k", _value(1)) is None      # ALREADY_EXISTS: a success
        assert store.get("lost-reply/k") == _value(1)
        with pytest.raises(kvstore.KVStoreError):                 # bad input still refused
            store.put("", _value(2))
        store.close()
    finally:
        cluster.close()


def test_a_key_removed_before_a_failover_and_put_after_it_survives_the_next_one(etcd):
    # the daemon remembers each removed key's sequence to drop client commits issued before
    # the removal; a new leader's sequence starts again near 0, so a remembered removal from
    # the old term once dropped the new put's commit (unreported): the daemon's table missed
    # an acknowledged put until the leader's next heartbeat, and a second failover before
    # it lost the put. NOTE: a long heartbeat interval holds that window open; the daemons
    # still move to each new leader at once (the leader key's watch wakes their heartbeat)
    cluster, leader = _started(etcd, num_masters=3, num_daemons=1, master_args=(
        "--heartbeat-interval", "30s", "--node-ttl", "120s"))
    try:
        store = _connect(cluster)
        churn = [f"again/churn/{i}" for i in range(40)]     # the old term's sequence grows
        assert store.batch_put(churn, [_value(i) for i in range(40)]) == [None] * 40
        assert store.put("again/k", _value(1)) is None
        assert store.remove("again/k") is True               # confirmed by the daemon
        assert store.remove_prefix("again/churn/") == 40
        leader = _fail_over(cluster, leader)
        assert not store.exists("again/k")                   # removed stays removed
        assert store.put("again/k", _value(1)) is None       # acknowledged in this term
        leader = _fail_over(cluster, leader)                 # before any heartbeat of it
        assert store.get("again/k") == _value(1)
        store.close()
    finally:
        cluster.close()


def _fail_over(cluster, leader):
    """SIGKILL ``leader``; the next leader once the daemons registered with it."""
    cluster.master_of(leader).kill()
    leader = cluster.wait_leader(min_epoch=leader.epoch + 1)
    _wait(lambda: len(_nodes(leader.grpc_address)) == len(cluster.daemons), 30,
          "daemons re-registered")
    return leader


def _started(etcd, **options):
    """A ``HaCluster`` whose leader lists every daemon, and that leader."""
    cluster = HaCluster(etcd, **options)
    try:
        leader = cluster.wait_leader(min_epoch=1)
        _wait(lambda: len(_nodes(leader.grpc_address)) == len(cluster.daemons), 30,
              "daemons registered")
    except BaseException:
        cluster.close()
        raise
    return cluster, leader
