"""A record's capability checks at once (``capability.accepted_commits``,
``WriteGuard.check_commits``; issue 10, 10d) decide exactly as ``WriteGuard.check_commit``
does entry by entry: the same entries accepted with the same ``node_seq``, the same
refusals with the same reasons, for valid capabilities and for every way of spoiling one
(each byte flipped, truncated, padded, expired, another writer, range, key, segment, node
or secret)."""

from __future__ import annotations

import pytest

from kvstore import capability
from kvstore.capability import CapabilityRefused
from kvstore.daemon.write_guard import WriteGuard

SECRET = capability.new_secret()
NOW_MS = 1_700_000_000_000
NODE, WRITER = "n1", "tenant-a"


def _guard(secret=SECRET):
    guard = WriteGuard(NODE, wall_clock=lambda: NOW_MS / 1000)
    guard.set_secret(secret)
    return guard


def _issue(key="k", segment="seg", offset=4096, length=512, writer=WRITER,
           expiry_ms=NOW_MS + 1000, node="n1", secret=SECRET, node_seq=7):
    return capability.issue(secret, node, segment, offset, length, key, writer, expiry_ms,
                            node_seq)


def _entries():
    """(segment_id, offset, size, key, blob) entries, valid and spoiled."""
    good = _issue()
    entries = [("seg", 4096, 512, "k", good),
               ("seg2", 0, 64, "k2", _issue("k2", "seg2", 0, 64, node_seq=3))]
    for i in range(len(good)):                                   # every byte flipped
        spoiled = bytearray(good)
        spoiled[i] ^= 0x01
        entries.append(("seg", 4096, 512, "k", bytes(spoiled)))
    entries += [
        ("seg", 4096, 512, "k", b""),
        ("seg", 4096, 512, "k", good[:-1]),
        ("seg", 4096, 512, "k", good + b"\0"),
        ("seg", 4096, 512, "k", _issue(expiry_ms=NOW_MS)),       # expired this ms
        ("seg", 4096, 512, "k", _issue(writer="tenant-b")),
        ("seg", 4096, 512, "k", _issue(writer="tenant-")),
        ("seg", 4096, 512, "k", _issue(writer="tenant-aa")),
        ("seg", 4096, 256, "k", good),                           # a part: not exact
        ("seg", 4096 + 256, 256, "k", good),
        ("seg", 4096, 1024, "k", good),                          # reaches outside
        ("seg", 4096, 512, "other", good),                       # another key
        ("seg2", 4096, 512, "k", good),                          # another segment
        ("seg", 4096, 512, "k", _issue(node="n2")),
        ("seg", 4096, 512, "k", _issue(secret=capability.new_secret())),
        ("seg", 4096, 512, "k", capability.issue_read(SECRET, NODE, "seg", 4096, 512, "k",
                                                      WRITER, NOW_MS + 1000)),
    ]
    return entries


def _one_by_one(guard, entries, writer):
    results = []
    for segment_id, offset, size, key, blob in entries:
        try:
            results.append(guard.check_commit(segment_id, offset, size, key, blob, writer))
        except CapabilityRefused as exc:
            results.append(("refused", str(exc)))
    return results


@pytest.mark.parametrize("writer", [WRITER, "tenant-b"])
def test_a_records_checks_decide_as_each_entrys_check(writer):
    guard = _guard()
    entries = _entries()
    expected = _one_by_one(guard, entries, writer)
    together = guard.check_commits(*[list(column) for column in zip(*entries)], writer)
    got = [r if isinstance(r, int) else ("refused", str(r)) for r in together]
    assert got == expected
    if writer == WRITER:
        assert got[:2] == [7, 3]                 # the valid ones, with their node_seq
        assert all(isinstance(r, tuple) for r in got[2:]), "a spoiled capability passed"
    else:                                        # only the capability issued to tenant-b
        assert [r for r in got if not isinstance(r, tuple)] == [7]


def test_without_a_secret_every_entry_is_refused_with_the_reason():
    guard = WriteGuard(NODE)
    refused = guard.check_commits(["seg"], [4096], [512], ["k"], [_issue()], WRITER)
    assert len(refused) == 1 and isinstance(refused[0], CapabilityRefused)
    assert "from its master only" in str(refused[0])
