"""What a connector's save and load report, and how a batch's per-block results are read.

Shared by every connector (``connector``, ``hf_connector``) and by TP resharding (``tp``), so
none of them imports another for these names.

A batched get returns one entry per key: the number of bytes read, or a ``KVStoreError``. A
block *arrived* when its entry is exactly the stored block's size; a load uses only the
leading run of arrived blocks (KV of block ``i`` is useless without blocks ``0..i-1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from kvstore._errors import KVStoreError


@dataclasses.dataclass
class SaveResult:
    """``num_blocks_stored``: full blocks of the request now in the store (already present
    ones included); ``num_bytes_written``: bytes this call put; ``failed_keys``: blocks whose
    put failed."""

    num_blocks_stored: int
    num_bytes_written: int
    failed_keys: list[str]


@dataclasses.dataclass
class LoadResult:
    """``num_tokens_loaded``: leading tokens whose KV is now in the pages (a multiple of the
    block size); ``num_bytes_read``: bytes read from the store; ``failed_keys``: blocks the
    store reported but that could not be read (the engine recomputes from the first one)."""

    num_tokens_loaded: int
    num_bytes_read: int
    failed_keys: list[str]


def block_arrived(result: Any, block_bytes: int) -> bool:
    """True when one batched-get entry read the whole ``block_bytes`` block."""
    return not isinstance(result, KVStoreError) and result == block_bytes


def num_leading_arrived(results: Sequence[Any], block_bytes: int) -> int:
    """How many leading entries of a batched get arrived whole (stops at the first miss)."""
    for i, result in enumerate(results):
        if not block_arrived(result, block_bytes):
            return i
    return len(results)
