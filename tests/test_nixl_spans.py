"""nixl_spans: which caller buffers the nixl transport registers for one call
(``direct_spans``, pure: needs no NIXL), and their registration in one NIXL call and release
(``register_spans``, ``release_spans``: a real NIXL agent)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kvstore import ConfigError
from kvstore.transport import nixl_installed
from kvstore.transport.nixl_spans import (DIRECT_MIN_BYTES, Span, direct_spans,
                                          register_spans, release_spans)

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


needs_nixl = pytest.mark.skipif(not nixl_installed(), reason="NIXL is not installed "
                                "(make test installs it: requirements-nixl.txt)")


@pytest.fixture()
def agent():
    from kvstore.transport.nixl_lib import new_agent
    handle = new_agent("spans-test")
    yield handle
    handle.release()


def spans_of(buffers) -> list:
    return direct_spans([item(b.ctypes.data, b.nbytes) for b in buffers])


@needs_nixl
def test_spans_register_in_one_call_and_release_once(agent):
    buffers = [np.zeros(DIRECT_MIN_BYTES + 4096 * i, np.uint8) for i in range(3)]
    spans = spans_of(buffers)
    assert len(spans) == 3
    assert register_spans(agent, spans) == []
    assert all(span.descs is spans[0].descs for span in spans)   # one descriptor list
    assert len(agent.registrations) == 1
    release_spans(agent, spans)
    assert agent.registrations == []


@needs_nixl
def test_abandoned_span_keeps_its_shared_registration(agent):
    buffers = [np.zeros(DIRECT_MIN_BYTES, np.uint8) for _ in range(2)]
    spans = spans_of(buffers)
    register_spans(agent, spans)
    spans[1].abandoned = True
    release_spans(agent, spans)
    assert len(agent.registrations) == 1    # kept until the agent is released


@needs_nixl
def test_refused_span_fails_alone(agent):
    """NIXL refuses the joint registration (one span at address 0): the spans are then
    registered one by one and only the bad one is refused, with NIXL's reason."""
    good = [np.zeros(DIRECT_MIN_BYTES, np.uint8) for _ in range(2)]
    spans = spans_of(good)
    bad = Span(0, DIRECT_MIN_BYTES, item(0, DIRECT_MIN_BYTES))
    refused = register_spans(agent, [spans[0], bad, spans[1]])
    assert [span for span, _ in refused] == [bad]
    assert isinstance(refused[0][1], ConfigError) and "NIXL" in str(refused[0][1])
    assert bad.descs is None and spans[0].descs is not None and spans[1].descs is not None
    release_spans(agent, [spans[0], bad, spans[1]])
    assert agent.registrations == []
