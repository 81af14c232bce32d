"""The daemon's rule for location reads (daemon/location_reads.py), on a real ObjectTable with
an injected clock: the lease starts only with an up-to-date heartbeat the table applied,
counts from before that heartbeat was sent, ends on time and at a re-registration, and an
object is served only at its own segment, range and checksum (not after its removal nor its
move to another tier)."""

from __future__ import annotations

from kvstore.daemon.location_reads import LocationReads
from kvstore.daemon.objects import ObjectTable
from kvstore.rpc import HeartbeatChanges, Inventory
from kvstore.transport.data_frames import Status

LEASE_S = 1.5


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _changes(seq, *, base_seq=0, added=(), removed=(), up_to_date=True, full=False):
    rows = list(added)
    return HeartbeatChanges(
        master_id="m", seq=seq, full_resync=full,
        added=Inventory([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                        [r[3] for r in rows], [r[4] for r in rows], [0] * len(rows)),
        removed_keys=list(removed), base_seq=base_seq, up_to_date=up_to_date)


def _setup():
    clock, table = Clock(), ObjectTable()
    reads = LocationReads(table, clock=clock)
    reads.on_registered(LEASE_S)
    return clock, table, reads


def _beat(clock, table, reads, changes, *, sent_at_s=None):
    sent_at_s = clock.now_s if sent_at_s is None else sent_at_s
    table.apply(changes)
    reads.on_heartbeat(sent_at_s, changes)


def test_nothing_is_served_before_the_first_up_to_date_heartbeat():
    clock, table, reads = _setup()
    table.apply(_changes(1, added=[("k", "dram0", 0, 100, 7)], up_to_date=False))
    assert reads.refusal("k", 7, "dram0", 0, 100)[0] == Status.LOCATION_OFF
    _beat(clock, table, reads, _changes(1, base_seq=1, up_to_date=False))
    assert reads.refusal("k", 7, "dram0", 0, 100)[0] == Status.LOCATION_OFF
    _beat(clock, table, reads, _changes(2, base_seq=1, up_to_date=True))
    assert reads.refusal("k", 7, "dram0", 0, 100) is None
    assert (reads.num_served, reads.num_refused) == (1, 2)


def test_the_lease_counts_from_the_send_and_ends_on_time():
    clock, table, reads = _setup()
    _beat(clock, table, reads, _changes(1, added=[("k", "dram0", 0, 100, 7)]),
          sent_at_s=clock.now_s - 0.5)          # the reply came 0.5 s after the send
    clock.now_s += LEASE_S - 0.5 - 0.001
    assert reads.refusal("k", 7, "dram0", 0, 100) is None
    clock.now_s += 0.001
    status, reason = reads.refusal("k", 7, "dram0", 0, 100)
    assert status == Status.LOCATION_OFF and "lease" in reason


def test_a_heartbeat_the_table_did_not_apply_renews_nothing():
    clock, table, reads = _setup()
    _beat(clock, table, reads, _changes(1, added=[("k", "dram0", 0, 100, 7)]))
    clock.now_s += LEASE_S                    # lapsed
    # a gap (base past the table's sequence): the table applies nothing, so no lease
    _beat(clock, table, reads, _changes(5, base_seq=3, removed=["k"]))
    assert table.acked_seq == 1
    assert reads.refusal("k", 7, "dram0", 0, 100)[0] == Status.LOCATION_OFF


def test_no_lease_from_the_master_means_no_location_reads():
    clock, table = Clock(), ObjectTable()
    reads = LocationReads(table, clock=clock)
    reads.on_registered(0.0)                  # --commit-timeout 0, or an older master
    _beat(clock, table, reads, _changes(1, added=[("k", "dram0", 0, 100, 7)]))
    status, reason = reads.refusal("k", 7, "dram0", 0, 100)
    assert status == Status.LOCATION_OFF and "no location lease" in reason


def test_a_registration_ends_the_lease_until_its_first_beat():
    clock, table, reads = _setup()
    _beat(clock, table, reads, _changes(1, added=[("k", "dram0", 0, 100, 7)]))
    assert reads.refusal("k", 7, "dram0", 0, 100) is None
    table.reset_sequence()
    reads.on_registered(LEASE_S)              # a new master (failover, restart)
    assert reads.refusal("k", 7, "dram0", 0, 100)[0] == Status.LOCATION_OFF
    _beat(clock, table, reads, _changes(1, full=True, added=[("k", "dram0", 0, 100, 7)]))
    assert reads.refusal("k", 7, "dram0", 0, 100) is None


def test_only_that_object_at_its_range_with_its_checksum_is_served():
    clock, table, reads = _setup()
    _beat(clock, table, reads, _changes(1, added=[("k", "dram0", 1000, 100, 7)]))
    assert reads.refusal("k", 7, "dram0", 1000, 100) is None
    assert reads.refusal("k", 7, "dram0", 1050, 50) is None      # a stripe of it
    for args in [("k", 8, "dram0", 1000, 100),      # another checksum (a new value)
                 ("k", 7, "dram1", 1000, 100),      # another segment
                 ("k", 7, "dram0", 999, 100),       # starts before the object
                 ("k", 7, "dram0", 1000, 101),      # runs past it
                 ("other", 7, "dram0", 1000, 100)]:  # another key over the same range
        status, reason = reads.refusal(*args)
        assert status == Status.LOCATION_STALE and repr(args[0]) in reason


def test_a_removed_or_moved_object_is_refused_once_the_table_has_the_change():
    clock, table, reads = _setup()
    _beat(clock, table, reads, _changes(1, added=[("gone", "dram0", 0, 100, 7),
                                                  ("moved", "dram0", 100, 100, 9)]))
    # a push (COMMIT) brings the removal and the demotion between beats
    table.apply(_changes(2, base_seq=1, removed=["gone"],
                         added=[("moved", "ssd0", 0, 100, 9)]))
    assert reads.refusal("gone", 7, "dram0", 0, 100)[0] == Status.LOCATION_STALE
    assert reads.refusal("moved", 9, "dram0", 100, 100)[0] == Status.LOCATION_STALE
    assert reads.refusal("moved", 9, "ssd0", 0, 100) is None
