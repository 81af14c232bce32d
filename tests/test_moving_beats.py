"""The daemon's heartbeat pace while tier moves flow (``MasterLink.next_beat_wait_s``), with
a real master and an injected clock: short beats for MOVING_GRACE_S after the last beat that
carried moves, even when the very next beat carries none (the tier was just relieved), then
the master's interval again."""

from __future__ import annotations

from servers import ServerProcess

from kvstore.daemon.backends import ShmBackend
from kvstore.daemon.master_link import MOVING_BEAT_S, MOVING_GRACE_S, MasterLink
from kvstore.daemon.objects import ObjectTable
from kvstore.rpc import grpc_client
from kvstore.rpc.results import NodeSpec, SegmentSpec
from kvstore.tiers import Tier


def test_short_beats_last_the_grace_after_moves_then_the_interval_returns():
    now = [1000.0]
    with ServerProcess(["master", "--port", "0", "--heartbeat-interval", "1s"]) as master:
        dram = ShmBackend("beats-dram", 4 << 20, name_prefix="kvstore-test-beats")
        client = grpc_client(master.address)
        try:
            node = NodeSpec(node_id="beats-node", host_id="beats-host",
                            data_addr="127.0.0.1:1",
                            segments=[SegmentSpec("beats-dram", Tier.DRAM, dram.size_bytes,
                                                  dram.shm_name)])
            link = MasterLink(client, node, ObjectTable([dram]), clock=lambda: now[0],
                              segments={"beats-dram": dram})
            link.register(timeout_s=10)
            assert link.next_beat_wait_s() == link.heartbeat_interval_s == 1.0
            link.heartbeat_once()                        # nothing moved: the interval
            assert link.next_beat_wait_s() == 1.0
            link.moves.restore([424242], [])             # a move acknowledged by this beat
            link.heartbeat_once()
            assert link.next_beat_wait_s() == MOVING_BEAT_S
            now[0] += MOVING_GRACE_S / 2
            link.heartbeat_once()                        # no moves in this one: still short
            assert link.next_beat_wait_s() == MOVING_BEAT_S
            now[0] += MOVING_GRACE_S / 2
            assert link.next_beat_wait_s() == 1.0        # the grace is over
            link.moves.stop()
        finally:
            client.close()
            dram.close()
