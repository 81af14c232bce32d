"""The fence of a master of an etcd cluster (kvstore/ha/leadership.py), driven by an injected
clock: which calls run in each role, when the lease's trust ends, takeover's bounded wait."""

from __future__ import annotations

import grpc
import pytest

from kvstore.ha.leadership import Leadership, Role
from kvstore.master.validation import Rejected


class Clock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def _refusal(leadership: Leadership, name: str, epoch: int = 0, nodes=()) -> str:
    with pytest.raises(Rejected) as info:
        leadership.check(name, epoch, nodes)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.message.startswith("NOT_SERVING")
    return info.value.message


def test_standby_refuses_every_call():
    leadership = Leadership("c", takeover_wait_s=3, clock=Clock())
    for name in ("PutStart", "GetReplicas", "Heartbeat", "Stats"):
        assert "standby of cluster c" in _refusal(leadership, name)


def test_takeover_serves_daemons_until_every_listed_node_is_back():
    clock = Clock()
    leadership = Leadership("c", takeover_wait_s=3, clock=clock)
    leadership.elect(epoch=7, lease_valid_until_s=clock.now_s + 2.7, expected_nodes=["a", "b"])
    assert leadership.role is Role.TAKING_OVER
    leadership.check("RegisterNode", 0, [])
    leadership.check("Heartbeat", 0, ["a"])
    assert "1 of 2 daemons" in _refusal(leadership, "GetReplicas", nodes=["a"])
    leadership.check("GetReplicas", 0, ["a", "b"])      # both back: leading
    assert leadership.role is Role.LEADING


def test_takeover_wait_is_bounded():
    clock = Clock()
    leadership = Leadership("c", takeover_wait_s=3, clock=clock)
    leadership.elect(epoch=7, lease_valid_until_s=clock.now_s + 10, expected_nodes=["gone"])
    _refusal(leadership, "PutStart")
    clock.now_s += 3.0
    leadership.check("PutStart", 0, [])                  # the dead node no longer blocks
    assert leadership.role is Role.LEADING


def test_leader_refuses_at_once_when_its_lease_trust_ends():
    clock = Clock()
    leadership = Leadership("c", takeover_wait_s=0, clock=clock)
    leadership.elect(epoch=7, lease_valid_until_s=clock.now_s + 2.7, expected_nodes=[])
    leadership.check("PutStart", 0, [])
    clock.now_s += 2.0
    leadership.renewed(clock.now_s - 0.5 + 2.7)          # a renewal sent 0.5 s ago
    clock.now_s += 2.1
    leadership.check("PutStart", 7, [])
    clock.now_s += 0.2                                   # past the renewal's trust
    assert "stepped down" in _refusal(leadership, "PutStart", 7)
    assert leadership.role is Role.DEPOSED
    leadership.renewed(clock.now_s + 10)                 # a late renewal changes nothing
    assert "stepped down" in _refusal(leadership, "Stats")


def test_a_newer_epoch_deposes():
    clock = Clock()
    leadership = Leadership("c", takeover_wait_s=0, clock=clock)
    leadership.elect(epoch=7, lease_valid_until_s=clock.now_s + 2.7, expected_nodes=[])
    leadership.check("Exists", 7, [])
    assert "epoch 8" in _refusal(leadership, "Exists", 8)
    assert leadership.role is Role.DEPOSED and not leadership.serving()
