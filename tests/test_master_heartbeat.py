"""Membership: registration rules, the heartbeat change log, and adoption of a daemon's
inventory after a master restart (no stored block lost to a master failure)."""

from __future__ import annotations

import pytest

import kvstore
from kvstore.daemon.objects import ObjectTable
from kvstore.rpc.messages import heartbeat_changes, inventory_message
from kvstore.v1 import master_pb2 as pb
from master_helpers import (  # noqa: F401
    MiB, Embedded, embedded, exists, get, put, register, replicas_of,
)


class DaemonTable:
    """The daemon's own table (``kvstore.daemon.objects.ObjectTable``), fed each heartbeat
    reply as the daemon's master link feeds it (decoded by ``kvstore.rpc.messages``), so
    these tests check the master's change log against the code daemons actually run."""

    def __init__(self):
        self.objects = ObjectTable()

    @property
    def acked_seq(self) -> int:
        return self.objects.acked_seq

    def beat(self, m, node_id: str) -> pb.HeartbeatResponse:
        reply = m.heartbeat(node_id, self.objects.acked_seq)
        assert reply.known
        self.objects.apply(heartbeat_changes(reply))
        return reply

    @property
    def table(self) -> dict[str, tuple]:
        """key -> (segment_id, offset, length, checksum) of every object the table holds."""
        inv = self.objects.to_inventory()
        return {key: (inv.segment_ids[i], inv.offsets[i], inv.lengths[i], inv.checksums[i])
                for i, key in enumerate(inv.keys)}

    def inventory(self) -> pb.Inventory:
        return inventory_message(self.objects.to_inventory())


def test_heartbeat_carries_each_change_once(embedded):
    m = embedded()
    register(m.client, "n1")
    daemon = DaemonTable()
    first = daemon.beat(m, "n1")
    assert not first.full_resync and first.seq == 0 and not first.added.keys
    put(m.client, ["a", "b"])
    put(m.client, ["pending"], end=False)                       # not committed: not sent
    reply = daemon.beat(m, "n1")
    assert sorted(reply.added.keys) == ["a", "b"] and not reply.full_resync
    assert daemon.beat(m, "n1").added.keys == []                # acknowledged: not resent
    m.client.call("Remove", pb.RemoveRequest(keys=["a"]))
    put(m.client, ["c"], [300])
    reply = daemon.beat(m, "n1")
    assert list(reply.removed_keys) == ["a"] and list(reply.added.keys) == ["c"]
    assert sorted(daemon.table) == ["b", "c"]
    got = get(m.client, ["c"])
    assert daemon.table["c"][1:3] == (replicas_of(got, 0)[0][2], 300)


def test_daemon_behind_or_ahead_gets_a_full_resync(embedded):
    m = embedded()
    register(m.client, "n1")
    put(m.client, ["a"])
    daemon = DaemonTable()
    daemon.beat(m, "n1")
    put(m.client, ["b"])
    daemon.beat(m, "n1")
    daemon.beat(m, "n1")                                        # acks seq 2: log forgets it
    stale = m.heartbeat("n1", acked_seq=1)
    assert stale.full_resync and sorted(stale.added.keys) == ["a", "b"]
    ahead = m.heartbeat("n1", acked_seq=999)
    assert ahead.full_resync and sorted(ahead.added.keys) == ["a", "b"]


def test_reregistering_a_live_node_is_refused_until_it_leaves(embedded):
    m = embedded()
    register(m.client, "n1")
    with pytest.raises(kvstore.KVStoreError, match="ALREADY_EXISTS"):
        register(m.client, "n1")
    gone = m.client.call("UnregisterNode", pb.UnregisterNodeRequest(node_id="n1"))
    assert gone.num_objects_dropped == 0
    assert register(m.client, "n1").node_ttl_ms == 10_000
    with pytest.raises(kvstore.KeyNotFoundError, match="unknown node 'ghost'"):
        m.client.call("UnregisterNode", pb.UnregisterNodeRequest(node_id="ghost"))


def test_a_repeated_registration_is_answered_as_the_one_it_repeats(embedded):
    # a daemon whose registration reply was lost sends it again with the same token: the
    # master answers with the same secret and keeps what it placed there meanwhile
    m = embedded()
    first = register(m.client, "n1", incarnation="i1", write_capabilities=True,
                     registration_token="t1")
    put(m.client, ["a"])
    again = register(m.client, "n1", incarnation="i1", write_capabilities=True,
                     registration_token="t1")
    assert again.capability_secret == first.capability_secret != b""
    assert exists(m.client, ["a"]) == [True]
    with pytest.raises(kvstore.KVStoreError, match="ALREADY_EXISTS"):   # another token
        register(m.client, "n1", incarnation="i1", registration_token="t2")
    with pytest.raises(kvstore.KVStoreError, match="ALREADY_EXISTS"):   # no token
        register(m.client, "n1", incarnation="i1")
    assert exists(m.client, ["a"]) == [True]
    # a new process (another incarnation) with the same token is a new registration
    fresh = register(m.client, "n1", incarnation="i2", write_capabilities=True,
                     registration_token="t1")
    assert fresh.capability_secret != first.capability_secret
    assert exists(m.client, ["a"]) == [False]


def test_master_restart_adopts_the_daemons_inventories(embedded):
    first = embedded()
    register(first.client, "n1")
    register(first.client, "n2")
    reply = put(first.client, [f"k{i}" for i in range(10)], [5000] * 10, replicas=2)
    tables = {"n1": DaemonTable(), "n2": DaemonTable()}
    for node_id, table in tables.items():
        table.beat(first, node_id)
    before = {f"k{i}": sorted(replicas_of(reply, i)) for i in range(10)}
    first.close()

    second = embedded()                                         # the restarted master
    for node_id, table in tables.items():
        assert second.heartbeat(node_id, table.acked_seq).known is False
        adopted = register(second.client, node_id, inventory=table.inventory())
        assert adopted.num_objects_adopted == 10
        table.objects.reset_sequence()                          # a new master: start over
    got = get(second.client, list(before))
    assert list(got.statuses) == [pb.ITEM_OK] * 10
    assert {k: sorted(replicas_of(got, i)) for i, k in enumerate(before)} == before
    # adopted space is allocated: new objects never overlap adopted ones
    new = put(second.client, [f"new{i}" for i in range(20)], [5000] * 20)
    taken = {(n, o) for reps in before.values() for n, _, o in reps}
    for i in range(20):
        node_id, _, offset = replicas_of(new, i)[0]
        assert all(not (o <= offset < o + 5056) and not (offset <= o < offset + 5056)
                   for n, o in taken if n == node_id)
    table = tables["n1"]
    assert table.beat(second, "n1").full_resync
    assert set(table.table) == set(before) | {f"new{i}" for i in range(20)
                                              if replicas_of(new, i)[0][0] == "n1"}


def test_bad_inventory_items_are_refused_and_resynced_away(embedded, caplog):
    m = embedded()
    inventory = pb.Inventory(
        keys=["ok", "overlap", "unknown-seg", "", "outside", "ok2"],
        segment_ids=["dram0", "dram0", "nope", "dram0", "dram0", "dram0"],
        offsets=[0, 64, 0, 4096, 64 * MiB, 8192],
        lengths=[1000, 100, 10, 10, 10, 64])
    with caplog.at_level("WARNING", logger="kvstore.master.registration"):
        adopted = register(m.client, "n1", inventory=inventory)
    assert adopted.num_objects_adopted == 2
    # the master names what it did not adopt and why (else gone without a trace)
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.name == "kvstore.master.registration"]
    assert "4 of 6 inventory items not adopted" in warning
    assert "'overlap': range [64, +100) in 'dram0' overlaps 'ok' at [0, +1000)" in warning
    assert "'unknown-seg': segment 'nope' not registered" in warning
    assert "'': invalid key" in warning
    assert "'outside': range [67108864, +10) in 'dram0' unaligned, outside" in warning
    assert exists(m.client, ["ok", "overlap", "unknown-seg", "outside", "ok2"]) == \
        [True, False, False, False, True]
    daemon = DaemonTable()
    assert daemon.beat(m, "n1").full_resync
    assert sorted(daemon.table) == ["ok", "ok2"]


def test_inventory_arrays_must_have_one_length(embedded):
    m = embedded()
    bad = pb.Inventory(keys=["a", "b"], segment_ids=["dram0"], offsets=[0, 64],
                       lengths=[1, 1])
    with pytest.raises(kvstore.InvalidArgumentError, match="parallel arrays differ"):
        register(m.client, "n1", inventory=bad)
    assert m.client.call("ListNodes", pb.ListNodesRequest()).nodes == []


def test_same_key_from_two_daemons_becomes_two_replicas(embedded):
    m = embedded()
    inv = pb.Inventory(keys=["shared"], segment_ids=["dram0"], offsets=[0], lengths=[100])
    register(m.client, "n1", inventory=inv)
    register(m.client, "n2", inventory=inv)
    conflict = pb.Inventory(keys=["shared"], segment_ids=["dram0"], offsets=[0],
                            lengths=[200])
    assert register(m.client, "n3", inventory=conflict).num_objects_adopted == 0
    assert sorted(r[0] for r in replicas_of(get(m.client, ["shared"]), 0)) == ["n1", "n2"]


def test_adopting_a_replica_of_an_object_already_read_shows_both_replicas(embedded):
    """The encoder keeps each object's reply row; adoption that adds a replica must not leave
    readers with the old one-replica row (batch and single-key replies alike)."""
    m = embedded()
    keys = [f"read-{i}" for i in range(16)]
    inv = pb.Inventory(keys=keys, segment_ids=["dram0"] * 16,
                       offsets=[i * 128 for i in range(16)], lengths=[100] * 16)
    register(m.client, "n1", inventory=inv)
    assert [len(replicas_of(get(m.client, keys), i)) for i in range(16)] == [1] * 16
    register(m.client, "n2", inventory=inv)
    batch = get(m.client, keys)
    assert [sorted(r[0] for r in replicas_of(batch, i)) for i in range(16)] == \
        [["n1", "n2"]] * 16
    assert sorted(r[0] for r in replicas_of(get(m.client, keys[:1]), 0)) == ["n1", "n2"]


def test_a_heartbeat_carries_at_most_the_configured_changes(embedded):
    m = embedded(max_changes_per_heartbeat=3)
    register(m.client, "n1")
    daemon = DaemonTable()
    daemon.beat(m, "n1")
    put(m.client, [f"k{i}" for i in range(7)], [100] * 7)
    sizes = [len(daemon.beat(m, "n1").added.keys) for _ in range(4)]
    assert sizes == [3, 3, 1, 0]
    assert sorted(daemon.table) == [f"k{i}" for i in range(7)]


def test_key_changed_several_times_between_beats_is_sent_once_with_its_last_state(embedded):
    """put, remove, put again (another offset) within one interval: the daemon must end with
    the second replica, whatever order it applies the reply's added/removed lists in."""
    m = embedded()
    register(m.client, "n1")
    daemon = DaemonTable()
    daemon.beat(m, "n1")
    put(m.client, ["pad"], [640])            # so the re-put of "k" lands at another offset
    put(m.client, ["k"], [128])
    m.client.call("Remove", pb.RemoveRequest(keys=["k"], force=True))
    put(m.client, ["k"], [4096])
    put(m.client, ["gone"], [64])
    m.client.call("Remove", pb.RemoveRequest(keys=["gone"], force=True))
    reply = daemon.beat(m, "n1")
    assert list(reply.added.keys).count("k") == 1 and "k" not in reply.removed_keys
    assert "gone" in reply.removed_keys and "gone" not in reply.added.keys
    got = get(m.client, ["k"])
    assert daemon.table["k"][1:3] == (replicas_of(got, 0)[0][2], 4096)
    assert "gone" not in daemon.table
