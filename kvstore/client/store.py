"""``KVStore``: the client engines import. Thread-safe; one instance per process is enough.

Guarantees, for every method:
- Batch methods return one entry per key, in order; an item fails alone (its entry is the
  KVStoreError), and the whole call raises only when nothing could be done for any item:
  ClosedError (this store was closed), AuthenticationError (token refused),
  MasterUnavailableError (master unreachable or past the deadline).
- A get never yields bytes that are not the object's (see ``kvstore.client.transfer``).
- Every call finishes or fails by its deadline (``timeout_s``, per call or from the config).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable, Sequence

from kvstore._deadline import Deadline
from kvstore._errors import ClosedError, InvalidArgumentError, KVStoreError
from kvstore.client.config import ClientConfig, check_timeout
from kvstore.client.key_checks import check_key, check_keys, check_lengths, check_node_id
from kvstore.client.leases import LeaseReleaser
from kvstore.client.home_hits import HitReporter
from kvstore.client.home_reads import HomeReads, home_reads_for
from kvstore.client.location_cache import get_cached, location_cache_for
from kvstore.client.reader import GetSettings, get_batch
from kvstore.client.reservations import ReservedSpace
from kvstore.client.shm_batch import get_into_batch, shm_first
from kvstore.client.stats_view import master_stats
from kvstore.client.transfer import Transfers
from kvstore.client.values import finish_bytes, new_bytes
from kvstore.client.committer import DaemonCommitter
from kvstore.client.writer import PutSettings, check_replicas, check_tier, put_batch
from kvstore.rpc import MasterClient, connect_master
from kvstore.transport import local_host_id, make_transports


DEFAULT_MAX_BATCH = 65536


def _raise_if_error(result: Any) -> Any:
    if isinstance(result, KVStoreError):
        raise result
    return result


class _ClosingGuard:
    """Context manager that reports a call which failed because another thread closed the
    store as ClosedError (a closed gRPC channel or transport raises its own, unrelated
    errors).

    NOTE: a class with one instance per store, not a @contextmanager: the generator-based one
    cost ~3 us per call, a visible share of a 64 KiB get.
    """

    __slots__ = ("_store",)

    def __init__(self, store: "KVStore"):
        self._store = store

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if (isinstance(exc, Exception) and self._store._closed
                and not isinstance(exc, ClosedError)):
            raise ClosedError("this KVStore was closed during the call") from exc
        return False


class KVStore:
    """A client of one kvstore cluster (see the module docstring for the guarantees).

    Build it with ``kvstore.connect`` or ``kvstore.local``; close it with ``close()`` or a
    ``with`` block. Methods of a closed store raise ClosedError.
    """

    def __init__(self, address: str, config: ClientConfig, *,
                 on_close: Sequence[Callable[[], None]] = ()):
        self.address = address
        self.config = config
        self.client_id = uuid.uuid4().hex
        self.host_id = local_host_id()
        self._on_close = list(on_close)
        self._closed = False
        # most keys the master takes in one request; learnt from Stats (connect asks)
        self._max_batch = DEFAULT_MAX_BATCH
        self._close_lock = threading.Lock()
        self._closing_guard = _ClosingGuard(self)
        self._master: MasterClient | None = None   # set by _connect_master
        self._transfers = Transfers(make_transports(kind=config.transport, token=config.token,
                                                    nodes=self._nixl_nodes, tls=config.tls,
                                                    shm_copy_threads=config.copy_threads),
                                    DaemonCommitter(config.token, config.tls))
        self._leases: LeaseReleaser | None = None   # set by _connect_master
        self._locations = location_cache_for(self._transfers,
                                             config.location_cache_entries)
        # space reserved ahead of puts (client/reservations.py); None: off
        self._reserved = (ReservedSpace(config.reserve_bytes, self.client_id, self.host_id)
                          if config.reserve_bytes else None)
        self._home: HomeReads | None = None   # set by _connect_master
        self._hits: HitReporter | None = None  # with _home: its reads' report to the master

    # ---- put ----------------------------------------------------------------------------
    def put(self, key: str, value: Any, *, replicas: int = 1, timeout_s: float | None = None,
            soft_pin_ttl_s: float | None = None, hard_pin: bool = False,
            tier: str | None = None, near_node: str | None = None) -> None:
        """Store ``value`` (bytes, bytearray, memoryview, numpy array or CPU torch tensor,
        read in place, never converted) under ``key`` on ``replicas`` distinct nodes.

        Putting a key that exists is a success and writes nothing. An empty value is stored
        (see ``kvstore.client.checksum``). ``tier`` ("hbm", "dram", "ssd") is tried first by
        placement, and within it the node ``near_node`` (a node id, e.g. the decode node
        that will read the value; a hint: other nodes are used when it has no room);
        ``soft_pin_ttl_s``/``hard_pin`` pin the object once stored.

        Raises InvalidArgumentError (bad key/value/option), CapacityError (no space even
        after eviction), TransferError (the write failed; the space was given back), or the
        whole-call errors of the module docstring.
        """
        _raise_if_error(self.batch_put([key], [value], replicas=replicas, timeout_s=timeout_s,
                                       soft_pin_ttl_s=soft_pin_ttl_s, hard_pin=hard_pin,
                                       tier=tier, near_node=near_node)[0])

    def batch_put(self, keys: Sequence[str], values: Sequence[Any], *, replicas: int = 1,
                  timeout_s: float | None = None, soft_pin_ttl_s: float | None = None,
                  hard_pin: bool = False, tier: str | None = None,
                  near_node: str | None = None) -> list[KVStoreError | None]:
        """``put`` of many keys with one PutStart and one PutEnd; None or the error per key."""
        self._check_open()
        keys = check_keys(keys)
        check_lengths(keys, values, "values")
        if soft_pin_ttl_s is not None:
            check_timeout(soft_pin_ttl_s, "soft_pin_ttl_s")
        settings = PutSettings(
            replicas=check_replicas(replicas), deadline=self._deadline(timeout_s),
            client_id=self.client_id,
            host_id=self.host_id, soft_pin_ttl_s=soft_pin_ttl_s, hard_pin=bool(hard_pin),
            tier=check_tier(tier), near_node_id=check_node_id(near_node),
            reserved=self._reserved)
        if self._hits is not None:
            self._hits.flush()   # NOTE: evictions this put causes see this client's reads
        with self._closing_guard:
            return self._chunked(lambda lo, hi: put_batch(
                self._master, self._transfers, keys[lo:hi], values[lo:hi], settings), len(keys))

    # ---- get ----------------------------------------------------------------------------
    def get(self, key: str, *, verify: bool | None = None, timeout_s: float | None = None,
            lease_ttl_s: float | None = None) -> bytes:
        """The bytes stored under ``key``.

        Raises KeyNotFoundError (absent, removed, evicted or still being written),
        ChecksumError (every replica's bytes were wrong), TransferError (no replica could be
        read), InvalidArgumentError (bad key), or the whole-call errors.
        """
        return _raise_if_error(self.batch_get([key], verify=verify, timeout_s=timeout_s,
                                              lease_ttl_s=lease_ttl_s)[0])

    def batch_get(self, keys: Sequence[str], *, verify: bool | None = None,
                  timeout_s: float | None = None,
                  lease_ttl_s: float | None = None) -> list[bytes | KVStoreError]:
        """``get`` of many keys with one GetReplicas; bytes or the error per key."""
        results = self._get(keys, None, verify, timeout_s, lease_ttl_s)
        return [r if isinstance(r, KVStoreError) else finish_bytes(r) for r in results]

    def get_into(self, key: str, out: Any, *, verify: bool | None = None,
                 timeout_s: float | None = None, lease_ttl_s: float | None = None) -> int:
        """Read the object under ``key`` into the first bytes of ``out`` (a writable,
        C-contiguous bytearray, memoryview, numpy array or CPU torch tensor; the caller owns
        it) and return the number of bytes written.

        Raises InvalidArgumentError when ``out`` is read-only, not contiguous or smaller than
        the object (nothing is written then); otherwise as ``get``. After an error the
        contents of ``out`` are unspecified.
        """
        return _raise_if_error(self.batch_get_into([key], [out], verify=verify,
                                                   timeout_s=timeout_s,
                                                   lease_ttl_s=lease_ttl_s)[0])

    def batch_get_into(self, keys: Sequence[str], outs: Sequence[Any], *,
                       verify: bool | None = None, timeout_s: float | None = None,
                       lease_ttl_s: float | None = None) -> list[int | KVStoreError]:
        """``get_into`` of many keys with one GetReplicas; bytes written or the error per key."""
        check_lengths(keys if isinstance(keys, (list, tuple)) else [], outs, "outs")
        return self._get(keys, outs, verify, timeout_s, lease_ttl_s)

    def _get(self, keys: Sequence[str], outs: Sequence[Any] | None, verify: bool | None,
             timeout_s: float | None, lease_ttl_s: float | None) -> list[Any]:
        self._check_open()
        keys = check_keys(keys)
        settings = GetSettings(
            deadline=self._deadline(timeout_s), host_id=self.host_id, verify=self.config.verify if verify is None else bool(verify),
            lease_ttl_s=(self.config.lease_ttl_s if lease_ttl_s is None
                         else check_timeout(lease_ttl_s, "lease_ttl_s")),
            release=self._leases.release if self._leases is not None else None,
            locations=self._locations)
        allocate = None if outs is not None else new_bytes
        shm = shm_first(self._transfers) if outs is not None else None
        transfers = self._transfers

        def fetch(chunk_keys: list, chunk_outs: list | None) -> list[Any]:
            if shm is not None:   # NOTE: same-host reads without per-key Python (shm_batch)
                results = get_into_batch(self._master, transfers, shm, chunk_keys,
                                         chunk_outs, settings)
                if results is not None:
                    return results
            return get_batch(self._master, transfers, chunk_keys, chunk_outs, allocate,
                             settings)

        home = self._home
        if home is not None:
            master_fetch = fetch

            def fetch(chunk_keys: list, chunk_outs: list | None) -> list[Any]:
                # NOTE: first gets go to the key's home node (client/home_reads.py)
                return home.get(chunk_keys, chunk_outs, allocate, settings.deadline,
                                master_fetch, transfers)

        def get_chunk(lo: int, hi: int) -> list[Any]:
            chunk_outs = outs[lo:hi] if outs is not None else None
            if settings.locations is None:
                return fetch(keys[lo:hi], chunk_outs)
            return get_cached(settings.locations, keys[lo:hi], chunk_outs, allocate,
                              settings.deadline, fetch, transfers)

        with self._closing_guard:
            return self._chunked(get_chunk, len(keys))

    # ---- metadata -----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        """True if a complete object is stored under ``key``. Grants no lease."""
        return self.batch_exists([key])[0]

    def batch_exists(self, keys: Sequence[str]) -> list[bool]:
        """``exists`` per key with one RPC. Raises InvalidArgumentError for any bad key."""
        names = self._checked_names(keys)
        return self._chunked(lambda lo, hi: self._call("exists", names[lo:hi]), len(names))

    def remove(self, key: str, *, force: bool = False) -> bool:
        """Remove ``key``; False if it did not exist. Without ``force``, an object that is
        leased by a reader, hard-pinned or still being written is kept and KVStoreError
        raised. With ``force`` it disappears at once, but the master reuses its space only
        once its read leases lapse (readers in flight keep reading the right bytes). This
        store's own finished reads never hold it: their leases are released first.
        Raises TransferError (naming the node) when a daemon holding a replica did not
        confirm the removal within the master's --commit-timeout: the object is gone from
        the master, but a master restarted before that daemon confirms would serve it again;
        a retry waits for the daemon again and returns only once it confirmed (True; or
        False when the master's own background push confirmed it first)."""
        self._release_own_leases()
        key = check_key(key)
        if self._locations is not None:
            self._locations.forget(key)
        return _raise_if_error(self._call("remove", [key], force=bool(force))[0])

    def remove_prefix(self, prefix: str, *, force: bool = False) -> int:
        """Remove every object whose key starts with ``prefix`` (non-empty); return how many.
        Leased, pinned and pending objects are skipped unless ``force``. Raises
        TransferError naming the nodes that did not confirm some removal in time (see
        ``remove``; a retry waits for them again)."""
        if not isinstance(prefix, str) or not prefix:
            raise InvalidArgumentError("prefix must be a non-empty str")
        self._release_own_leases()
        return self._call("remove_prefix", prefix, force=bool(force))[0]

    def _release_own_leases(self) -> None:
        if self._leases is not None:
            self._leases.flush()

    def pin(self, key: str, *, ttl_s: float | None = None, hard: bool = False) -> None:
        """Pin ``key`` against eviction: softly for ``ttl_s`` seconds, or hard (until unpin).
        Raises KeyNotFoundError if it does not exist."""
        if not hard:
            check_timeout(ttl_s, "ttl_s")
        _raise_if_error(self._call("pin", [check_key(key)], ttl_s=ttl_s, hard=bool(hard))[0])

    def unpin(self, key: str) -> None:
        """Drop every pin of ``key``. Raises KeyNotFoundError if it does not exist."""
        _raise_if_error(self._call("unpin", [check_key(key)])[0])

    def match_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys of the chain ``keys`` exist (complete). Grants no lease."""
        names = self._checked_names(keys)
        num_matched = 0
        for lo in range(0, len(names), self._max_batch):
            chunk = names[lo:lo + self._max_batch]
            matched = self._call("match_prefix", chunk)
            num_matched += matched
            if matched < len(chunk):
                break
        return num_matched

    def register_memory(self, buffer: Any) -> None:
        """Register ``buffer`` (an engine's whole KV cache, once) with the transports that do
        one-sided transfers (nixl), so puts from and gets into any part of it skip their
        staging copy; a no-op for the others. The store keeps it registered until ``close``.
        Raises InvalidArgumentError for a buffer that is not writable C-contiguous CPU
        memory, ConfigError with NIXL's reason when NIXL refuses it."""
        self._check_open()
        from kvstore.client.values import as_destination

        view = as_destination(buffer)
        for transport in self._transfers.transports:
            transport.register_memory(view)

    def stats(self) -> dict[str, Any]:
        """Cluster figures from the master plus this client's own: which transports it has
        (preference order), per transport reads/writes/bytes/errors it served, and its
        location cache's entries, hits, misses and refused reads (None: off), and its home
        reads' hits, misses, list refreshes and nodes (None: off)."""
        if self._hits is not None:
            self._hits.flush()   # the master's hits include this client's home reads
        stats = self._call("stats")
        master = master_stats(stats)
        self._max_batch = stats.max_batch or self._max_batch
        return {"address": self.address, "client_id": self.client_id, "host_id": self.host_id,
                "metadata": self.metadata_path,
                "transports": [t.name for t in self._transfers.transports],
                "transfers": self._transfers.stats(), "master": master,
                "location_cache": (self._locations.stats() if self._locations is not None
                                   else None),
                "home_reads": self._home.stats() if self._home is not None else None}

    # ---- lifecycle ----------------------------------------------------------------------
    def _nixl_nodes(self) -> dict[str, bytes]:
        """{node_id: nixl_metadata} of the registered nodes, for the nixl transport."""
        master = self._master
        if master is None:
            return {}
        return {node.node_id: node.nixl_metadata for node in master.list_nodes()}

    def _connect_master(self) -> None:
        """Readiness check of ``connect``/``local``: reach the master on the path
        ``config.metadata`` asks for (``kvstore.rpc.connect_master``) and learn its
        ``max_batch``. Raises what connect_master raises."""
        self._master, stats = connect_master(
            self.address, token=self.config.token, rpc_timeout_s=self.config.rpc_timeout_s,
            metadata=self.config.metadata, reply_spin_s=self.config.reply_spin_s,
            tls=self.config.tls)
        self._max_batch = stats.max_batch or self._max_batch
        if stats.data_token:
            # NOTE: a tenant's token opens only the master; the daemons' data planes take
            # the token the master hands to tenants (kvstore/_wire.py data_plane_token)
            self._transfers.close()
            self._transfers = Transfers(make_transports(
                kind=self.config.transport, token=stats.data_token, nodes=self._nixl_nodes,
                tls=self.config.tls, shm_copy_threads=self.config.copy_threads),
                DaemonCommitter(stats.data_token, self.config.tls))
            # NOTE: a tenant's daemons record its keys namespaced, names its client never
            # sends: a location read there would always be refused
            self._locations = None
        self._leases = LeaseReleaser(self._master)
        self._home = home_reads_for(self._master, self._transfers, self.host_id,
                                    self.config.home_reads)
        if self._home is not None:
            self._home.hits = self._hits = HitReporter(self._master)
            if self._locations is not None and self._locations.transport is self._home.transport:
                self._home.locations = self._locations

    @property
    def metadata_path(self) -> str:
        """What master calls travel: "grpc" or "fast" (None before connecting)."""
        return self._master.path if self._master is not None else None

    def close(self) -> None:
        """Close connections and mappings (and, for ``kvstore.local``, stop the embedded
        servers). Idempotent. Calls in flight in other threads may fail."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._leases is not None:
            self._leases.close()      # sends the releases still queued, then stops
        if self._hits is not None:
            self._hits.close()
        self._transfers.close()
        if self._master is not None:
            self._master.close()
        for stop in reversed(self._on_close):
            stop()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<kvstore.KVStore {self.address} {state}>"

    # ---- helpers ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this KVStore is closed")

    def _deadline(self, timeout_s: float | None) -> Deadline:
        seconds = self.config.timeout_s if timeout_s is None else check_timeout(timeout_s,
                                                                                "timeout_s")
        return Deadline.after(seconds)

    def _chunked(self, run: Callable[[int, int], list[Any]], num_keys: int) -> list[Any]:
        """Run a batch flow over slices of at most the master's ``max_batch`` keys."""
        if num_keys <= self._max_batch:
            return run(0, num_keys)
        results: list[Any] = []
        for lo in range(0, num_keys, self._max_batch):
            results.extend(run(lo, min(num_keys, lo + self._max_batch)))
        return results

    def _checked_names(self, keys: Sequence[str]) -> list[str]:
        self._check_open()
        return [check_key(key) for key in check_keys(keys)]

    def _call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        """Run MasterClient ``verb``; ClosedError if this store is (or gets) closed."""
        self._check_open()
        with self._closing_guard:
            return getattr(self._master, verb)(*args, **kwargs)
