"""Model-free property test of MasterState (the real master core, in process): random
sequences of puts, ends, revokes, gets (leases), removes, pins, clock steps and node deaths
never break the space invariants."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from kvstore.master.allocator import aligned_size
from kvstore.master.config import MasterConfig
from kvstore.master.replies import _replica_columns
from kvstore.master.service import MasterService
from kvstore.master.state import MasterState
from kvstore.v1 import master_pb2 as pb

KEYS = [f"k{i}" for i in range(12)]


def _node(node_id: str) -> pb.NodeInfo:
    return pb.NodeInfo(node_id=node_id, host_id=node_id, data_addr="127.0.0.1:1", segments=[
        pb.SegmentInfo(segment_id="hbm", tier=pb.TIER_HBM, capacity_bytes=4096),
        pb.SegmentInfo(segment_id="dram", tier=pb.TIER_DRAM, capacity_bytes=8192)])


def _check(state: MasterState) -> None:
    assert not set(state.objects) & set(state.pending)
    ranges: dict = {}
    for table in (state.objects, state.pending):
        for key, obj in table.items():
            nodes = [seg.node for seg, _ in obj.replicas]
            assert len(nodes) == len(set(nodes)), "replicas must be on distinct nodes"
            assert obj.replicas, "an object without replicas must be gone"
            for seg, offset in obj.replicas:
                assert seg.alive and key in seg.node.keys
                ranges.setdefault(seg, []).append((offset, aligned_size(obj.size_bytes)))
    # ranges freed once a lease ends, and tier moves' destinations, hold space too
    for _, _, obj in state._deferred:
        for seg, offset in obj.deferred or ():
            if seg.alive:
                ranges.setdefault(seg, []).append((offset, aligned_size(obj.size_bytes)))
    for move in state.moves.values():
        if move.dst.alive:
            ranges.setdefault(move.dst, []).append((move.dst_offset,
                                                    aligned_size(move.size_bytes)))
    for node in state.nodes.values():
        for seg in node.segments.values():
            spans = sorted(ranges.get(seg, []) + seg.allocator.free_extents())
            for (o1, l1), (o2, _) in zip(spans, spans[1:]):
                assert o1 + l1 <= o2, "a live range overlaps another or free space"
            assert sum(l for _, l in ranges.get(seg, [])) == seg.allocator.used_bytes


ops = st.one_of(
    st.tuples(st.just("put"), st.lists(st.sampled_from(KEYS), min_size=1, max_size=4),
              st.integers(1, 3000), st.integers(1, 3), st.sampled_from([0, 1, 2, 3])),
    st.tuples(st.just("end"), st.lists(st.sampled_from(KEYS), max_size=4)),
    st.tuples(st.just("revoke"), st.lists(st.sampled_from(KEYS), max_size=4)),
    st.tuples(st.just("get"), st.lists(st.sampled_from(KEYS), max_size=4), st.floats(0.1, 5)),
    st.tuples(st.just("remove"), st.lists(st.sampled_from(KEYS), max_size=4), st.booleans()),
    st.tuples(st.just("pin"), st.lists(st.sampled_from(KEYS), max_size=3), st.booleans()),
    st.tuples(st.just("tick"), st.floats(0.1, 4)),
    st.tuples(st.just("kill"), st.sampled_from(["a", "b", "c"])),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(ops, max_size=40))
def test_random_operations_keep_space_consistent(steps):
    config = MasterConfig(node_ttl_s=3.0, heartbeat_interval_s=1.0, pending_timeout_s=6.0,
                          high_watermark=0.9, low_watermark=0.6)
    now = 100.0
    state = MasterState(config, now)
    service = MasterService(state)     # put_end and get go through it: its reply-row cache
    for node_id in ("a", "b", "c"):
        state.register_node(_node(node_id), pb.Inventory(), now)
    dead: set[str] = set()
    for step in steps:
        kind = step[0]
        if kind == "put":
            _, keys, size, replicas, tier = step
            statuses, _, picks = state.put_start(keys, [size] * len(keys), replicas, tier, "",
                                                 "w", 0.0, False, 0, now)
            for status, pick in zip(statuses, picks):
                assert (status == pb.ITEM_OK) == bool(pick)
        elif kind == "end":
            service.PutEnd(pb.PutEndRequest(keys=step[1], client_id="w"), now)
        elif kind == "revoke":
            state.put_revoke(step[1], "w")
        elif kind == "get":
            objs, missing, _ = state.get_replicas(step[1], step[2], now)
            reply = service.replies.get_replicas(objs, missing, step[2], "")
            for key, status in zip(step[1], reply.statuses):
                assert (status == pb.ITEM_OK) == (key in state.objects)
            # the batch path (cached rows) must answer what the key-by-key path does
            assert reply == service.replies._replicas_reply(
                *_replica_columns(objs, missing, ""), step[2]), "stale reply row"
        elif kind == "remove":
            state.remove(step[1], step[2], now)
        elif kind == "pin":
            state.pin(step[1], 2.0, step[2], now)
        elif kind == "tick":
            now += step[1]
            for node_id in state.nodes:
                if node_id not in dead:
                    state.heartbeat(node_id, 0, now)
        elif kind == "kill":
            dead.add(step[1])
        state.maybe_sweep(now)
        _check(state)
    # everything let go: all space comes back once leases and pending writers are done
    now += 1000
    for node_id in list(state.nodes):
        state.heartbeat(node_id, 0, now)
    state.remove(list(state.objects), True, now)
    state.sweep(now)
    _check(state)
    assert not state.objects and not state.pending
    for node in state.nodes.values():
        for seg in node.segments.values():
            assert seg.allocator.used_bytes == 0
