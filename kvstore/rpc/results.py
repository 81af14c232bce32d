"""The values the metadata client's verbs take and return: plain Python, never protobuf.

A batch verb returns one entry per key, in order: the key's result (a slot of ``Target``
ranges to write, a ``ReplicaSet`` to read, a flag) or the ``KVStoreError`` that item failed
with, naming its key. Byte ranges are ``kvstore.transport.Target``: what a transport moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.tiers import Tier
from kvstore.transport.base import Target


class ReplicaSet:
    """Where one COMPLETE object's bytes are: every replica holds ``size_bytes`` bytes with
    XXH3-64 ``checksum``, stored with ``codec`` (kvstore.v1.Codec). ``targets`` come in the
    master's order (same-host replicas first).

    NOTE: a plain slotted class, not a frozen dataclass: one is built per key of every get,
    and a frozen dataclass costs four times as long to build (577 vs 146 ns here).
    """

    __slots__ = ("size_bytes", "checksum", "codec", "targets")

    def __init__(self, size_bytes: int, checksum: int, codec: int, targets: list[Target]):
        self.size_bytes = size_bytes
        self.checksum = checksum
        self.codec = codec
        self.targets = targets

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplicaSet) and (
            (self.size_bytes, self.checksum, self.codec, self.targets)
            == (other.size_bytes, other.checksum, other.codec, other.targets))

    def __repr__(self) -> str:
        return (f"ReplicaSet(size_bytes={self.size_bytes}, checksum={self.checksum}, "
                f"codec={self.codec}, targets={self.targets})")


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """One region a daemon contributes: registered with the master."""

    segment_id: str
    tier: Tier
    capacity_bytes: int
    shm_name: str = ""       # DRAM: the POSIX shm name same-host clients map
    path: str = ""           # SSD: the backing file


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A storage node as it registers: who it is, where its data plane listens, what it holds."""

    node_id: str
    host_id: str
    data_addr: str
    segments: list[SegmentSpec]
    incarnation: str = ""     # changes each time the daemon process starts
    nixl_metadata: bytes = b""  # daemon --nixl: kvstore.transport.nixl_meta; b"" without
    commit_push: bool = False  # takes COMMIT pushes (durable commit waits for this node)
    write_capabilities: bool = False  # the node verifies write capabilities (asks a secret)
    client_commit: bool = False  # takes CLIENT_COMMIT frames (writers commit there themselves)
    # the node also verifies read capabilities on READs (with write_capabilities only)
    read_capabilities: bool = False
    commit_ring: str = ""        # shm name of its commit ring (kvstore/commit_ring.py); "": none
    # takes batch capabilities on CLIENT_COMMIT (capability.issue_batch)
    batch_capabilities: bool = False


@dataclass(slots=True)
class Inventory:
    """Replicas a node holds, as parallel lists (one entry per object): sent at registration,
    received in heartbeats. ``checksums``/``codecs`` may be empty (then unknown / raw)."""

    keys: list[str] = field(default_factory=list)
    segment_ids: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)
    codecs: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class Registration:
    """The master's answer to a registration."""

    master_id: str
    heartbeat_interval_s: float
    node_ttl_s: float
    num_objects_adopted: int
    capability_secret: bytes = b""   # key of this node's write capabilities; b"": none
    # the master issues read capabilities for this node (False: an older master, or not asked)
    read_capabilities: bool = False
    # how long after an up-to-date heartbeat the node may serve location reads (0: never;
    # daemon/location_reads.py)
    location_lease_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TierMove:
    """A copy the master orders between two segments of one node (demotion or promotion):
    ``length`` bytes from ``src_offset`` of ``src_segment_id`` to ``dst_offset`` of
    ``dst_segment_id``; the daemon reports ``move_id`` done or failed in a later heartbeat."""

    move_id: int
    key: str
    src_segment_id: str
    src_offset: int
    dst_segment_id: str
    dst_offset: int
    length: int
    dst_capability: bytes = b""   # the master's permission to write the destination range


@dataclass(frozen=True, slots=True)
class HeartbeatChanges:
    """Changes to a node's object table since the sequence it acknowledged: ``full_resync``
    means discard the table first (``added`` is then all of it); then apply ``added``, then
    ``removed_keys``; ``seq`` is the sequence to acknowledge next. ``moves``: the tier moves
    to make before the next heartbeat. The same shape is the body of a COMMIT push."""

    master_id: str
    seq: int
    full_resync: bool
    added: Inventory
    removed_keys: list[str]
    moves: list[TierMove] = field(default_factory=list)
    base_seq: int = 0   # the sequence the changes follow; a table behind it applies nothing
    # the changes reach the node's latest one (False: maybe not, or an older master)
    up_to_date: bool = False


@dataclass(frozen=True, slots=True)
class TierUsage:
    """One tier's figures (of the cluster in Stats, of one node in ListNodes): reads served
    (``hits``, counted on an object's first listed replica), objects moved out to a slower
    tier (``demotions``), moved in from a slower tier (``promotions``), dropped
    (``evictions``). Counters of a node go with it when it leaves."""

    tier: Tier
    capacity_bytes: int
    used_bytes: int
    num_replicas: int
    hits: int = 0
    demotions: int = 0
    promotions: int = 0
    evictions: int = 0


@dataclass(frozen=True, slots=True)
class TenantStatus:
    """One tenant's usage (Stats): ``tier_to_used_bytes`` of every tier it uses or has a
    quota in, ``tier_to_quota_bytes`` of the tiers with a quota; keys refused for the quota
    since the master started (``num_refused``)."""

    name: str
    namespace: str
    num_objects: int
    tier_to_used_bytes: dict
    tier_to_quota_bytes: dict
    num_refused: int


@dataclass(frozen=True, slots=True)
class MasterStats:
    """Cluster figures (Stats)."""

    master_id: str
    uptime_s: float
    num_nodes: int
    num_objects: int
    num_pending: int
    num_leased: int
    hits: int
    misses: int
    evictions: int
    tiers: list[TierUsage]
    max_batch: int
    metrics_port: int | None    # None: no metrics endpoint
    fast_port: int | None       # None: no fast metadata path
    # tenants (master --tenants): all for the cluster token, the caller's own for a tenant
    tenants: list["TenantStatus"] = field(default_factory=list)
    # the token for the daemons' data planes, when it is not the caller's own (tenants)
    data_token: str | None = None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One registered node as the master sees it (ListNodes)."""

    node_id: str
    host_id: str
    data_addr: str
    segments: list[SegmentSpec]
    used_bytes: int
    num_objects: int
    last_heartbeat_age_s: float
    tiers: list[TierUsage] = field(default_factory=list)
    nixl_metadata: bytes = b""  # as the node registered it (NodeSpec.nixl_metadata)
    reserved_bytes: int = 0     # unused bytes of live reservations there (in used_bytes)


@dataclass(frozen=True, slots=True)
class ReservationGrant:
    """Space the master granted one writer ahead of its puts (Reserve): ``target`` is the
    whole range, with the write capability that covers it; usable for ``ttl_s`` from the
    request (the master refuses commits into it after that)."""

    reservation_id: int
    target: Target
    ttl_s: float
    commit_ring: str = ""       # shm name of the node's commit ring; "": none


@dataclass(frozen=True, slots=True)
class HomeNode:
    """One live node a key's home may be (GetHomeNodes)."""

    node_id: str
    host_id: str
    data_addr: str
    keyed_read_capability: bytes   # b"": the node checks no reads


@dataclass(frozen=True, slots=True)
class HomeNodes:
    """The live nodes keys' homes are hashed over, for one caller (GetHomeNodes)."""

    nodes: list[HomeNode]
    key_prefix: str          # what the master prepends to this caller's keys
    expiry_ms: int           # the keyed-read capabilities' expiry (Unix ms)
    membership: int          # changes whenever the node set does
