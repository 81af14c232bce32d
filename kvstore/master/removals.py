"""``UnconfirmedRemovals``: removals (removes, evictions) that a node's daemon did not
confirm within ``--commit-timeout``, kept until it does.

Why: the master forgets a removed object at once, but until the daemon holding a replica
confirms the removal its table (the inventory a rebuilt master adopts from) still lists it.
So the removal is not durable yet: the call that asked for it is told so (Remove answers
the key ITEM_UNCOMMITTED; RemovePrefix names the nodes), and this table lets the master
keep its word while the node catches up.

Guarantees:
- ``touch`` (in a Remove or RemovePrefix, under the service lock): a retried removal of a
  key listed here waits again for the listed nodes (their durable sequence covers every
  earlier change, so one confirmation settles it) and answers OK once they confirmed (a
  key whose confirmation came first, by a background push or a heartbeat, is forgotten and
  answers NOT_FOUND: either way the retry answers without error only once it is durable).
- ``refuses`` (in a node's registration): a node dropped before it confirmed (a daemon
  stalled past the node TTL) that re-registers with the key in its inventory does not get
  it adopted; the entry then waits for that incarnation's first full resync (sequence 1),
  which drops the key from its table.
- An entry ends when its node's ``durable_seq`` reaches the removal's sequence, or when a
  new incarnation of the node registered without bringing the key back.

Limits: only the master's memory holds this table. A master that dies before the node
confirms rebuilds from the node's inventory and serves the object again; that is the case
the Remove's ITEM_UNCOMMITTED answer warns about (retry until OK for a durable removal).
Entries of a node that never comes back stay (a few bytes per key) until the master
restarts.

Not thread-safe: every method runs under the service lock.
"""

from __future__ import annotations


class UnconfirmedRemovals:
    """key -> {node id: (node, sequence of the removal on that node)} (see the module)."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[str, tuple[object, int]]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def record(self, node) -> list[str]:
        """List every removal in ``node``'s change log that it has not confirmed; return
        their keys (a node that missed its commit deadline, under the lock)."""
        durable_seq = node.durable_seq
        keys = []
        for seq, key, segment_id, *_ in node.log:
            if seq > durable_seq and segment_id is None:
                self._by_key.setdefault(key, {})[node.node_id] = (node, seq)
                keys.append(key)
        return keys

    def _unconfirmed(self, key: str, nodes: dict) -> dict[str, tuple[object, int]]:
        """The entries of ``key`` still open (confirmed ones are dropped on the way)."""
        entries = self._by_key.get(key)
        if not entries:
            return {}
        for node_id, (node, seq) in list(entries.items()):
            current = nodes.get(node_id)
            confirmed = node.durable_seq >= seq if current is node else current is not None
            if confirmed:      # NOTE: a new incarnation registered without the key
                del entries[node_id]
        if not entries:
            del self._by_key[key]
        return entries

    def silent_nodes(self, key: str, nodes: dict) -> list[str]:
        """Ids of the nodes that have not confirmed ``key``'s removal (sorted)."""
        return sorted(self._unconfirmed(key, nodes))

    def touch(self, keys, nodes: dict) -> list[str]:
        """Put the registered nodes that owe a confirmation for any of ``keys`` in the
        state's ``touched`` set (so the call waits for them); return the keys listed."""
        listed = []
        for key in keys:
            entries = self._unconfirmed(key, nodes)
            if entries:
                listed.append(key)
                for node, _ in entries.values():
                    if nodes.get(node.node_id) is node:
                        node.touched.add(node)
        return listed

    def with_prefix(self, prefix: str) -> list[str]:
        return [key for key in self._by_key if key.startswith(prefix)]

    def refuses(self, node, key: str) -> bool:
        """Whether ``node`` (registering) must not have ``key`` adopted from its inventory;
        if so its entry now waits for the node's first resync (sequence 1)."""
        entries = self._by_key.get(key)
        if not entries or node.node_id not in entries:
            return False
        entries[node.node_id] = (node, 1)
        return True

    def prune(self, nodes: dict) -> None:
        """Drop every confirmed entry."""
        for key in list(self._by_key):
            self._unconfirmed(key, nodes)
