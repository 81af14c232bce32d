"""Object metadata: what the master knows about one key.

An object is PENDING from put_start until put_end (invisible to readers: get_replicas,
exists and match_prefix treat it as absent), then COMPLETE until it is removed, evicted,
revoked, reclaimed after the pending timeout, or loses its last replica to a dead node.
The master keeps the two states in two tables (``MasterState.objects`` and ``.pending``).
Removal is not a state an object lingers in: its entry leaves the key table at once (space
under a live lease is freed later, see ``MasterState``).
"""

from __future__ import annotations

import enum


class ObjectState(enum.Enum):
    PENDING = "pending"      # space allocated, bytes being written; invisible to readers
    COMPLETE = "complete"    # visible; immutable until removed


PENDING = ObjectState.PENDING
COMPLETE = ObjectState.COMPLETE

# Per-item statuses: the values of ``kvstore.v1.ItemStatus``, as plain ints (the reply arrays
# take ints, and an enum attribute lookup per key costs). This is their one definition in the
# master; ``replies`` checks at import that they equal the proto's.
ITEM_OK = 0
ITEM_ALREADY_EXISTS = 1
ITEM_NOT_FOUND = 2
ITEM_NO_SPACE = 3
ITEM_INVALID = 4
ITEM_LEASED = 5
ITEM_PINNED = 6
ITEM_PENDING = 7
ITEM_UNCOMMITTED = 100   # put_end/remove: a replica's daemon did not confirm it in time

#: The values of ``kvstore.v1.Codec`` (RAW, LZ4, INT8) the master accepts and stores.
CODECS = (0, 1, 2)


class ObjectMeta:
    """One key's metadata. ``replicas`` is a list of ``(segment, offset)`` pairs; every
    replica holds ``size_bytes`` bytes at ``offset`` of its segment. Times are the master
    clock's seconds; ``0.0`` means "never" for leases and soft pins."""

    __slots__ = ("key", "size_bytes", "state", "replicas", "checksum", "codec", "client_id",
                 "lease_until_s", "soft_pin_until_s", "soft_pin_ttl_s", "hard_pin", "last_used",
                 "readers", "deferred", "move", "slow_reads", "reply_row", "shadow")

    def __init__(self, key: str, size_bytes: int, replicas: list, codec: int, client_id: str,
                 soft_pin_ttl_s: float, hard_pin: bool, state: ObjectState = PENDING,
                 checksum: int = 0):
        self.key = key
        self.size_bytes = size_bytes
        self.state = state
        self.replicas = replicas
        self.checksum = checksum
        self.codec = codec
        self.client_id = client_id
        self.lease_until_s = 0.0
        self.soft_pin_until_s = 0.0
        self.soft_pin_ttl_s = soft_pin_ttl_s   # applied at put_end
        self.hard_pin = hard_pin
        self.last_used = 0     # the master's use counter at the last put_end/get (LRU order)
        # readers holding a lease (leases.py): the lease ends early when the last releases
        self.readers = 0
        self.deferred = None   # [(segment, offset)] to free when the lease ends (state.py)
        self.move = None       # the tier move in flight for this object (tiering.py)
        self.slow_reads = 0    # reads served from a slower tier (promotion after N)
        # NOTE: owned by the encoder (replies.ReplicaRows), which keeps its cached reply row
        # here because a lookup beside the object costs a batch read ~10%; the state never
        # reads or writes it.
        self.reply_row = None
        # (segment, offset) of an inclusive SSD copy kept after a promotion (tiering.py)
        self.shadow = None

    def is_evictable(self, now_s: float) -> bool:
        """COMPLETE, not leased, not pinned (hard, or soft and unexpired) at ``now_s``."""
        return (self.state is COMPLETE and not self.hard_pin
                and self.lease_until_s <= now_s and self.soft_pin_until_s <= now_s)
