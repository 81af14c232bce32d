"""The batch forms of the put path's capability work (issue 10, 10p) against their
per-entry forms: ``capability.issue_many`` must issue exactly ``issue``'s bytes, and
``WriteGuard.claiming`` (which skips the overlap walk where it cannot refuse) must make
exactly ``claim``'s decisions, including every refusal. In-process: the guard, the object
table and the capability code are the daemon's and the master's own; the clock is injected."""

from __future__ import annotations

import pytest

from kvstore import capability
from kvstore.daemon.objects import ObjectTable, StoredObject
from kvstore.daemon.write_guard import RangeCommitted, WriteGuard

NODE = "n1"
NOW_S = 1_000_000.0
EXPIRY_MS = int(NOW_S * 1000) + 60_000
SIZE = 4096


def test_issue_many_issues_the_bytes_of_issue_and_they_verify():
    secret_a, secret_b = capability.new_secret(), capability.new_secret()
    grants = [
        (secret_a, "n1", "dram0", 0, SIZE, "k0", 7),
        (secret_b, "n2", "dram0", SIZE, SIZE, "k0", 3),     # k0's second replica
        (b"", "old", "dram0", 0, SIZE, "k0", 0),            # a node that checks none
        (secret_a, "n1", "dram1", 2 * SIZE, 100, "k1", 7),  # another segment, same node
        (secret_a, "n1", "dram0", 3 * SIZE, SIZE, "k2", 8),
    ]
    caps = capability.issue_many("cluster", EXPIRY_MS, grants)
    assert caps == [capability.issue(s, n, g, o, length, k, "cluster", EXPIRY_MS, q) if s else b""
                    for s, n, g, o, length, k, q in grants]
    cap = capability.check(secret_a, "n1", "dram1", caps[3], 2 * SIZE, 100, "cluster",
                           EXPIRY_MS - 1)
    assert (cap.offset, cap.length, cap.node_seq) == (2 * SIZE, 100, 7)
    assert cap.object_id == capability.object_id("k1")
    # a capability of the batch is bound to its own node and segment, as issue's are
    with pytest.raises(capability.CapabilityRefused, match="does not verify"):
        capability.check(secret_a, "n1", "dram0", caps[3], 2 * SIZE, 100, "cluster",
                         EXPIRY_MS - 1)


def test_issue_many_refuses_a_writer_too_long():
    with pytest.raises(ValueError, match="longer than"):
        capability.issue_many("w" * 300, EXPIRY_MS, [(b"s" * 32, "n1", "d", 0, 1, "k", 0)])
    assert capability.issue_many("cluster", EXPIRY_MS, []) == []


SECRET = capability.new_secret()


def _guard() -> WriteGuard:
    guard = WriteGuard(NODE, wall_clock=lambda: NOW_S)
    guard.set_secret(SECRET)
    return guard


def _replay_refused(guard, segment, key, offset, length, node_seq) -> bool:
    """Whether a WRITE replaying the entry's capability is refused as RANGE_COMMITTED."""
    blob = capability.issue(SECRET, NODE, segment, offset, max(length, 1), key, "cluster",
                            EXPIRY_MS, node_seq)
    try:
        guard.check(segment, offset, max(length, 1), blob, "cluster")
    except RangeCommitted:
        return True
    return False


def _claim_each(guard, entries):
    """``claim`` per entry: the reference decisions."""
    out = []
    for segment, key, offset, length, node_seq in entries:
        try:
            guard.claim(segment, key, offset, length, node_seq)
            out.append(None)
        except RangeCommitted as exc:
            out.append(str(exc))
    return out


def _claim_record(guard, entries):
    out = []
    with guard.claiming([(s, o, n) for s, _, o, n, _ in entries]) as claim:
        for segment, key, offset, length, node_seq in entries:
            try:
                claim(segment, key, offset, length, node_seq)
                out.append(None)
            except RangeCommitted as exc:
                out.append(str(exc))
    return out


RECORDS = {
    # disjoint, nothing newer in the segment: every entry accepted (the walk skipped)
    "fresh": ([], [("d0", f"k{i}", i * SIZE, SIZE, 10) for i in range(8)]),
    # an object committed after the capability overlaps entry 2: refused
    "newer object": ([("d0", "old", 2 * SIZE, SIZE, 11)],
                     [("d0", f"k{i}", i * SIZE, SIZE, 10) for i in range(4)]),
    # an older object there: the master's to judge, accepted
    "older object": ([("d0", "old", 2 * SIZE, SIZE, 9)],
                     [("d0", f"k{i}", i * SIZE, SIZE, 10) for i in range(4)]),
    # a newer object in ANOTHER segment does not matter
    "newer elsewhere": ([("d1", "old", 0, SIZE, 50)],
                        [("d0", f"k{i}", i * SIZE, SIZE, 10) for i in range(4)]),
    # two entries of the record overlap: the second refused (the walk is not skipped)
    "overlapping entries": ([], [("d0", "a", 0, 2 * SIZE, 10), ("d0", "b", SIZE, SIZE, 10),
                                 ("d0", "c", 4 * SIZE, SIZE, 10)]),
    # an object reaching into the range from below, committed later: refused
    "newer from below": ([("d0", "old", 0, 3 * SIZE, 12)],
                         [("d0", "k", 2 * SIZE, SIZE, 10)]),
    # entries with several sequences: one below the segment's newest walks and is refused
    "mixed sequences": ([("d0", "old", 5 * SIZE, SIZE, 20)],
                        [("d0", "a", 0, SIZE, 25), ("d0", "b", 5 * SIZE, SIZE, 15),
                         ("d0", "c", 6 * SIZE, SIZE, 25)]),
    # a zero-length entry takes the walk
    "empty range": ([], [("d0", "a", 0, 0, 10), ("d0", "b", SIZE, SIZE, 10)]),
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_claiming_decides_as_claim_does(name):
    committed, entries = RECORDS[name]
    reference, batched = _guard(), _guard()
    for guard in (reference, batched):
        for segment, key, offset, length, seq in committed:
            guard.note_stored(segment, key, offset, length, seq)
    expected = _claim_each(reference, entries)
    assert _claim_record(batched, entries) == expected
    if name in ("newer object", "overlapping entries", "newer from below", "mixed sequences"):
        assert any(expected), "the record was meant to have a refusal"
    # afterwards both guards refuse and allow the same WRITE replays: an accepted entry's
    # capability no longer writes its range
    for (segment, key, offset, length, seq), refusal in zip(entries, expected):
        refused = _replay_refused(reference, segment, key, offset, length, seq)
        assert _replay_refused(batched, segment, key, offset, length, seq) == refused
        if refusal is None and length > 0:
            assert refused


def test_a_record_claimed_then_replayed_is_refused_and_nothing_is_lost():
    """Through the object table (what the ring's drain runs): a record commits its entries;
    the same record again changes nothing; a later record over those ranges with an older
    capability is refused, and the first objects stay as they were."""
    guard = _guard()
    table = ObjectTable([], guard)
    first = [(i, f"k{i}", StoredObject("d0", i * SIZE, SIZE, 100 + i, 0), 10) for i in range(4)]
    assert table.commit_from_client(first) == []
    assert table.commit_from_client(first) == []            # already here: nothing to add
    stale = [(i, f"x{i}", StoredObject("d0", i * SIZE, SIZE, 7, 0), 9) for i in range(4)]
    refused = table.commit_from_client(stale)
    assert [index for index, _ in refused] == [0, 1, 2, 3]
    assert all("after the capability was issued" in reason for _, reason in refused)
    assert [table.get(f"k{i}") for i in range(4)] == [entry[2] for entry in first]
    assert all(table.get(f"x{i}") is None for i in range(4))
