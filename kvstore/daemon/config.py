"""The storage daemon's configuration: one frozen dataclass, validated on construction.

CLI flags of ``kvstore daemon`` map 1:1 to fields (``--dram 4GiB`` -> ``dram_bytes``,
``--ssd DIR:SIZE`` -> ``ssd_dir`` + ``ssd_bytes``, ``--gpu DEVICE:SIZE`` -> ``gpu_device`` +
``gpu_bytes``). Every invalid value raises ``kvstore.ConfigError`` naming the field.
"""

from __future__ import annotations

import re
import secrets
import socket
from dataclasses import dataclass, field

from kvstore._advertise import check_advertise_host
from kvstore._errors import ConfigError
from kvstore._tls import TLSConfig
from kvstore._units import parse_size
from kvstore._wire import MAX_TOKEN_BYTES

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def generate_node_id() -> str:
    """``{hostname}-{8 hex}``: readable in ListNodes, unique across restarts."""
    hostname = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:48] or "node"
    return f"{hostname}-{secrets.token_hex(4)}"


def split_tier_spec(text: str, flag: str) -> tuple[str, int]:
    """``WHERE:SIZE`` (``/data/kv:100GiB``, ``cuda:0:8GiB``) -> (WHERE, bytes).

    The size is after the last colon, so device names with colons work. ConfigError otherwise.
    """
    where, sep, size_text = text.rpartition(":")
    if not sep or not where:
        raise ConfigError(f"{flag} expects WHERE:SIZE (e.g. /data/kv:100GiB), got {text!r}")
    return where, parse_size(size_text)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything one storage daemon needs.

    ``master_addr`` None runs the data plane without a master (benchmarks, the standalone
    ``--standalone`` mode): nothing registers and the daemon holds no object table.
    ``register_timeout_s`` None retries registration for ever (the CLI default: a daemon
    started before its master waits for it); embedded use passes a bound.
    """

    master_addr: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None  # host in the data_addr it registers; None: ``_advertise``
    dram_bytes: int = 1024**3
    ssd_dir: str | None = None
    ssd_bytes: int = 0
    ssd_codec: str = "none"     # "lz4": compress SSD frames (kvstore.daemon.ssd)
    gpu_device: str | None = None
    gpu_bytes: int = 0
    token: str | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None  # bind address of the metrics port; None: ``host``
    node_id: str = field(default_factory=generate_node_id)
    rpc_timeout_s: float = 5.0
    register_timeout_s: float | None = None
    max_connections: int = 1024
    handshake_timeout_s: float = 10.0
    reap_orphans: bool = True
    prefault: bool = True       # allocate and map every DRAM page at start (see kvstore/_posix_shm.py)
    write_capabilities: bool = True  # ask the master for a secret; refuse WRITEs without capability
    # with write_capabilities: ask for read capabilities too; refuse READs without one
    read_capabilities: bool = True
    commit_ring: bool = True    # same-host writers commit through shared memory (commit_ring.py)
    nixl: bool = False          # register DRAM with a NIXL agent, publish it (daemon/nixl_agent.py)
    tls_cert: str | None = None   # PEM chain: serve the data plane over TLS (with tls_key);
    tls_key: str | None = None    # ... and present them to the master
    tls_ca: str | None = None     # PEM CA: mutual TLS on the data plane; verifies the master
    tls_master_ca: str | None = None  # CA that verifies the master (None: tls_ca)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty (bind address of the data plane)")
        check_advertise_host(self.advertise_host)
        if self.master_addr is not None:
            from kvstore.ha.cluster import MasterSpec
            MasterSpec.parse(self.master_addr)   # HOST:PORT, a list, or etcd://HOST:PORT/NAME
        _check_port("port", self.port)
        if self.metrics_host is not None and not self.metrics_host:
            raise ConfigError("metrics_host must not be empty (omit it to use the host)")
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        object.__setattr__(self, "dram_bytes", parse_size(self.dram_bytes))
        object.__setattr__(self, "ssd_bytes", parse_size(self.ssd_bytes))
        object.__setattr__(self, "gpu_bytes", parse_size(self.gpu_bytes))
        if self.dram_bytes == 0 and self.ssd_dir is None and self.gpu_device is None:
            raise ConfigError("the daemon needs at least one tier: dram_bytes > 0, ssd or gpu")
        if (self.ssd_dir is None) != (self.ssd_bytes == 0):
            raise ConfigError("ssd needs both a directory and a size > 0 (--ssd DIR:SIZE)")
        if self.ssd_codec not in ("none", "lz4"):
            raise ConfigError(f"ssd_codec must be 'none' or 'lz4', got {self.ssd_codec!r}")
        if (self.gpu_device is None) != (self.gpu_bytes == 0):
            raise ConfigError("gpu needs both a device and a size > 0 (--gpu DEVICE:SIZE)")
        if not _NODE_ID_RE.match(self.node_id):
            raise ConfigError(f"node_id must be 1-128 of [A-Za-z0-9._-], got {self.node_id!r}")
        if self.token is not None and len(self.token.encode()) > MAX_TOKEN_BYTES:
            raise ConfigError(f"token longer than {MAX_TOKEN_BYTES} bytes")
        if self.rpc_timeout_s <= 0:
            raise ConfigError(f"rpc_timeout_s must be > 0, got {self.rpc_timeout_s}")
        if self.register_timeout_s is not None and self.register_timeout_s <= 0:
            raise ConfigError(f"register_timeout_s must be > 0, got {self.register_timeout_s}")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.handshake_timeout_s <= 0:
            raise ConfigError("handshake_timeout_s must be > 0")
        tls = self.tls      # ConfigError for a cert without its key, a missing file
        if tls is not None:
            tls.server_context()   # ... and now for files that are not PEM
        if self.tls_master_ca is not None and tls is None:
            raise ConfigError("--tls-master-ca needs --tls-cert and --tls-key")

    @property
    def tls(self) -> TLSConfig | None:
        """The data plane's TLS files as one ``TLSConfig`` (None: plain text)."""
        return TLSConfig.from_files(self.tls_ca, self.tls_cert, self.tls_key)

    @property
    def master_tls(self) -> TLSConfig | None:
        """What the daemon's link to its master uses: its own certificate (the master may
        require one), verifying the master with ``tls_master_ca`` or else ``tls.ca``."""
        if self.tls is None:
            return None
        return TLSConfig(ca=self.tls_master_ca or self.tls_ca, cert=self.tls_cert,
                         key=self.tls_key)


def _check_port(name: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be an integer in 0..65535, got {port!r}")
