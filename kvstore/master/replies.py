"""Protobuf replies from the state's results: the master's one encoder, with its caches.

The state (``state``, ``reads``, ``admin``, ``registration``, ``eviction``) answers in domain
values: ObjectMeta objects, SegmentSpace/offset picks, Node objects, status ints. The service
builds the simple replies inline; every reply with a table or a packed array is built here.

Caches (each only for speed; the state maintains none of them):
  ``NodeRefs``     Node -> its NodeRef message, built once per node.
  ``ReplicaRows``  ``(size_bytes, checksum, codec, segment, offset)`` of each COMPLETE
                   object with exactly one replica, kept in the object's ``reply_row`` slot:
                   a batch of found keys is then transposed in one step (see
                   ``ReplyEncoder.get_replicas``).
  ``SizeInterner`` one int object per distinct object size, applied to PutStart's sizes, so
                   ``_fill_arrays`` finds a batch of equal sizes by identity.
  tables           GetReplicasResponse's node and segment tables in wire form, per list
                   of segments (``ReplyEncoder._encoded_tables``).
"""

from __future__ import annotations

from collections import Counter

from kvstore.master import objects
from kvstore.master._keyindex import encode_get_replicas
from kvstore.master.objects import ITEM_OK
from kvstore.master.wire import varint
from kvstore.v1 import master_pb2 as pb

# NOTE: the state's status and codec ints are defined once, in ``objects``; they must be the
# wire's values, as the replies carry them as they are.
if ({name: getattr(objects, name) for name in pb.ItemStatus.keys()}
        != dict(pb.ItemStatus.items()) or objects.CODECS != tuple(pb.Codec.values())):
    raise RuntimeError("kvstore.master.objects' statuses or codecs differ from master.proto's")

#: Distinct object sizes kept as one shared int each (see ``SizeInterner``).
MAX_INTERNED_SIZES = 256
#: Batch lengths whose packed 0..n-1 encoding is kept (a client uses a few batch sizes).
_MAX_RANGE_PAYLOADS = 64
#: Batches shorter than this fill their arrays element by element (see ``_fill_arrays``).
_MIN_PACKED_ITEMS = 16
#: Distinct segment lists whose encoded reply tables are kept (see ``ReplyEncoder``).
_MAX_CACHED_TABLES = 1024


def _packed_tag(field_name: str) -> bytes:
    """The wire tag of a packed repeated field of GetReplicasResponse."""
    number = pb.GetReplicasResponse.DESCRIPTOR.fields_by_name[field_name].number
    return varint(number << 3 | 2)


_STATUSES_TAG, _SIZES_TAG, _CHECKSUMS_TAG, _CODECS_TAG, _STARTS_TAG, _COUNTS_TAG, \
    _SEGMENT_TAG = map(_packed_tag, ("statuses", "sizes", "checksums", "codecs",
                                     "replica_start", "replica_count", "replica_segment"))


def _fill_arrays(reply, num_items: int, num_to_range_payload: dict, tag_name_values,
                 encoded_fields: bytes = b"") -> None:
    """Set ``reply``'s repeated integer fields from ``(tag, field name, values)``, and merge
    ``encoded_fields`` (fields already in wire form: the cached tables) in the same parse.

    NOTE: why not the constructor: it converts element by element (25-45 ns a key per
    field, ~150 ns where each value is its own int object far away in memory), which was a
    fifth of a 1024-key GetReplicas. A field whose values are all one value (all ITEM_OK,
    one replica each, same size: the common batch) or a ``range`` (replica_start when
    every key has one replica) is encoded here as packed bytes and parsed in one C call
    (~6 ns a key). ``count`` finds the uniform case at C speed: the values are small ints
    or interned sizes (``SizeInterner``), so it compares identities.

    NOTE: below ``_MIN_PACKED_ITEMS`` keys the fields are extended as they are: the packed
    route's fixed cost (a varint per field in Python, a join and a parse) was 60% of a
    one-key GetReplicas (~10 us of its 17 us in-process), where element by element costs
    well under a microsecond per field.
    """
    encoded = [encoded_fields]
    if num_items < _MIN_PACKED_ITEMS:
        for _, name, values in tag_name_values:
            if values:
                getattr(reply, name).extend(values)
        tag_name_values = ()
    for tag, name, values in tag_name_values:
        if not values:
            continue
        if isinstance(values, range) and values.start == 0 and values.step == 1:
            payload = num_to_range_payload.get(len(values))
            if payload is None:
                if len(num_to_range_payload) >= _MAX_RANGE_PAYLOADS:
                    num_to_range_payload.clear()
                payload = num_to_range_payload[len(values)] = b"".join(map(varint, values))
        elif len(values) == num_items and values.count(values[0]) == num_items:
            payload = varint(values[0]) * num_items
        else:
            getattr(reply, name).extend(values)
            continue
        encoded += (tag, varint(len(payload)), payload)
    payload = b"".join(encoded)
    if payload:
        reply.MergeFromString(payload)


class SizeInterner:
    """One int object per distinct size (KV blocks come in a few sizes); bounded: past
    ``MAX_INTERNED_SIZES`` sizes, others are kept as given."""

    def __init__(self):
        self._sizes: dict[int, int] = {}

    def intern(self, sizes) -> list[int]:
        get = self._sizes.get
        return [get(size) or self._add(size) for size in sizes]

    def _add(self, size: int) -> int:
        if size > 0 and len(self._sizes) < MAX_INTERNED_SIZES:
            self._sizes[size] = size
        return size


class NodeRefs:
    """Node -> its NodeRef (a node's id and addresses never change). Entries of dropped
    nodes are let go once the cache outgrows the live nodes."""

    def __init__(self, state):
        self._state = state
        self._node_to_ref: dict = {}

    def get(self, node) -> pb.NodeRef:
        ref = self._node_to_ref.get(node)
        if ref is None:
            if len(self._node_to_ref) > 2 * len(self._state.nodes) + 64:
                live = self._state.nodes
                self._node_to_ref = {n: r for n, r in self._node_to_ref.items()
                                     if live.get(n.node_id) is n}
            ref = self._node_to_ref[node] = pb.NodeRef(
                node_id=node.node_id, host_id=node.host_id, data_addr=node.data_addr,
                commit_ring=node.commit_ring)
        return ref


class ReplicaRows:
    """Each COMPLETE one-replica object's reply row ``(size_bytes, checksum, codec, segment,
    offset, token)``, kept in its ``reply_row`` slot (the state never touches it), filled
    when the object is committed or first read.

    A row can go stale only by adoption adding a replica to its object, so the service
    calls ``forget`` after a RegisterNode that adopted objects: that changes ``token``, and
    a row with another token is recomputed when read. (A node drop only takes replicas
    away: a one-replica object loses its only one and leaves the object table; an object's
    checksum, size and codec never change once it is COMPLETE.)
    """

    def __init__(self):
        self._token = object()

    def columns(self, objs) -> tuple | None:
        """``(sizes, checksums, codecs, segments, offsets)`` of ``objs`` (all COMPLETE, at
        least one), or None if one has two or more replicas."""
        rows = [obj.reply_row for obj in objs]
        if None in rows and not self._fill(objs, rows):
            return None
        *columns, tokens = zip(*rows)
        if tokens.count(self._token) != len(rows):           # rows from before a forget
            for obj in objs:
                obj.reply_row = None
            return self.columns(objs)
        return columns

    def row(self, obj) -> tuple | None:
        """``obj``'s current row (filled or recomputed as ``columns`` does), or None if it
        has two or more replicas."""
        row = obj.reply_row
        if row is None or row[5] is not self._token:
            row = self.add(obj)
        return row

    def _fill(self, objs, rows) -> bool:
        for i, row in enumerate(rows):
            if row is None:
                row = rows[i] = self.add(objs[i])
                if row is None:
                    return False
        return True

    def add(self, obj) -> tuple | None:
        """Record and return ``obj``'s row (None, and nothing kept, unless one replica)."""
        replicas = obj.replicas
        if len(replicas) != 1:
            obj.reply_row = None
            return None
        segment, offset = replicas[0]
        row = obj.reply_row = (obj.size_bytes, obj.checksum, obj.codec, segment, offset,
                               self._token)
        return row

    def forget(self) -> None:
        """Make every row stale (recomputed when next read)."""
        self._token = object()


class ReplyEncoder:
    """Builds the replies with node/segment tables and packed arrays, over its caches."""

    def __init__(self, state):
        self.node_refs = NodeRefs(state)
        self.rows = ReplicaRows()
        self.sizes = SizeInterner()
        self._num_to_range_payload: dict[int, bytes] = {}   # see _fill_arrays
        self._segments_to_tables: dict[tuple, bytes] = {}   # see _encoded_tables

    def _segment_tables(self, segments):
        """The reply's (nodes, segments) tables for segments in index order."""
        node_to_index: dict = {}
        node_refs, segment_refs = [], []
        for segment in segments:
            node = segment.node
            index = node_to_index.get(node)
            if index is None:
                index = node_to_index[node] = len(node_refs)
                node_refs.append(self.node_refs.get(node))
            segment_refs.append(pb.SegmentRef(
                node_index=index, segment_id=segment.segment_id, tier=segment.tier,
                shm_name=segment.shm_name, capacity_bytes=segment.capacity_bytes))
        return node_refs, segment_refs

    def _encoded_tables(self, segments) -> bytes:
        """GetReplicasResponse's ``nodes`` and ``segments`` tables for ``segments`` (in index
        order), in wire form.

        NOTE: cached per list of segments: building the NodeRef and SegmentRef messages was
        a third of a one-key GetReplicas, and a node's id and addresses and a segment's
        fields never change (a re-registered node gets new objects). Keyed by the segment
        objects; past ``_MAX_CACHED_TABLES`` lists the cache starts again, so dropped
        segments are let go."""
        key = tuple(segments)
        encoded = self._segments_to_tables.get(key)
        if encoded is None:
            if len(self._segments_to_tables) >= _MAX_CACHED_TABLES:
                self._segments_to_tables.clear()
            nodes, segment_refs = self._segment_tables(key)
            encoded = self._segments_to_tables[key] = pb.GetReplicasResponse(
                nodes=nodes, segments=segment_refs).SerializeToString()
        return encoded

    def put_start(self, statuses, messages, all_picks) -> pb.PutStartResponse:
        """From ``state.put_start``'s result: picks become replica arrays over tables."""
        starts, counts, rep_segments, rep_offsets = [], [], [], []
        segment_to_index: dict = {}
        for picks in all_picks:
            starts.append(len(rep_offsets))
            counts.append(len(picks))
            for segment, offset in picks:
                index = segment_to_index.get(segment)
                if index is None:
                    index = segment_to_index[segment] = len(segment_to_index)
                rep_segments.append(index)
                rep_offsets.append(offset)
        nodes, segments = self._segment_tables(segment_to_index)
        return pb.PutStartResponse(
            statuses=statuses, error_messages=messages, replica_start=starts,
            replica_count=counts, replica_segment=rep_segments, replica_offset=rep_offsets,
            nodes=nodes, segments=segments)

    def get_replicas(self, objs, missing, lease_ttl_s: float, client_host_id: str,
                     ) -> pb.GetReplicasResponse:
        """From ``state.get_replicas``'s result. The common batch (every key found, one
        replica each) transposes the objects' rows in one step instead of a Python loop
        with many appends per key; anything else takes ``_get_replicas_general``. Both
        produce the same reply."""
        columns = None if missing or not objs else self.rows.columns(objs)
        if columns is not None:
            sizes, checksums, codecs, segment_of, offsets = columns
            segments, rep_segments = _segment_column(segment_of)
            num = len(objs)
            return self._replicas_reply(
                [ITEM_OK] * num, sizes, checksums, codecs, range(num), [1] * num,
                rep_segments, offsets, segments, None, lease_ttl_s)
        return self._replicas_reply(*_replica_columns(objs, missing, client_host_id),
                                    lease_ttl_s)

    def get_replicas_wire(self, objs, missing, lease_ttl_s: float, lease_id: int,
                          ) -> bytes | None:
        """``get_replicas``' reply with ``lease_id`` set, in wire form (the fast path's
        ``wire.WireReply``), for the common batch only: every key found, one replica each.
        None for any other batch (build the message with ``get_replicas``).

        NOTE: why: building the message from the columns and serializing it was 6 of a
        one-key GetReplicas' 9.4 us in process; ``encode_get_replicas`` (C++,
        csrc/master/replywire.cpp) writes the same bytes in one pass.

        NOTE: one key is answered by ``_one_wire``: the batch's column steps (a row list,
        a transpose, a token count, the segment column) were most of the 1.8-2.9 us this
        took for one key; it takes 0.66-0.71 us (bench/master_stages.py, load 9)."""
        if len(objs) == 1 and not missing:
            return self._one_wire(objs[0], lease_ttl_s, lease_id)
        columns = None if missing or not objs else self.rows.columns(objs)
        if columns is None:
            return None
        sizes, checksums, codecs, segment_of, offsets = columns
        segments, rep_segments = _segment_column(segment_of)
        return encode_get_replicas(sizes, checksums, codecs, rep_segments, offsets,
                                   self._encoded_tables(segments), lease_ttl_s, lease_id)

    def _one_wire(self, obj, lease_ttl_s: float, lease_id: int) -> bytes | None:
        """``get_replicas_wire`` of one found key: the same bytes and the same hit count
        (None when ``obj`` has two or more replicas)."""
        row = self.rows.row(obj)
        if row is None:
            return None
        size_bytes, checksum, codec, segment, offset, _ = row
        segment.hits += 1
        return encode_get_replicas((size_bytes,), (checksum,), (codec,), (0,), (offset,),
                                   self._encoded_tables((segment,)), lease_ttl_s, lease_id)

    def _replicas_reply(self, statuses, sizes, checksums, codecs, starts, counts,
                        rep_segments, rep_offsets, segments, messages, lease_ttl_s):
        reply = pb.GetReplicasResponse(replica_offset=rep_offsets,
                                       lease_expires_in_s=lease_ttl_s, error_messages=messages)
        _fill_arrays(reply, len(statuses), self._num_to_range_payload, (
            (_STATUSES_TAG, "statuses", statuses), (_SIZES_TAG, "sizes", sizes),
            (_CHECKSUMS_TAG, "checksums", checksums), (_CODECS_TAG, "codecs", codecs),
            (_STARTS_TAG, "replica_start", starts), (_COUNTS_TAG, "replica_count", counts),
            (_SEGMENT_TAG, "replica_segment", rep_segments)), self._encoded_tables(segments))
        return reply

    def match_prefix(self, nodes) -> pb.MatchPrefixResponse:
        """From ``state.match_prefix``'s node of each matched key: indices into a table."""
        node_to_index: dict = {}
        indices = []
        for node in nodes:
            index = node_to_index.get(node)
            if index is None:
                index = node_to_index[node] = len(node_to_index)
            indices.append(index)
        return pb.MatchPrefixResponse(num_matched=len(indices), node_index=indices,
                                      nodes=[self.node_refs.get(n) for n in node_to_index])


def _segment_column(segment_of) -> tuple[list, list[int]]:
    """The distinct segments of a batch's one-replica rows, in first-seen order, and each
    row's index into them; counts each segment's hits (reads served from it).

    NOTE: hits are counted here, per segment of the batch, not per key in
    reads.get_replicas: a per-key increment cost a quarter of a 1,024-key GetReplicas (628k
    vs 400-478k keys/s in-process)."""
    segments = list(dict.fromkeys(segment_of))
    if len(segments) == 1:
        segments[0].hits += len(segment_of)
        return segments, [0] * len(segment_of)
    index = {s: i for i, s in enumerate(segments)}
    for segment, count in Counter(segment_of).items():
        segment.hits += count
    return segments, [index[s] for s in segment_of]


def _replica_columns(objs, missing, client_host_id: str):
    """The reply's columns key by key: any mix of found and missing keys and replicas."""
    statuses, sizes, checksums, codecs = [], [], [], []
    starts, counts, rep_segments, rep_offsets = [], [], [], []
    segment_to_index: dict = {}
    messages = None
    for i, obj in enumerate(objs):
        if obj is not None:
            statuses.append(ITEM_OK)
            sizes.append(obj.size_bytes)
            checksums.append(obj.checksum)
            codecs.append(obj.codec)
            starts.append(len(rep_offsets))
            replicas = obj.replicas
            replicas[0][0].hits += 1    # the read is counted on the first replica's segment
            counts.append(len(replicas))
            if client_host_id and len(replicas) > 1:
                # same-host replicas first: the client can map them (shm)
                replicas = sorted(replicas, key=lambda r: r[0].node.host_id != client_host_id)
            for segment, offset in replicas:
                index = segment_to_index.get(segment)
                if index is None:
                    index = segment_to_index[segment] = len(segment_to_index)
                rep_segments.append(index)
                rep_offsets.append(offset)
            continue
        status, problem = missing[i]
        if problem is not None:
            if messages is None:
                messages = [""] * len(objs)
            messages[i] = problem
        statuses.append(status)
        sizes.append(0)
        checksums.append(0)
        codecs.append(0)
        starts.append(len(rep_offsets))
        counts.append(0)
    return (statuses, sizes, checksums, codecs, starts, counts, rep_segments, rep_offsets,
            list(segment_to_index), messages)


def heartbeat(master_id: str, result, base_seq: int = 0) -> pb.HeartbeatResponse:
    """From ``state.heartbeat``'s result (None: the node is unknown); ``base_seq``: the
    sequence the changes follow (also the body of a commit push, ``commits``)."""
    if result is None:
        return pb.HeartbeatResponse(known=False, master_id=master_id)
    full_resync, seq, added, removed, moves, _ = result
    if added:
        keys, segment_ids, offsets, lengths, checksums, codecs = zip(*added)
        inventory = pb.Inventory(keys=keys, segment_ids=segment_ids, offsets=offsets,
                                 lengths=lengths, checksums=checksums, codecs=codecs)
    else:
        inventory = None
    return pb.HeartbeatResponse(
        known=True, master_id=master_id, seq=seq, full_resync=full_resync, added=inventory,
        removed_keys=removed, base_seq=base_seq,
        moves=[pb.TierMove(move_id=m.move_id, key=m.obj.key, src_segment_id=m.src.segment_id,
                           src_offset=m.src_offset, dst_segment_id=m.dst.segment_id,
                           dst_offset=m.dst_offset, length=m.size_bytes) for m in moves])


def tier_stats(segments) -> list[pb.TierStats]:
    """One TierStats per tier of ``segments`` (SegmentSpace), fastest first: sizes, replicas
    and the hit/demotion/promotion/eviction counters summed over the segments."""
    by_tier: dict = {}
    for s in segments:
        t = by_tier.get(s.tier)
        if t is None:
            t = by_tier[s.tier] = pb.TierStats(tier=s.tier)
        t.capacity_bytes += s.allocator.capacity_bytes
        t.used_bytes += s.allocator.used_bytes
        t.num_objects += s.num_replicas
        t.hits += s.hits
        t.demotions += s.demotions
        t.promotions += s.promotions
        t.evictions += s.evictions
    return [by_tier[tier] for tier in sorted(by_tier)]


def node_infos(nodes, now_s: float, reservations=None) -> list[pb.NodeInfo]:
    """ListNodes' NodeInfo of each node (``reservations``: the state's ReservationBook,
    for each node's reserved bytes)."""
    infos = []
    for node in nodes:
        segments = [pb.SegmentInfo(segment_id=s.segment_id, tier=s.tier,
                                   capacity_bytes=s.capacity_bytes, shm_name=s.shm_name,
                                   path=s.path) for s in node.segments.values()]
        infos.append(pb.NodeInfo(
            node_id=node.node_id, host_id=node.host_id, data_addr=node.data_addr,
            segments=segments,
            used_bytes=sum(s.allocator.used_bytes for s in node.segments.values()),
            num_objects=len(node.keys),
            last_heartbeat_age_s=now_s - node.last_heartbeat_s,
            tiers=tier_stats(node.segments.values()), incarnation=node.incarnation,
            nixl_metadata=node.nixl_metadata,
            reserved_bytes=reservations.reserved_bytes(node) if reservations else 0))
    return infos


def tenant_usages(book, caller) -> list[pb.TenantUsage]:
    """Stats' TenantUsage rows: every tenant for the cluster principal, only its own for a
    tenant, none without tenants (``book`` None)."""
    if book is None:
        return []
    usages = (book.usages.values() if caller.tenant is None
              else (book.usages[caller.tenant.name],))
    rows = []
    for usage in usages:
        tenant = usage.tenant
        quotas = tenant.tier_to_quota_bytes
        tiers = [pb.TenantTier(tier=tier, used_bytes=used, has_quota=tier in quotas,
                               quota_bytes=quotas.get(tier, 0))
                 for tier, used in sorted(usage.tier_to_used_bytes.items())
                 if used or tier in quotas]
        rows.append(pb.TenantUsage(name=tenant.name, namespace=tenant.namespace,
                                   num_objects=usage.num_objects, tiers=tiers,
                                   num_refused=usage.num_refused))
    return rows
