"""Space allocator of one segment: best fit over a free list that coalesces on free.

Structures (all keyed by byte offsets inside the segment):
  ``_start_to_len``  free extent start -> its length
  ``_end_to_start``  free extent end   -> its start (finds the left neighbour on free)
  ``_len_to_starts`` length -> starts of free extents of exactly that length
  ``_lens``          the distinct free lengths, sorted (bisect finds the best fit)

Invariants: every length and offset is a multiple of ``ALIGNMENT_BYTES``; free extents never
touch (a free merges with both neighbours), so the free list cannot fragment into adjacent
pieces; allocated ranges never overlap each other or a free extent. Under fixed-size KV blocks
best fit finds an exact-size hole first, so repeated alloc/free of one size never splits space
it does not need to. Not thread-safe: the master holds its lock around every call.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Iterable

from kvstore.master.config import ALIGNMENT_BYTES

_MASK = ALIGNMENT_BYTES - 1


def aligned_size(num_bytes: int) -> int:
    """``num_bytes`` rounded up to the allocation granularity."""
    return (num_bytes + _MASK) & ~_MASK


class SegmentAllocator:
    """Hands out aligned byte ranges of ``[0, capacity_bytes)``."""

    __slots__ = ("capacity_bytes", "used_bytes", "_start_to_len", "_end_to_start",
                 "_len_to_starts", "_lens")

    def __init__(self, capacity_bytes: int):
        # NOTE: a trailing sliver smaller than the alignment can never be handed out.
        self.capacity_bytes = capacity_bytes & ~_MASK
        self.used_bytes = 0
        self._start_to_len: dict[int, int] = {}
        self._end_to_start: dict[int, int] = {}
        self._len_to_starts: dict[int, set[int]] = {}
        self._lens: list[int] = []
        if self.capacity_bytes:
            self._add_free(0, self.capacity_bytes)

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def can_allocate(self, size_bytes: int) -> bool:
        return bool(self._lens) and self._lens[-1] >= aligned_size(size_bytes)

    def allocate(self, size_bytes: int) -> int | None:
        """Reserve ``size_bytes`` (> 0); return the aligned offset, or None if no hole fits."""
        need = aligned_size(size_bytes)
        lens = self._lens
        i = bisect_left(lens, need)
        if i == len(lens):
            return None
        length = lens[i]
        starts = self._len_to_starts[length]
        start = min(starts) if len(starts) < 8 else starts.pop()
        if length == need:
            self._remove_free(start, length)
        else:
            # NOTE: split in place (the hot path of a put): the hole keeps its end, so only
            # its start and its length class change.
            starts.discard(start)
            if not starts:
                del self._len_to_starts[length]
                del lens[i]
            del self._start_to_len[start]
            rest_start, rest = start + need, length - need
            self._start_to_len[rest_start] = rest
            self._end_to_start[start + length] = rest_start
            rest_starts = self._len_to_starts.get(rest)
            if rest_starts is None:
                self._len_to_starts[rest] = {rest_start}
                insort(lens, rest)
            else:
                rest_starts.add(rest_start)
        self.used_bytes += need
        return start

    def free(self, offset: int, size_bytes: int) -> None:
        """Give back a range returned by ``allocate(size_bytes)`` (or reserved). Merges it
        with free neighbours."""
        length = aligned_size(size_bytes)
        self.used_bytes -= length
        start = offset
        left = self._end_to_start.get(start)
        if left is not None:
            self._remove_free(left, start - left)
            length += start - left
            start = left
        right_len = self._start_to_len.get(start + length)
        if right_len is not None:
            self._remove_free(start + length, right_len)
            length += right_len
        self._add_free(start, length)

    def reserve_many(self, ranges: Iterable[tuple[int, int]]) -> list[bool]:
        """Mark ``(offset, size_bytes)`` ranges as allocated on a fresh allocator (used to
        adopt a daemon's inventory). A range is refused (False at its position) when its
        offset is unaligned, its size is 0, it leaves the segment, or it overlaps a range
        accepted before it in offset order. Raises ``RuntimeError`` if space is in use."""
        if self.used_bytes:
            raise RuntimeError("reserve_many needs a fresh allocator")
        ranges = list(ranges)
        accepted = [False] * len(ranges)
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        taken: list[tuple[int, int]] = []
        end_of_last = 0
        for i in order:
            offset, size = ranges[i]
            length = aligned_size(size)
            if size <= 0 or offset & _MASK or offset < end_of_last \
                    or offset + length > self.capacity_bytes:
                continue
            accepted[i] = True
            taken.append((offset, length))
            end_of_last = offset + length
        self._start_to_len.clear()
        self._end_to_start.clear()
        self._len_to_starts.clear()
        self._lens.clear()
        cursor = 0
        for offset, length in taken:
            if offset > cursor:
                self._add_free(cursor, offset - cursor)
            cursor = offset + length
            self.used_bytes += length
        if cursor < self.capacity_bytes:
            self._add_free(cursor, self.capacity_bytes - cursor)
        return accepted

    def free_extents(self) -> list[tuple[int, int]]:
        """The free ``(offset, length)`` extents in offset order (for checks and stats)."""
        return sorted(self._start_to_len.items())

    # -- the free structures are touched only here and in allocate's in-place split ----------

    def _add_free(self, start: int, length: int) -> None:
        self._start_to_len[start] = length
        self._end_to_start[start + length] = start
        starts = self._len_to_starts.get(length)
        if starts is None:
            self._len_to_starts[length] = {start}
            insort(self._lens, length)
        else:
            starts.add(start)

    def _remove_free(self, start: int, length: int) -> None:
        del self._start_to_len[start]
        del self._end_to_start[start + length]
        starts = self._len_to_starts[length]
        starts.discard(start)
        if not starts:
            del self._len_to_starts[length]
            del self._lens[bisect_left(self._lens, length)]
