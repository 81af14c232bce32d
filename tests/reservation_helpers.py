"""Where a client's reserved puts landed: helpers of the reservation tests (real processes)."""

from __future__ import annotations

from kvstore.rpc.results import ReservationGrant


def replica_of(store, key: str) -> tuple[str, int]:
    """(segment_id, offset) of ``key``'s one replica, as the master lists it."""
    (replica_set,) = store._master.get_replicas([key])
    target = replica_set.targets[0]
    return target.segment_id, target.offset


def inside(grant: ReservationGrant, replica: tuple[str, int]) -> bool:
    """True if ``replica`` (segment_id, offset) lies in ``grant``'s range."""
    segment_id, offset = replica
    whole = grant.target
    return segment_id == whole.segment_id and \
        whole.offset <= offset < whole.offset + whole.length
