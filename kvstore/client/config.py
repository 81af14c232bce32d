"""``ClientConfig``: the options of ``kvstore.connect``/``kvstore.local`` (their ``**options``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from kvstore._errors import InvalidArgumentError
from kvstore._tls import TLSConfig
from kvstore.rpc.connect import METADATA_PATHS
from kvstore.transport import TRANSPORT_KINDS

TOKEN_ENV = "KVSTORE_TOKEN"
MAX_REPLY_SPIN_S = 0.01  # polling longer than a few round trips only burns CPU


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Settings of one KVStore client. Frozen; validated on construction.

    Every method takes ``timeout_s``/``lease_ttl_s``/``verify`` per call too; these are the
    defaults. Raises InvalidArgumentError for an invalid value.
    """

    token: str | None = None
    transport: str = "auto"          # "auto": shm where the replica is on this host, else tcp
    timeout_s: float = 30.0          # deadline of one call: RPCs and transfers together
    lease_ttl_s: float | None = None  # read lease a get asks for; None: the master's default
    # verify checksums of shm reads too (every other transport always verifies); False: this
    # client trusts every process on the host that can map the segments. NOTE: on by default
    # since shm reads copy and hash in one pass (kvstore._copy_hash): no cost measurable at
    # 4 MiB or 64 KiB gets here (bench/RESULTS.md, "Fused copy + hash"; issue 14 allows a
    # default up to 15%); see docs/ARCHITECTURE.md, Checksums
    verify: bool = True
    rpc_timeout_s: float = 10.0      # deadline of one master RPC within a call
    # master calls: "auto" (the framed fast path when the master offers one, else gRPC),
    # "grpc", or "fast" (connect fails if the master offers no fast path)
    metadata: str = "auto"
    # fast path only: poll for each master reply this long before blocking (0: block at
    # once); trades up to this much CPU per master call for latency
    reply_spin_s: float = 0.0002
    # TLS on every connection to the master (both paths) and to daemons' data planes
    tls: TLSConfig | None = None
    # keys whose TCP or same-host shm replica location this client keeps, so that a
    # repeated get skips the master (client/location_cache.py; the daemon checks each TCP
    # read against its own table, and publishes that table for shm reads in shared memory,
    # client/shm_locations.py); one LRU for both; 0: off
    location_cache_entries: int = 65536
    # > 0: ask the master for this much space ahead of puts (a reservation, the Reserve
    # call) and place single-replica puts without a placement hint inside it, so such a put
    # costs one master call (PutEnd) instead of two (client/reservations.py); 0: off, every
    # put takes PutStart. Off by default: docs/ARCHITECTURE.md, Reservations, says why.
    reserve_bytes: int = 0
    # a first get goes to the key's home node as a KEYED_READ before asking the master
    # (client/home_reads.py; one round trip where GetReplicas + READ take two); False: off
    home_reads: bool = True
    # threads a same-host put's copy of a value of 2 MiB or more uses (the shm write, or a
    # reserved put's copy + hash; csrc/cpu/copy_split.h): 2 shares it with a helper thread
    # (a helper that is not scheduled costs only its start: the caller copies what it did
    # not take); 1: the calling thread only. NOTE: 1 by default: on this 2-core machine at
    # load 20+ two threads measured slower (the helper preempted mid-chunk stalls the
    # caller), and no quiet run has measured 2 yet (docs/ARCHITECTURE.md, Same-host put
    # bandwidth)
    copy_threads: int = 1

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORT_KINDS:
            raise InvalidArgumentError(
                f"transport must be one of {TRANSPORT_KINDS}, got {self.transport!r}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise InvalidArgumentError("token must be a non-empty str or None")
        if self.metadata not in METADATA_PATHS:
            raise InvalidArgumentError(
                f"metadata must be one of {METADATA_PATHS}, got {self.metadata!r}")
        if self.tls is not None and not isinstance(self.tls, TLSConfig):
            raise InvalidArgumentError(
                f"tls must be a kvstore.TLSConfig or None, got {type(self.tls).__name__}")
        entries = self.location_cache_entries
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
            raise InvalidArgumentError(f"location_cache_entries must be an int >= 0, got "
                                       f"{entries!r}")
        reserve = self.reserve_bytes
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise InvalidArgumentError(f"reserve_bytes must be an int >= 0, got {reserve!r}")
        threads = self.copy_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads not in (1, 2):
            raise InvalidArgumentError(f"copy_threads must be 1 or 2, got {self.copy_threads!r}")
        if not isinstance(self.home_reads, bool):
            raise InvalidArgumentError(f"home_reads must be a bool, got {self.home_reads!r}")
        check_timeout(self.timeout_s, "timeout_s")
        check_timeout(self.rpc_timeout_s, "rpc_timeout_s")
        if self.lease_ttl_s is not None:
            check_timeout(self.lease_ttl_s, "lease_ttl_s")
        spin_s = self.reply_spin_s
        if (isinstance(spin_s, bool) or not isinstance(spin_s, (int, float))
                or not 0 <= spin_s <= MAX_REPLY_SPIN_S):
            raise InvalidArgumentError(f"reply_spin_s must be a number of seconds in "
                                       f"[0, {MAX_REPLY_SPIN_S}], got {self.reply_spin_s!r}")


def check_timeout(value: Any, name: str) -> float:
    """``value`` as a positive float of seconds; InvalidArgumentError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidArgumentError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def make_config(token: str | None, transport: str, options: dict[str, Any]) -> ClientConfig:
    """Build a ClientConfig from ``connect``'s arguments; the token falls back to the
    KVSTORE_TOKEN environment variable. Raises InvalidArgumentError naming unknown options."""
    known = {f.name for f in dataclasses.fields(ClientConfig)} - {"token", "transport"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgumentError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    return ClientConfig(token=token, transport=transport, **options)
