"""GetReplicas replies built from the encoder's caches (``kvstore.master.replies``: the tables
kept in wire form per segment list, small batches filled element by element) against a real
``kvstore master`` over both carriers: each key names the node and segment it was put on,
for batches on either side of the packed threshold, and a node that registers again under
the same id with other addresses is named with the new ones."""

from __future__ import annotations

import pytest

from kvstore.v1 import master_pb2 as pb
from master_helpers import (MiB, get, master_process, node_info, put, raw_client,
                            replicas_of)
from raw_master import RawMaster


@pytest.fixture(scope="module")
def master():
    with master_process() as started:
        yield started


def _register(client: RawMaster, node_id: str, data_addr: str, shm_prefix: str) -> None:
    info = node_info(node_id, segments=[("dram0", pb.TIER_DRAM, 4 * MiB),
                                        ("ssd0", pb.TIER_SSD, 4 * MiB)])
    info.data_addr = data_addr
    for segment in info.segments:
        segment.shm_name = f"/{shm_prefix}-{segment.segment_id}"
    client.call("RegisterNode", pb.RegisterNodeRequest(node=info))


@pytest.mark.parametrize("carrier", ["grpc", "fast"])
@pytest.mark.parametrize("batch", [1, 15, 16, 40])
def test_each_key_names_its_node_and_segment(master, carrier, batch):
    tag = f"rt-{carrier}-{batch}"
    with raw_client(master, carrier) as client:
        _register(client, f"{tag}-a", "127.0.0.1:7101", f"{tag}-a")
        _register(client, f"{tag}-b", "127.0.0.1:7102", f"{tag}-b")
        keys_a = [f"{tag}/a{i}" for i in range(batch)]
        keys_b = [f"{tag}/b{i}" for i in range(batch)]
        put(client, keys_a, near_node_id=f"{tag}-a")
        put(client, keys_b, near_node_id=f"{tag}-b", preferred_tier=pb.TIER_SSD)
        for keys in (keys_a, keys_b, keys_a[:batch // 2 + 1] + keys_b[:batch // 2 + 1]):
            reply = get(client, keys)
            assert list(reply.statuses) == [pb.ITEM_OK] * len(keys)
            assert list(reply.sizes) == [1000] * len(keys)
            for i, key in enumerate(keys):
                (node_id, segment_id, _), = replicas_of(reply, i)
                side = key.rsplit("/", 1)[1][0]
                assert node_id == f"{tag}-{side}"
                assert segment_id == ("dram0" if side == "a" else "ssd0")
                segment = reply.segments[reply.replica_segment[reply.replica_start[i]]]
                assert segment.shm_name == f"/{tag}-{side}-{segment_id}"
                assert reply.nodes[segment.node_index].data_addr == \
                    f"127.0.0.1:710{1 if side == 'a' else 2}"
        one_by_one = [replicas_of(get(client, [k]), 0) for k in keys_a + keys_b]
        both = get(client, keys_a + keys_b)
        assert one_by_one == [replicas_of(both, i) for i in range(2 * batch)]


@pytest.mark.parametrize("carrier", ["grpc", "fast"])
def test_a_node_registered_again_is_named_with_its_new_addresses(master, carrier):
    tag = f"rt-again-{carrier}"
    with raw_client(master, carrier) as client:
        _register(client, tag, "127.0.0.1:7201", f"{tag}-old")
        put(client, [f"{tag}/k0"], near_node_id=tag)
        assert get(client, [f"{tag}/k0"]).nodes[0].data_addr == "127.0.0.1:7201"
        client.call("UnregisterNode", pb.UnregisterNodeRequest(node_id=tag))
        _register(client, tag, "127.0.0.1:7202", f"{tag}-new")
        put(client, [f"{tag}/k1"], near_node_id=tag)
        reply = get(client, [f"{tag}/k0", f"{tag}/k1"])
        assert list(reply.statuses) == [pb.ITEM_NOT_FOUND, pb.ITEM_OK]
        assert [n.data_addr for n in reply.nodes] == ["127.0.0.1:7202"]
        assert [s.shm_name for s in reply.segments] == [f"/{tag}-new-dram0"]
