"""A key's home node: the one node the master places a free put's first replica on, and the
one a client sends a first get to (docs/ARCHITECTURE.md, Home reads).

Rule: rendezvous (highest-random-weight) hashing of the stored key (a tenant's key with its
``{namespace}/`` prefix, as the master sees it) over the node ids of the live nodes: the
node whose weight ``xxh3_64(key, seed=xxh3_64(node_id))`` is highest, ties to the smaller
node id. The master (``master/placement.py``) and the client (``client/home_reads.py``)
compute it with this one function over the same list (``GetHomeNodes``), so they agree
whenever the client's list is current. Why rendezvous: a node joining or leaving moves only
the keys whose home it becomes or was (about 1/N of them), not all keys as ``hash % N``
would.
"""

from __future__ import annotations

from typing import Sequence

import xxhash

_hash = xxhash.xxh3_64_intdigest


def node_seeds(node_ids: Sequence[str]) -> list[tuple[int, str]]:
    """The (seed, node id) pairs ``home_of`` takes, sorted by node id (computed once per
    node list)."""
    return [(_hash(node_id.encode()), node_id) for node_id in sorted(node_ids)]


def home_of(key: str, seeds: Sequence[tuple[int, str]]) -> str:
    """The home node id of ``key`` among ``seeds`` (``node_seeds``); "" when empty."""
    data = key.encode()
    best_weight, best = -1, ""
    for seed, node_id in seeds:     # sorted by id: on a tie the first (smaller) id stays
        weight = _hash(data, seed)
        if weight > best_weight:
            best_weight, best = weight, node_id
    return best
