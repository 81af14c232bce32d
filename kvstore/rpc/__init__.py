"""The client side of the metadata protocol: one typed API over the master.

Layers, top down: ``client.MasterClient`` (typed verbs, one result per key, and the call
policy: deadline, retries of idempotent calls, the token) over a ``carrier.Carrier``, of
which there are two, ``grpc_carrier.GrpcCarrier`` (the public gRPC API) and
``fast_carrier.FastCarrier`` (the same messages over framed TCP, ``fast_frames``).
``connect.connect_master`` picks the carrier. ``messages`` turns protobuf into the values of
``results`` and back; ``errors`` maps every failure into kvstore's error tree; ``methods``
lists the RPCs and which may be retried. Nothing above this package sees a protobuf message.
"""

from __future__ import annotations

from kvstore.rpc.client import MasterClient
from kvstore.rpc.connect import METADATA_PATHS, connect_master, grpc_client
from kvstore.rpc.grpc_carrier import GrpcCarrier
from kvstore.rpc.results import (
    HeartbeatChanges, HomeNode, HomeNodes, Inventory, MasterStats, NodeSpec, NodeStatus,
    Registration, ReplicaSet, SegmentSpec, TierMove, TierUsage,
)

__all__ = ["GrpcCarrier", "HeartbeatChanges", "HomeNode", "HomeNodes", "Inventory", "METADATA_PATHS", "MasterClient",
           "MasterStats", "NodeSpec", "NodeStatus", "Registration", "ReplicaSet", "SegmentSpec",
           "TierMove", "TierUsage", "connect_master", "grpc_client"]

