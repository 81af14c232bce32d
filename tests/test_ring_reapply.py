"""The heartbeat's copy of a change the commit ring already applied (issue 10, 10d).

What must hold: a heartbeat change identical to what a client commit (the ring's drain or a
CLIENT_COMMIT) applied (same key, segment, range, size, checksum, codec) changes neither the
table nor the backend's usage, yet the write guard takes the master's sequence for the range
(a capability issued before that sequence can no longer write over it); a change that
differs in any of those fields IS applied as the master sent it: the table holds the
master's entry, the backend's usage and the guard's ranges follow it.
"""

from __future__ import annotations

import time

import pytest

from kvstore import capability
from kvstore.daemon import client_commits
from kvstore.daemon.backends import MappedBackend
from kvstore.daemon.objects import ObjectTable, StoredObject
from kvstore.daemon.write_guard import RangeCommitted, WriteGuard
from kvstore.rpc import HeartbeatChanges, Inventory
from kvstore.v1 import master_pb2 as pb

SECRET = capability.new_secret()
NODE, SEGMENT, WRITER, SIZE = "n1", "seg", "cluster", 4096
CAP_SEQ = 5          # the node's sequence when PutStart issued the capabilities
MASTER_SEQ = 9       # the sequence of the master's change set carrying the commit


def _cap(offset: int, length: int, key: str, node_seq: int = CAP_SEQ) -> bytes:
    expiry_ms = int(time.time() * 1000) + 60_000
    return capability.issue(SECRET, NODE, SEGMENT, offset, length, key, WRITER, expiry_ms,
                            node_seq)


@pytest.fixture()
def parts():
    guard = WriteGuard(NODE)
    guard.set_secret(SECRET)
    backend = MappedBackend(SEGMENT, memoryview(bytearray(16 * SIZE)))
    table = ObjectTable([backend], guard)
    table.acked_seq = CAP_SEQ
    return table, guard, backend


def _ring_commit(table, guard, keys, offsets, checksums):
    body = pb.ClientCommit(keys=keys, segment_ids=[SEGMENT] * len(keys), offsets=offsets,
                           sizes=[SIZE] * len(keys), checksums=checksums,
                           capabilities=[_cap(o, SIZE, k) for k, o in zip(keys, offsets)])
    assert client_commits.apply(table, guard, body.SerializeToString(), WRITER) == []


def _heartbeat(keys, offsets, lengths, checksums, codecs):
    return HeartbeatChanges("m", MASTER_SEQ, False,
                            Inventory(keys, [SEGMENT] * len(keys), offsets, lengths,
                                      checksums, codecs), [], base_seq=CAP_SEQ)


def test_an_identical_heartbeat_change_keeps_the_table_and_takes_the_masters_sequence(parts):
    table, guard, backend = parts
    _ring_commit(table, guard, ["a", "b"], [0, SIZE], [11, 12])
    assert backend.used_bytes == 2 * SIZE
    # between the capability's sequence and the master's: allowed over "a" until the
    # master's change gives the range its sequence
    later = _cap(0, SIZE, "other", node_seq=CAP_SEQ + 1)
    guard.check(SEGMENT, 0, SIZE, later, WRITER)
    assert table.apply(_heartbeat(["a", "b"], [0, SIZE], [SIZE, SIZE], [11, 12], [0, 0])) == 2
    assert table.acked_seq == MASTER_SEQ
    assert table.get("a") == StoredObject(SEGMENT, 0, SIZE, 11, 0)
    assert table.get("b") == StoredObject(SEGMENT, SIZE, SIZE, 12, 0)
    assert backend.used_bytes == 2 * SIZE                # not counted twice
    with pytest.raises(RangeCommitted, match="'a'"):
        guard.check(SEGMENT, 0, SIZE, later, WRITER)
    guard.check(SEGMENT, 0, SIZE, _cap(0, SIZE, "x", node_seq=MASTER_SEQ), WRITER)


@pytest.mark.parametrize("field, master", [
    ("offset", StoredObject(SEGMENT, 8 * SIZE, SIZE, 11, 0)),
    ("length", StoredObject(SEGMENT, 0, SIZE // 2, 11, 0)),
    ("checksum", StoredObject(SEGMENT, 0, SIZE, 99, 0)),
    ("codec", StoredObject(SEGMENT, 0, SIZE, 11, 1)),
])
def test_a_heartbeat_change_that_differs_from_the_rings_is_applied(parts, field, master):
    table, guard, backend = parts
    _ring_commit(table, guard, ["a"], [0], [11])
    assert table.apply(_heartbeat(["a"], [master.offset], [master.length], [master.checksum],
                                  [master.codec])) == 1
    assert table.get("a") == master, field
    assert backend.used_bytes == master.length         # the ring's entry freed, the master's stored
    # the guard knows the master's range at the master's sequence
    with pytest.raises(RangeCommitted, match="'a'"):
        guard.check(SEGMENT, master.offset, master.length,
                    _cap(master.offset, master.length, "x", node_seq=MASTER_SEQ - 1), WRITER)
    if field == "offset":      # the ring's old range is no longer the guard's to refuse
        guard.check(SEGMENT, 0, SIZE, _cap(0, SIZE, "x", node_seq=CAP_SEQ), WRITER)


@pytest.mark.parametrize("offset, length, refused", [
    (0, 100, None),            # over "old" only: committed before the capability
    (100, 100, None),          # ends where "a" starts
    (150, 100, "'a'"),         # reaches into "a" from before it
    (250, 10, "'a'"),          # inside "a"
    (290, 20, "'a'"),          # starts inside "a", ends in the gap
    (300, 100, None),          # the gap: starts where "a" ends, ends where "b" starts
    (350, 100, "'b'"),         # reaches into "b"
    (0, 1000, "'b'"),          # spans both (and "old", committed before: trusted)
    (500, 50, None),           # after "b"
])
def test_a_claim_refuses_exactly_the_ranges_overlapping_a_later_commit(offset, length, refused):
    guard = WriteGuard(NODE)
    guard.set_secret(SECRET)
    guard.note_stored(SEGMENT, "a", 200, 100, MASTER_SEQ)    # [200, 300)
    guard.note_stored(SEGMENT, "b", 400, 100, MASTER_SEQ)    # [400, 500)
    guard.note_stored(SEGMENT, "old", 0, 50, 1)              # before the capability: trusted
    if refused is None:
        guard.claim(SEGMENT, "new", offset, length, CAP_SEQ)
        return
    with pytest.raises(RangeCommitted) as info:
        guard.claim(SEGMENT, "new", offset, length, CAP_SEQ)
    assert refused in str(info.value)
    guard.claim(SEGMENT, "gap", 300, 100, CAP_SEQ)      # the free gap still claims
