"""Caller buffers the nixl transport registers for the length of one call, instead of copying
them through the staging pool.

A NIXL transfer's local end must lie in registered memory. Registering a caller's buffer costs
about the same whatever its size (measured here: 110-170 us for 64 KiB to 64 MiB, UCX over
CMA/TCP; RDMA also pins the pages), a staging copy costs its length (620 us per MiB on the
loaded 2-core machine, ~100 us quiet), so from ``DIRECT_MIN_BYTES`` on the buffer is
registered for the call and the transfer goes straight from or into it. Items whose buffers
touch or overlap (the slices of one array in a batch) share one registration of their span,
and a call's spans are registered in one NIXL call (``register_spans``: about a third of the
cost of one call per span).

Only writable buffers are registered this way (RDMA cannot register read-only pages for
remote access); read-only ones (``bytes``) stay on the staging path. A span whose transfer
passed its deadline (``abandoned``) stays registered until the agent is released, since the
transfer may still be using it. Not thread-safe: one call's spans belong to that call.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvstore._errors import ConfigError

#: a span at least this long is registered for the call; shorter ones are staged
DIRECT_MIN_BYTES = 256 * 1024


class Span:
    """One contiguous range of caller memory registered for one call, and its items."""

    __slots__ = ("start", "end", "items", "descs", "abandoned")

    def __init__(self, start: int, end: int, item: Any):
        self.start, self.end, self.items = start, end, [item]
        self.descs: Any = None
        self.abandoned = False

    @property
    def length(self) -> int:
        return self.end - self.start


def direct_spans(items: Sequence[Any], min_bytes: int = DIRECT_MIN_BYTES) -> list[Span]:
    """The spans worth registering among ``items`` (objects with ``buffer_address``,
    ``target.length`` and ``view``): writable buffers merged where they touch or overlap,
    kept where the merged span is at least ``min_bytes`` long."""
    spans: list[Span] = []
    for item in sorted((i for i in items if not i.view.readonly),
                       key=lambda i: i.buffer_address):
        end = item.buffer_address + item.target.length
        if spans and item.buffer_address <= spans[-1].end:
            span = spans[-1]
            span.end = max(span.end, end)
            span.items.append(item)
        else:
            spans.append(Span(item.buffer_address, end, item))
    return [span for span in spans if span.length >= min_bytes]


def register_spans(handle: Any, spans: Sequence[Span]) -> list[tuple[Span, ConfigError]]:
    """Register ``spans`` with ``handle`` (a ``nixl_lib.AgentHandle``), setting each one's
    ``descs``: all in one NIXL call (they then share one descriptor list) or, if NIXL refuses
    that, one by one, so that a refusal concerns only its own span. Returns the refused
    spans with NIXL's reason (their ``descs`` stay None)."""
    if len(spans) > 1:
        try:
            descs = handle.register_many([(span.start, span.length) for span in spans])
        except ConfigError:
            pass
        else:
            for span in spans:
                span.descs = descs
            return []
    refused = []
    for span in spans:
        try:
            span.descs = handle.register(span.start, span.length)
        except ConfigError as exc:
            refused.append((span, exc))
    return refused


def release_spans(handle: Any, spans: Sequence[Span]) -> None:
    """Deregister the registered ``spans``, each descriptor list once. NOTE: spans registered
    together share one list; it stays registered (until the agent is released) if any of
    them was abandoned, since that span's transfer may still use it."""
    kept = {id(span.descs) for span in spans if span.abandoned}
    released: set[int] = set()
    for span in spans:
        if span.descs is not None and id(span.descs) not in kept | released:
            released.add(id(span.descs))
            handle.deregister(span.descs)
