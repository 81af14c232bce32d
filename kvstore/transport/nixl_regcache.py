"""Caller buffers the nixl transport keeps registered across calls (issue 12: "registrations
are cached"), so a caller that puts from or gets into the same buffers again pays NIXL's
registration once instead of once per call.

Why it is safe: a cached entry holds views of the memory it registered (the items' own
memoryviews), so the exporter (a numpy array, a bytearray, a mmap) cannot free or move that
memory while the entry lives; any buffer whose addresses fall inside the entry's range is
therefore that same memory, and the registration still describes it. (A registration kept
past a free would be wrong bytes under RDMA: the pinned pages are no longer the buffer's.)
The cost of that guarantee: the memory of up to ``max_bytes`` of caller buffers stays alive
until its entry is evicted (least recently used first) or the transport closes, and while an
entry holds a ``bytearray`` it cannot be resized (BufferError), as with any exported buffer.

Spans registered in one NIXL call share one descriptor list (``nixl_spans.register_spans``),
so they are cached and evicted together. An entry is never evicted while a call uses it
(``take``/``give``: calls in other threads may be transferring through it) nor after its
transfer passed the deadline (the transfer may still use it): such an entry is released with
the agent. Not thread-safe: the transport calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Sequence

#: bytes of caller buffers kept registered (and alive) at most, by default
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: entries kept at most (a lookup scans them), by default
DEFAULT_MAX_ENTRIES = 64


class _Entry:
    __slots__ = ("start", "end", "descs", "views", "users", "abandoned")

    def __init__(self, start: int, end: int, descs: Any, views: tuple):
        self.start, self.end, self.descs, self.views = start, end, descs, views
        self.users = 0            # calls transferring through it now
        self.abandoned = False


class RegistrationCache:
    """Registered caller spans by address range; a hit is a span inside a cached one."""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._bytes = 0

    @property
    def num_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, start: int, end: int) -> _Entry | None:
        """The cached entry whose range holds [start, end), made the most recently used and
        counted as in use until ``give``; None on a miss."""
        for key, entry in self._entries.items():
            if entry.start <= start and end <= entry.end:
                self._entries.move_to_end(key)
                entry.users += 1
                return entry
        return None

    def give(self, entry: _Entry, *, abandoned: bool = False) -> list[Any]:
        """End one use of ``entry`` (``abandoned``: its transfer passed the deadline, so it
        stays registered until ``clear``). Returns descriptor lists to deregister (entries
        evicted while they were in use)."""
        entry.users -= 1
        entry.abandoned = entry.abandoned or abandoned
        return self._evict()

    def fits(self, length: int) -> bool:
        """Whether a span of ``length`` bytes may be cached at all."""
        return self.max_entries > 0 and length <= self.max_bytes

    def add(self, spans: Sequence[Any]) -> tuple[list[_Entry], list[Any]]:
        """Cache registered ``spans`` (``nixl_spans.Span``: start, end, descs, items with
        ``view``), all sharing one descriptor list, each counted in use as by ``take``.
        Returns their entries and the descriptor lists evicted to stay within the bounds,
        for the caller to deregister; spans sharing a descriptor list are evicted
        together."""
        entries = []
        for span in spans:
            entry = _Entry(span.start, span.end, span.descs,
                           tuple(item.view for item in span.items))
            entry.users = 1
            self._entries[(span.start, span.end, id(span.descs))] = entry
            self._bytes += span.end - span.start
            entries.append(entry)
        return entries, self._evict()

    def clear(self) -> list[Any]:
        """Forget every entry; their descriptor lists, each once, to deregister."""
        descs = _unique(entry.descs for entry in self._entries.values())
        self._entries.clear()
        self._bytes = 0
        return descs

    def _evict(self) -> list[Any]:
        evicted: list[Any] = []
        skipped: set[int] = set()    # descriptor lists in use or abandoned
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            victim = next((e for e in self._entries.values()
                           if id(e.descs) not in skipped), None)
            if victim is None:
                break
            shared = [key for key, e in self._entries.items() if e.descs is victim.descs]
            if any(self._entries[key].abandoned or self._entries[key].users
                   for key in shared):
                skipped.add(id(victim.descs))
                continue
            for key in shared:
                entry = self._entries.pop(key)
                self._bytes -= entry.end - entry.start
            evicted.append(victim.descs)
        return evicted


def _unique(items) -> list[Any]:
    seen: set[int] = set()
    out = []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out
