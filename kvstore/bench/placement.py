"""Where ``kvstore bench transfer`` measures: the storage node it writes to (``pick_node``:
the ``--target-node`` one, else the first the master lists) and the check that every put of
a case landed there (``check_placement``: the master is asked where each key's replicas are).

``--target-node`` is sent as the placement hint ``near_node`` of every put: the master puts
the replica on that node when it has room and elsewhere when it has not. A figure measured
on another node would be a figure of the wrong link, so the bench checks each case's keys
before it removes them and stops with an error naming the nodes they went to.
"""

from __future__ import annotations

from typing import Sequence

import click

#: keys per GetReplicas call of the placement check
CHECK_BATCH_KEYS = 1024


def pick_node(master_addr: str, token: str | None, node_id: str | None = None,
              timeout_s: float = 5.0, tls=None):
    """The node ``node_id`` as the master lists it (a NodeStatus), or the first node listed
    when ``node_id`` is None. Raises click.UsageError when the master cannot be reached or
    lists no node of that id (naming the nodes it does list), click.ClickException when it
    lists no node at all."""
    import grpc

    from kvstore._errors import KVStoreError
    from kvstore.rpc import grpc_client

    try:
        with grpc_client(master_addr, token=token, rpc_timeout_s=timeout_s,
                         tls=tls) as client:
            nodes = client.list_nodes()
    except (KVStoreError, grpc.RpcError, OSError, ValueError) as exc:
        raise click.UsageError(f"--master {master_addr}: cannot reach the master: {exc}") \
            from exc
    if not nodes:
        raise click.ClickException(f"master {master_addr} lists no storage node")
    if node_id is None:
        return nodes[0]
    for node in nodes:
        if node.node_id == node_id:
            return node
    raise click.UsageError(f"--target-node {node_id}: master {master_addr} lists no such node;"
                           f" it lists: {', '.join(sorted(n.node_id for n in nodes))}")


def replica_nodes(master_addr: str, token: str | None, keys: Sequence[str],
                  timeout_s: float = 30.0, tls=None) -> dict[str, int]:
    """How many replicas of ``keys`` each node holds, as the master says (keys it does not
    know, e.g. evicted ones, count under "" )."""
    from kvstore._errors import KVStoreError
    from kvstore.rpc import grpc_client

    counts: dict[str, int] = {}
    with grpc_client(master_addr, token=token, rpc_timeout_s=timeout_s, tls=tls) as client:
        for lo in range(0, len(keys), CHECK_BATCH_KEYS):
            results, lease_id = client.get_replicas_leased(list(keys[lo:lo + CHECK_BATCH_KEYS]))
            # NOTE: released at once: a removed object's space is freed only when its lease
            # ends, and the next case needs that space
            if lease_id:
                client.release_leases([lease_id])
            for result in results:
                if isinstance(result, KVStoreError):
                    counts[""] = counts.get("", 0) + 1
                    continue
                for target in result.targets:
                    counts[target.node_id] = counts.get(target.node_id, 0) + 1
    return counts


def check_placement(master_addr: str, token: str | None, keys: Sequence[str],
                    node_id: str | None, what: str, tls=None) -> dict[str, int]:
    """``replica_nodes`` of ``keys``; with a ``node_id``, raises click.ClickException when a
    replica is on another node (the target had no room: the figure would be another link's).
    Keys the master no longer knows (evicted while the case ran) are not counted against it."""
    counts = replica_nodes(master_addr, token, keys, tls=tls)
    if node_id is not None:
        elsewhere = {node: n for node, n in counts.items() if node not in (node_id, "")}
        if elsewhere:
            raise click.ClickException(
                f"{what}: {sum(elsewhere.values())} of {len(keys)} puts landed on other nodes "
                f"than --target-node {node_id} ({', '.join(sorted(elsewhere))}): is it full? "
                "Give it more room or use smaller --sizes/--batch")
    return counts
