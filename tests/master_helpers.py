"""Helpers for the master tests: a daemon's and a client's side of the master API, spoken
through the real MasterClient (no mocks of the master)."""

from __future__ import annotations

import contextlib

import pytest

from kvstore.master.clock import ManualClock
from kvstore.master.config import MasterConfig
from raw_master import RawMaster
from kvstore.master.server import run_in_thread
from kvstore.v1 import master_pb2 as pb

MiB = 1 << 20


@contextlib.contextmanager
def master_process():
    """A real ``kvstore master`` on 127.0.0.1: (its ServerProcess, its fast-path port)."""
    from servers import ServerProcess

    with ServerProcess(["master", "--host", "127.0.0.1", "--port", "0"]) as server:
        with RawMaster.over_grpc(server.address) as client:
            fast_port = client.call("Stats", pb.StatsRequest()).fast_port
        yield server, fast_port


def raw_client(master, carrier: str) -> RawMaster:
    """A RawMaster to ``master`` (``master_process``'s pair) over "grpc" or "fast"."""
    server, fast_port = master
    if carrier == "grpc":
        return RawMaster.over_grpc(server.address)
    return RawMaster.over_fast("127.0.0.1", fast_port)


def node_info(node_id: str, *, host_id: str = "host-a", segments=None,
              **fields) -> pb.NodeInfo:
    """A NodeInfo; ``segments``: list of (segment_id, tier, capacity_bytes); ``fields``:
    other NodeInfo fields (incarnation, registration_token, ...)."""
    segments = segments or [("dram0", pb.TIER_DRAM, 4 * MiB)]
    return pb.NodeInfo(node_id=node_id, host_id=host_id, data_addr="127.0.0.1:7000",
                       segments=[pb.SegmentInfo(segment_id=s, tier=t, capacity_bytes=c,
                                                shm_name=f"/kv-{node_id}-{s}")
                                 for s, t, c in segments], **fields)


def register(client: RawMaster, node_id: str, **kwargs) -> pb.RegisterNodeResponse:
    inventory = kwargs.pop("inventory", None)
    return client.call("RegisterNode", pb.RegisterNodeRequest(node=node_info(node_id, **kwargs),
                                                              inventory=inventory))


def put(client: RawMaster, keys, sizes=None, *, client_id="w1", end=True, **hints):
    """put_start (and put_end unless ``end`` is False); returns the PutStartResponse."""
    sizes = sizes or [1000] * len(keys)
    reply = client.call("PutStart", pb.PutStartRequest(keys=keys, sizes=sizes,
                                                       client_id=client_id, **hints))
    if end:
        ok = [k for k, s in zip(keys, reply.statuses) if s == pb.ITEM_OK]
        if ok:
            client.call("PutEnd", pb.PutEndRequest(keys=ok, client_id=client_id))
    return reply


def get(client: RawMaster, keys, **kwargs) -> pb.GetReplicasResponse:
    return client.call("GetReplicas", pb.GetReplicasRequest(keys=keys, **kwargs))


def exists(client: RawMaster, keys) -> list[bool]:
    return list(client.call("Exists", pb.ExistsRequest(keys=keys)).exists)


def replicas_of(reply, i: int) -> list[tuple[str, str, int]]:
    """(node_id, segment_id, offset) of key i's replicas in a PutStart/GetReplicas reply."""
    out = []
    for j in range(reply.replica_start[i], reply.replica_start[i] + reply.replica_count[i]):
        segment = reply.segments[reply.replica_segment[j]]
        out.append((reply.nodes[segment.node_index].node_id, segment.segment_id,
                    reply.replica_offset[j]))
    return out


class Embedded:
    """A master on a ManualClock in this process, plus a client of it."""

    def __init__(self, **config):
        self.clock = ManualClock()
        config.setdefault("port", 0)
        self.master = run_in_thread(MasterConfig(**config), clock=self.clock)
        self.client = RawMaster.over_grpc(self.master.address)

    @property
    def state(self):
        return self.master.state

    def heartbeat(self, node_id: str, acked_seq: int = 0) -> pb.HeartbeatResponse:
        return self.client.call("Heartbeat", pb.HeartbeatRequest(node_id=node_id,
                                                                 acked_seq=acked_seq))

    def tick(self, seconds: float, *alive_node_ids: str) -> None:
        """Advance the clock by ``seconds``, heartbeating ``alive_node_ids`` every second so
        they stay alive."""
        while seconds > 0:
            step = min(seconds, 1.0)
            self.clock.advance(step)
            seconds -= step
            for node_id in alive_node_ids:
                self.heartbeat(node_id)

    def close(self) -> None:
        self.client.close()
        self.master.stop()


@pytest.fixture
def embedded():
    """Factory: ``embedded(**MasterConfig fields)``; everything made is closed at teardown."""
    made: list[Embedded] = []

    def make(**config) -> Embedded:
        made.append(Embedded(**config))
        return made[-1]
    yield make
    for item in made:
        item.close()
