"""The CHECK_WRITES body and reply codec (kvstore/transport/check_batch.py): round trips, the
split of a big batch into several requests, and bytes that do not parse."""

from __future__ import annotations

import pytest

from kvstore.transport import check_batch
from kvstore.transport.data_frames import Status


def test_ranges_round_trip_in_order():
    ranges = [(b"seg-a", 0, 4096, b"cap-1"), (b"seg-b", 1 << 40, 1, b""),
              (b"s" * 255, 7, 0, b"c" * 300)]
    ((count, body),) = check_batch.encode_ranges(ranges)
    assert count == 3
    assert list(check_batch.decode_ranges(body)) == ranges


def test_big_batch_splits_by_count_and_by_bytes():
    many = [(b"seg", i, 1, b"") for i in range(check_batch.MAX_RANGES + 5)]
    requests = check_batch.encode_ranges(many)
    assert [count for count, _ in requests] == [check_batch.MAX_RANGES, 5]
    assert [r for _, body in requests for r in check_batch.decode_ranges(body)] == many
    fat = [(b"seg", i, 1, b"c" * 60_000) for i in range(40)]
    requests = check_batch.encode_ranges(fat)
    assert len(requests) > 1
    assert all(len(body) <= check_batch.MAX_BODY_BYTES for _, body in requests)
    assert sum(count for count, _ in requests) == 40


@pytest.mark.parametrize("segment_id, capability", [(b"", b""), (b"s" * 256, b""),
                                                    (b"seg", b"c" * 65536)])
def test_ranges_the_frame_cannot_carry_are_refused(segment_id, capability):
    with pytest.raises(ValueError):
        check_batch.encode_ranges([(segment_id, 0, 1, capability)])


def test_malformed_bodies_do_not_parse():
    ((_, body),) = check_batch.encode_ranges([(b"seg", 0, 10, b"cap")])
    for bad in (body[:-1], body[:check_batch.RANGE.size - 1],
                check_batch.RANGE.pack(0, 0, 0, 10)):
        with pytest.raises(ValueError):
            list(check_batch.decode_ranges(bad))


def test_refusals_round_trip_and_bad_ones_do_not_parse():
    payload = check_batch.encode_refusals([(1, Status.CAPABILITY_REFUSED, "no capability"),
                                           (3, Status.RANGE_COMMITTED, "x" * 5000)])
    refused = check_batch.decode_refusals(payload, 4)
    assert refused[1] == (Status.CAPABILITY_REFUSED, "no capability")
    assert refused[3][0] == Status.RANGE_COMMITTED and len(refused[3][1]) == 4096
    assert check_batch.decode_refusals(b"", 4) == {}
    with pytest.raises(ValueError):
        check_batch.decode_refusals(payload, 3)          # names range 3 of 3
    with pytest.raises(ValueError):
        check_batch.decode_refusals(payload[:-1], 4)     # message cut short
    with pytest.raises(ValueError):
        check_batch.decode_refusals(check_batch.REFUSAL.pack(0, 99, 0), 1)  # no such status
