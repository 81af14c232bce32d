"""Reused memory for the tensors a load rebuilds: a transformers cache's fresh ``[1, H, S, D]``
tensors are views of an arena the connector keeps, and a later load reuses an arena once
nothing references its memory any more.

NOTE: why: a load into freshly allocated tensors pays the kernel's first touch of every page
(a fault and a zeroed page per 4 KiB): measured here +1.6 ms of CPU on a 2.8 ms fill of 32
MiB, i.e. the gap between the transformers-cache load and the paged one (bench/RESULTS.md,
"Engine pipeline (15e)"). The allocator gives such sizes back to the system on free
(glibc trims and unmaps them), so a second load faults again; an arena stays mapped.

Rule: an arena is free when its storage has no user but the pool itself (a view, a slice,
any tensor sharing its storage counts as one: ``torch._C._storage_Use_Count``); the pool
holds at most ``max_arenas`` (the oldest busy one is dropped from the pool when a new one is
needed and lives on with its tensors). Where torch lacks that count, nothing is reused.
Memory: up to ``max_arenas`` loads' worth of KV stays allocated while the connector lives.
Not thread-safe (one connector, one thread).
"""

from __future__ import annotations

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class TensorArenas:
    """A few flat CPU tensors whose memory the next loads reuse once it is unreferenced."""

    def __init__(self, max_arenas: int = 2):
        self._max_arenas = max_arenas
        self._arenas: list[torch.Tensor] = []

    def take(self, num_elems: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``num_elems`` elements of ``dtype`` no other tensor shares: a view
        of a free arena (its bytes are what the last user left: the caller writes them), else
        a new arena (kept for later loads)."""
        for arena in self._arenas:
            if arena.dtype == dtype and arena.numel() >= num_elems and _is_free(arena):
                return arena[:num_elems]
        arena = torch.empty(num_elems, dtype=dtype)
        self._arenas = [arena] + self._arenas[:self._max_arenas - 1]
        # NOTE: a view, never the arena itself: the caller holding the pool's own tensor
        # object would add no user to the storage, and the arena would look free
        return arena[:num_elems]


def _is_free(arena: torch.Tensor) -> bool:
    """True when ``arena`` is the only tensor on its storage. NOTE: 2: the arena's own
    reference and the temporary ``untyped_storage()`` wrapper asked here."""
    if _use_count is None:
        return False
    return _use_count(arena.untyped_storage()._cdata) <= 2
