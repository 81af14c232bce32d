"""Where a cluster lives in etcd, and how a master address is written.

Keys of cluster NAME (all under ``/kvstore/NAME/``):
- ``leader``: JSON ``{"master_id", "grpc", "fast"}`` of the leader, attached to its etcd
  lease (gone within the lease TTL of the leader's death). Its ``create_revision`` is the
  leader's epoch: etcd revisions only grow, so a later election always has a larger epoch.
- ``members/MASTER_ID``: the same JSON for every master of the cluster, leader or standby,
  attached to that master's lease (``kvstore status`` lists the standbys from it).
- ``nodes``: JSON list of the daemons' node ids the leader knows (written by the leader when
  it changes, no lease): what a new leader waits for before it serves (see ``leadership``).

A master address, wherever kvstore takes one (``MasterSpec.parse``): ``HOST:PORT`` (one
master), ``HOST:PORT,HOST:PORT,...`` (masters without etcd: the first that serves is used),
or ``etcd://HOST:PORT/NAME`` (the leader of cluster NAME, found and followed through etcd).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from kvstore._errors import ConfigError, MasterUnavailableError
from kvstore.ha.etcd import EtcdClient, EtcdUnavailableError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: How often a leader lookup asks etcd again while no (newer) leader is there.
POLL_S = 0.1


def check_cluster(name: str) -> str:
    """``name`` if it is a valid cluster name (letters, digits, ``._-``, at most 128);
    ConfigError otherwise."""
    if not _NAME.match(name or ""):
        raise ConfigError(f"cluster name must be 1-128 of [A-Za-z0-9._-], got {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    """The etcd keys of one cluster (see the module docstring)."""

    cluster: str

    @property
    def prefix(self) -> bytes:
        return f"/kvstore/{self.cluster}/".encode()

    @property
    def leader(self) -> bytes:
        return self.prefix + b"leader"

    @property
    def members(self) -> bytes:
        return self.prefix + b"members/"

    def member(self, master_id: str) -> bytes:
        return self.members + master_id.encode()

    @property
    def nodes(self) -> bytes:
        return self.prefix + b"nodes"


@dataclass(frozen=True, slots=True)
class MasterInfo:
    """One master as published in etcd. ``epoch`` is 0 for a standby."""

    master_id: str
    grpc_address: str
    fast_address: str | None
    epoch: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"master_id": self.master_id, "grpc": self.grpc_address,
                           "fast": self.fast_address}).encode()

    @classmethod
    def from_json(cls, data: bytes, epoch: int = 0) -> "MasterInfo":
        try:
            fields = json.loads(data)
            return cls(str(fields["master_id"]), str(fields["grpc"]),
                       fields.get("fast") or None, epoch)
        except (ValueError, KeyError, TypeError) as exc:
            raise MasterUnavailableError(f"malformed master entry in etcd: {data[:100]!r}") from exc


def read_leader(etcd: EtcdClient, keys: ClusterKeys) -> MasterInfo | None:
    """The cluster's leader now (its epoch set), or None. Raises EtcdUnavailableError."""
    kv = etcd.get(keys.leader)
    return None if kv is None else MasterInfo.from_json(kv.value, kv.create_revision)


def read_members(etcd: EtcdClient, keys: ClusterKeys) -> list[MasterInfo]:
    """Every master of the cluster that holds a lease (leader and standbys)."""
    return [MasterInfo.from_json(kv.value) for kv in etcd.get_prefix(keys.members)]


@dataclass(frozen=True, slots=True)
class MasterSpec:
    """A parsed master address: ``addresses`` (plain) or ``etcd_url`` + ``cluster``."""

    addresses: tuple[str, ...] = ()
    etcd_url: str | None = None
    cluster: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "MasterSpec":
        """Raises ConfigError for anything but the three forms of the module docstring."""
        if spec.startswith("etcd://"):
            host_port, sep, cluster = spec[len("etcd://"):].partition("/")
            if not sep or ":" not in host_port:
                raise ConfigError(f"master address must be etcd://HOST:PORT/CLUSTER, got {spec!r}")
            return cls(etcd_url=f"http://{host_port}", cluster=check_cluster(cluster))
        addresses = tuple(part.strip() for part in spec.split(","))
        for address in addresses:
            if ":" not in address or address.startswith(":") or address.endswith(":"):
                raise ConfigError(f"master address must be HOST:PORT, HOST:PORT,... or "
                                  f"etcd://HOST:PORT/CLUSTER, got {spec!r}")
        return cls(addresses=addresses)

    @property
    def is_etcd(self) -> bool:
        return self.etcd_url is not None

    def describe(self) -> str:
        if self.is_etcd:
            return f"the leader of cluster {self.cluster!r} in etcd at {self.etcd_url}"
        return "master " + ",".join(self.addresses)


def wait_for_leader(etcd: EtcdClient, keys: ClusterKeys, *, min_epoch: int, timeout_s: float,
                    clock=time.monotonic, sleep=time.sleep) -> MasterInfo:
    """The leader of epoch ``min_epoch`` or later, asking etcd every ``POLL_S`` for at most
    ``timeout_s``. Raises MasterUnavailableError naming the etcd URL and the cluster: etcd
    did not answer, or no such leader appeared in time."""
    end_s = clock() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            leader = read_leader(etcd, keys)
            last_error = None
            if leader is not None and leader.epoch >= min_epoch:
                return leader
        except EtcdUnavailableError as exc:
            last_error = exc
        if clock() + POLL_S > end_s:
            break
        sleep(POLL_S)
    if last_error is not None:
        raise MasterUnavailableError(f"cluster {keys.cluster!r}: {last_error}") from last_error
    what = "no leader" if min_epoch <= 1 else f"no leader of epoch >= {min_epoch}"
    raise MasterUnavailableError(
        f"cluster {keys.cluster!r} has {what} in etcd at {etcd.url} (key "
        f"{keys.leader.decode()}, waited {timeout_s:.1f}s): is a `kvstore master --etcd "
        f"{etcd.url} --cluster {keys.cluster}` running?")
