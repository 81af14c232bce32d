"""The daemon's drain of several commit-ring records at once (daemon/ring_drain.py): each
record's capabilities are verified on its own and the accepted entries of all of them go to
the table in one call (issue 10, 10d2). Real RingReader/RingWriter in shared memory, real
WriteGuard, ObjectTable and capabilities; no servers. The decisions must be those of one
apply per record: a record that does not parse, a forged capability, an entry overlapping
an object committed after its capability, a key removed after it, a key already here at
another range are each refused alone, and every other entry is applied."""

from __future__ import annotations

import time

import pytest

from kvstore import capability
from kvstore._posix_shm import unique_shm_name
from kvstore.commit_ring import RingReader, encode_record, writer_for
from kvstore.daemon import client_commits
from kvstore.daemon.objects import ObjectTable, StoredObject
from kvstore.daemon.ring_drain import RingDrain
from kvstore.daemon.write_guard import WriteGuard
from kvstore.rpc import HeartbeatChanges, Inventory
from kvstore.v1 import master_pb2 as pb

NODE, SEGMENT, WRITER, SIZE = "n1", "dram0", "cluster", 4096
SECRET = capability.new_secret()


def _record(keys, offsets, node_seq, *, secret=SECRET, writer=WRITER) -> bytes:
    expiry_ms = int(time.time() * 1000) + 60_000
    whole = capability.issue_batch(secret, NODE, writer, expiry_ms, node_seq,
                                   [SEGMENT] * len(keys), offsets, [SIZE] * len(keys), keys)
    body = pb.ClientCommit(keys=keys, segment_ids=[SEGMENT] * len(keys), offsets=offsets,
                           sizes=[SIZE] * len(keys), checksums=[7] * len(keys),
                           batch_capability=whole).SerializeToString()
    return body


@pytest.fixture()
def setup():
    guard = WriteGuard(NODE)
    guard.set_secret(SECRET)
    table = ObjectTable([], guard)
    reader = RingReader(unique_shm_name("kvstore-ringbatch"), num_regions=2,
                        region_bytes=1 << 16)
    drain = RingDrain(reader, table, guard)
    yield guard, table, reader, drain
    reader.close()


def _changes(seq, added=(), removed=()):
    added = list(added)
    return HeartbeatChanges("m", seq, False,
                            Inventory([k for k, _ in added], [SEGMENT] * len(added),
                                      [o for _, o in added], [SIZE] * len(added),
                                      [7] * len(added), [0] * len(added)),
                            list(removed), base_seq=seq - 1)


def test_records_drained_together_decide_as_one_apply_per_record(setup):
    guard, table, reader, drain = setup
    # the master's view before the records: "old" committed at 0 (seq 1), "gone" removed
    # at seq 3 after being committed at seq 2
    table.apply(_changes(1, added=[("old", 0)]))
    table.apply(_changes(2, added=[("gone", 8 * SIZE)]))
    table.apply(_changes(3, removed=["gone"]))
    table.apply(_changes(4, added=[("newer", 20 * SIZE)]))    # committed after seq 3
    bodies = [
        _record(["a", "b"], [1 * SIZE, 2 * SIZE], 3),            # both applied
        b"\xff\xff not a ClientCommit",                          # does not parse
        _record(["forged"], [3 * SIZE], 3, secret=b"\1" * 32),   # MAC does not verify
        _record(["gone"], [9 * SIZE], 2),                        # removed after its cap
        _record(["over"], [20 * SIZE], 3),                       # overlaps "newer" (seq 4)
        _record(["old"], [4 * SIZE], 3),                         # here at another range
        _record(["c", "d"], [5 * SIZE, 6 * SIZE], 4),            # both applied
        _record(["e"], [7 * SIZE], 4),                           # applied
    ]
    # the same decisions, one apply per record, on a second table: the reference
    ref_guard = WriteGuard(NODE)
    ref_guard.set_secret(SECRET)
    ref_table = ObjectTable([], ref_guard)
    for change in [_changes(1, added=[("old", 0)]), _changes(2, added=[("gone", 8 * SIZE)]),
                   _changes(3, removed=["gone"]), _changes(4, added=[("newer", 20 * SIZE)])]:
        ref_table.apply(change)
    ref_refused = 0
    for body in bodies:
        try:
            ref_refused += len(client_commits.apply(ref_table, ref_guard, body, WRITER))
        except ValueError:
            ref_refused += 1

    writer = writer_for(reader.name)
    for body in bodies:
        assert writer.append(encode_record(WRITER, body))
    assert drain.drain() == len(bodies)
    assert not reader.pending()
    expected = {"old": StoredObject(SEGMENT, 0, SIZE, 7, 0),
                "newer": StoredObject(SEGMENT, 20 * SIZE, SIZE, 7, 0)}
    for key, index in (("a", 1), ("b", 2), ("c", 5), ("d", 6), ("e", 7)):
        expected[key] = StoredObject(SEGMENT, index * SIZE, SIZE, 7, 0)
    assert {key: table.get(key) for key in expected} == expected
    for key in ("forged", "gone", "over"):
        assert table.get(key) is None
    assert len(table) == len(expected)
    # forged (1) + not parsing (1) + over (1) + old at another range (1); "gone" is
    # dropped without a refusal (the master decided about the key after this put)
    assert drain.num_refused == ref_refused == 4
    assert {key: ref_table.get(key) for key in expected} == expected and \
        len(ref_table) == len(table)
    # the claims were noted: a WRITE replaying "a"'s capability is refused from now on
    with pytest.raises(Exception, match="overlaps 'a'"):
        guard.check(SEGMENT, SIZE, SIZE,
                    capability.issue(SECRET, NODE, SEGMENT, SIZE, SIZE, "x", WRITER,
                                     int(time.time() * 1000) + 60_000, 3), WRITER)


def test_overlapping_entries_of_different_records_are_claimed_in_ring_order(setup):
    guard, table, reader, drain = setup
    writer = writer_for(reader.name)
    # two records committing different keys at the same range with the same capability
    # seq: the first claims it (noted at seq 2), the second overlaps a newer object
    assert writer.append(encode_record(WRITER, _record(["first"], [0], 1)))
    assert writer.append(encode_record(WRITER, _record(["second"], [0], 1)))
    assert drain.drain() == 2
    assert table.get("first") == StoredObject(SEGMENT, 0, SIZE, 7, 0)
    assert table.get("second") is None and drain.num_refused == 1
