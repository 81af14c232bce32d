"""``MasterConfig``: every setting of the master process, one field per CLI flag."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore._advertise import check_advertise_host
from kvstore._errors import ConfigError
from kvstore._tls import TLSConfig

#: Longest key the master accepts, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: Every allocation is rounded up to and aligned on this many bytes.
ALIGNMENT_BYTES = 64
GRPC_MODES = ("threads", "aio")


def promote_after(policy: str) -> int:
    """``--promote`` as the read count that promotes: "off" 0, "on-hit" 1, "after:N" N.
    Raises ConfigError for anything else."""
    if policy == "off":
        return 0
    if policy == "on-hit":
        return 1
    head, sep, count = policy.partition(":")
    if head == "after" and sep and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ConfigError(f"promote must be off, on-hit or after:N (N >= 1), got {policy!r}")


@dataclass(frozen=True, slots=True)
class MasterConfig:
    """Settings of one master. Frozen; validated on construction (raises ``ConfigError``).

    Fields map 1:1 to ``kvstore master`` flags (``lease_ttl_s`` is ``--lease-ttl``, ...).
    Durations are seconds, ratios are fractions of a tier's capacity.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    advertise_host: str | None = None    # host published in etcd; None: ``_advertise`` rule
    token: str | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None      # bind address of the metrics port; None: ``host``
    lease_ttl_s: float = 10.0            # default read lease granted by get_replicas
    node_ttl_s: float = 10.0             # a node silent this long is dropped
    heartbeat_interval_s: float = 1.0    # what daemons are told to heartbeat at
    pending_timeout_s: float = 30.0      # a PENDING object older than this is reclaimed
    high_watermark: float = 0.95         # eviction starts above this fraction of a tier
    low_watermark: float = 0.85          # ... and stops at this fraction
    max_batch: int = 65536               # most keys in one request
    max_changes_per_heartbeat: int = 262144  # most changes one heartbeat reply carries
    grpc_mode: str = "aio"               # "aio" (grpc.aio) or "threads" (gRPC thread pool)
    num_threads: int = 8                 # worker threads in "threads" mode
    fast_port: int | None = 0            # framed-TCP metadata path (0: pick); None: off
    move_timeout_s: float = 30.0         # a tier move not acknowledged by then is given up
    promote: str = "on-hit"              # SSD -> DRAM promotion: off | on-hit | after:N
    commit_timeout_s: float = 2.0        # a put/remove waits this long for daemons' acks; 0: no wait
    client_commit: bool = True           # let writers commit to their replicas' daemons themselves
    # longest a Reserve grant lives (its write capability too); 0: Reserve grants nothing
    reservation_ttl_s: float = 10.0
    etcd: str | None = None              # http://HOST:PORT of etcd: elect a leader (HA)
    cluster: str | None = None           # the cluster's name in etcd (with ``etcd``)
    election_ttl_s: int = 3              # TTL of the leader's etcd lease, whole seconds
    takeover_wait_s: float = 3.0         # a new leader waits this long at most for daemons
    tls_cert: str | None = None          # PEM chain: serve TLS on both ports (with tls_key)
    tls_key: str | None = None
    tls_ca: str | None = None            # PEM CA: require client certificates (mutual TLS)
    tls_daemon_ca: str | None = None     # PEM CA verifying daemons (commit pushes); None: tls_ca
    # ``--tenants FILE`` as loaded by ``tenants.load_tenants``; (): no tenants
    tenants: tuple = ()

    @property
    def tls(self) -> TLSConfig | None:
        """The TLS files as one ``TLSConfig`` (None: plain text)."""
        return TLSConfig.from_files(self.tls_ca, self.tls_cert, self.tls_key)

    @property
    def daemon_tls(self) -> TLSConfig | None:
        """How the master calls the daemons' data planes (commit pushes): with its own
        certificate, verifying theirs with ``tls_daemon_ca``, else ``tls_ca``, else the
        system's trust store. None: plain text (the master serves no TLS)."""
        if self.tls is None:
            return None
        return TLSConfig(ca=self.tls_daemon_ca or self.tls_ca, cert=self.tls_cert,
                         key=self.tls_key)

    @property
    def promote_after(self) -> int:
        """Reads from SSD that promote an object (0: never); see ``promote_after``."""
        return promote_after(self.promote)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty")
        check_advertise_host(self.advertise_host)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_host is not None and not self.metrics_host:
            raise ConfigError("metrics host must not be empty (omit it to use the host)")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics port must be in 0..65535, got {self.metrics_port}")
        if self.fast_port is not None and not 0 <= self.fast_port <= 65535:
            raise ConfigError(f"fast port must be in 0..65535, got {self.fast_port}")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ConfigError("token must be non-empty and contain no whitespace")
        promote_after(self.promote)
        tls = self.tls      # ConfigError for a cert without its key, a missing file
        if tls is not None:
            tls.server_context()   # ... and now for files that are not PEM
        if self.tenants and self.token is None:
            raise ConfigError("tenants need a cluster token (--token or KVSTORE_TOKEN): the "
                              "daemons and operators authenticate with it, tenants with theirs")
        if any(tenant.token == self.token for tenant in self.tenants):
            raise ConfigError("a tenant's token must differ from the cluster token (--token)")
        for name in ("lease_ttl_s", "node_ttl_s", "heartbeat_interval_s", "pending_timeout_s",
                     "move_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.reservation_ttl_s >= 0:
            raise ConfigError(f"reservation_ttl_s must be >= 0, got {self.reservation_ttl_s}")
        if not self.commit_timeout_s >= 0:
            raise ConfigError(f"commit_timeout_s must be >= 0, got {self.commit_timeout_s}")
        if self.heartbeat_interval_s >= self.node_ttl_s:
            raise ConfigError(f"heartbeat interval ({self.heartbeat_interval_s}s) must be "
                              f"shorter than the node TTL ({self.node_ttl_s}s)")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError("watermarks must satisfy 0 < low <= high <= 1, got "
                              f"low={self.low_watermark} high={self.high_watermark}")
        if not 1 <= self.max_batch <= 1 << 24:
            raise ConfigError(f"max batch must be in 1..{1 << 24}, got {self.max_batch}")
        if self.max_changes_per_heartbeat < 1:
            raise ConfigError("max changes per heartbeat must be >= 1")
        if self.grpc_mode not in GRPC_MODES:
            raise ConfigError(f"grpc mode must be one of {GRPC_MODES}, got {self.grpc_mode!r}")
        if not 1 <= self.num_threads <= 256:
            raise ConfigError(f"num threads must be in 1..256, got {self.num_threads}")
        if (self.etcd is None) != (self.cluster is None):
            raise ConfigError("--etcd and --cluster go together (HA: both; one master: neither)")
        if self.etcd is not None:
            from kvstore.ha.cluster import check_cluster
            from kvstore.ha.etcd import check_url
            check_url(self.etcd)
            check_cluster(self.cluster)
        if not 2 <= self.election_ttl_s <= 60:
            raise ConfigError(f"election TTL must be 2..60 s, got {self.election_ttl_s}")
        if not 0 <= self.takeover_wait_s <= 600:
            raise ConfigError(f"takeover wait must be 0..600 s, got {self.takeover_wait_s}")
