"""nixl_spans.direct_spans: which caller buffers the nixl transport registers for one call
(pure: needs no NIXL)."""

from __future__ import annotations

from types import SimpleNamespace

from kvstore.transport.nixl_spans import DIRECT_MIN_BYTES, direct_spans

KIB = 1024


def item(address: int, length: int, readonly: bool = False) -> SimpleNamespace:
    return SimpleNamespace(buffer_address=address, target=SimpleNamespace(length=length),
                           view=SimpleNamespace(readonly=readonly))


def test_touching_and_overlapping_buffers_share_one_span():
    a, b, c = item(1000, 200 * KIB), item(1000 + 200 * KIB, 100 * KIB), item(2000, 10)
    (span,) = direct_spans([c, b, a])
    assert (span.start, span.end) == (1000, 1000 + 300 * KIB)
    assert sorted(span.items, key=id) == sorted([a, b, c], key=id)


def test_short_read_only_and_separate_buffers():
    short = item(0, DIRECT_MIN_BYTES - 1)
    frozen = item(10 << 20, 4 << 20, readonly=True)
    far = item(100 << 20, DIRECT_MIN_BYTES)
    gap = item((100 << 20) + DIRECT_MIN_BYTES + 1, DIRECT_MIN_BYTES)  # one byte apart
    spans = direct_spans([short, frozen, far, gap])
    assert [(s.start, s.length) for s in spans] == [(far.buffer_address, DIRECT_MIN_BYTES),
                                                    (gap.buffer_address, DIRECT_MIN_BYTES)]
    assert direct_spans([]) == []
