"""Home reads: a first get of a key in one round trip, straight to the key's home node.

A put free to choose places its key's first replica on the key's home node
(``kvstore.home``, ``master/placement.py place_at_home``). ``HomeReads`` keeps the master's
live node list (GetHomeNodes: node ids, data addresses, this caller's key prefix and a
keyed-read capability per node), computes each key's home with the same function, and
sends the key there as a KEYED_READ (``transport/keyed_read.py``); the daemon answers from
its own object table under its location lease (``daemon/keyed_reads.py``) with the
object's checksum and bytes, which are verified here. Any refusal ("not here", no lease,
capability refused, too large), transfer error or checksum mismatch sends the key through
the master as before (``fetch``: GetReplicas, whose TCP reads fill the location cache).

Guarantee: a home read returns the bytes the home daemon's table lists for the key,
verified against that table's checksum, and never a key whose remove completed (the
windows in docs/ARCHITECTURE.md, Home reads). It takes no read lease; the master counts its
hit, recency and promotion afterwards (``hits``: client/home_hits.py).

The node list: fetched on the first get, refreshed at half its capabilities' window, on a
CAPABILITY_REFUSED (at the next get), and after a "not here" or a failed node at most once
per ``MISS_REFRESH_S`` (a node that joined moves homes: the first misses after it refresh
the list). Skipped: keys whose home is on this host when shm is this client's first
transport (the shm path is faster), nodes that answered LOCATION_OFF for ``NODE_OFF_S``.

Large values (at least 2 x ``stripe_min_bytes``, what the tcp transport stripes): the
KEYED_READ asks (FLAG_LOCATE) for the location rather than the bytes of a value that large,
and the daemon answers LOCATED: segment, range and the table's checksum. The client reads
that range at once by CHECKED_READs carrying the key, that checksum and the keyed-read
capability (``transport/checked_read.py``), striped over several connections: the
daemon serves each stripe only while its table still holds that object there under its
lease, and the bytes are verified against the checksum, so a remove or replace between the
two round trips is refused (then the master path), never wrong bytes. Two round trips to
the daemon, no master: one stream of 4 MiB was slower than four stripes of 1 MiB
(bench/RESULTS.md). The location is then cached (``locations``, client/location_cache.py:
a repeated get reads it straight away).
Thread-safe (one lock for the list; reads run outside it).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Sequence

from kvstore._deadline import Deadline
from kvstore._errors import InvalidArgumentError, KVStoreError
from kvstore.client.checksum import checksum, is_empty_marker
from kvstore.client.key_checks import check_key
from kvstore.client.location_cache import NODE_OFF_S, Fetch, fetch_rest
from kvstore.client.values import as_destination
from kvstore.home import home_of, node_seeds
from kvstore.transport import keyed_read
from kvstore.transport.base import Target
from kvstore.transport.checked_read import encode_identity
from kvstore.transport.data_frames import Status
from kvstore.transport.tcp_conn import ReplyError

#: Least time between two list refreshes caused by misses (a home that holds no copy of a
#: key is normal: the home was full at put time, or the put named a node or tier).
MISS_REFRESH_S = 1.0


class HomeReads:
    """The node list and the home reads of one client (see the module docstring)."""

    def __init__(self, master, transport, *, host_id: str, shm_first: bool,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self._master = master
        self.transport = transport            # the TcpTransport whose pool we use
        # the largest value read at home: below what the transport stripes
        self._largest_bytes = 2 * transport.stripe_min_bytes - 1
        self._host_id = host_id
        self._shm_first = shm_first
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._nodes = None                    # rpc HomeNodes, or None before the first fetch
        self._seeds: list = []
        self._by_id: dict = {}
        self._refresh_at_wall_s = float("-inf")
        self._fetched_at_s = float("-inf")
        self._node_off_until_s: dict[str, float] = {}
        self.num_hits = self.num_misses = self.num_refreshes = 0
        self.num_located = 0                  # of num_hits: large values read by location
        # told the keys home reads served (client/home_hits.py); None: the master never
        # learns of them
        self.hits = None
        # told where large values were read (client/location_cache.py); None: no cache
        self.locations = None

    # ---- the node list ------------------------------------------------------------------
    def _current(self, deadline: Deadline):
        """The node list, fetched first when due; None before any fetch succeeded."""
        if self._wall_clock() < self._refresh_at_wall_s:
            return self._nodes
        try:
            nodes = self._master.get_home_nodes(deadline=deadline)
        except KVStoreError:
            # NOTE: the master path reports what is wrong; the list we hold (its
            # capabilities still valid, or refused by the daemons) serves meanwhile, and
            # the master is asked again only after MISS_REFRESH_S, not at every get
            with self._lock:
                self._refresh_at_wall_s = self._wall_clock() + MISS_REFRESH_S
            return self._nodes
        now_wall_s = self._wall_clock()
        with self._lock:
            self._nodes = nodes
            self._seeds = node_seeds([n.node_id for n in nodes.nodes])
            self._by_id = {n.node_id: n for n in nodes.nodes}
            self._refresh_at_wall_s = now_wall_s + max(
                0.0, (nodes.expiry_ms / 1000 - now_wall_s) / 2)
            self._fetched_at_s = self._clock()
            self.num_refreshes += 1
        return nodes

    def _stale(self, *, force: bool = False) -> None:
        """Refresh the list at the next get (``force``), or at most every MISS_REFRESH_S."""
        with self._lock:
            if force or self._clock() - self._fetched_at_s >= MISS_REFRESH_S:
                self._refresh_at_wall_s = float("-inf")

    # ---- reads --------------------------------------------------------------------------
    def get(self, keys: Sequence[str], outs: Sequence[Any] | None, allocate,
            deadline: Deadline, fetch: Fetch, transfers) -> list[Any]:
        """Results of ``reader.get_batch`` for ``keys`` (any: an invalid key goes to
        ``fetch``, which reports it): the keys their
        home serves by KEYED_READs (one pipelined request stream per node), the rest by
        ``fetch``."""
        nodes = self._current(deadline)
        if nodes is None or not self._seeds:
            return fetch(list(keys), outs)
        prefix, now_s = nodes.key_prefix, self._clock()
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        rest: list[int] = []
        for i, key in enumerate(keys):
            try:
                check_key(key)
            except InvalidArgumentError:
                rest.append(i)       # the master path reports it, per key
                continue
            node = self._by_id.get(home_of(prefix + key, self._seeds))
            if (node is None or (self._shm_first and node.host_id == self._host_id)
                    or now_s < self._node_off_until_s.get(node.node_id, float("-inf"))):
                rest.append(i)
            else:
                by_node[node.node_id].append(i)
        results: list[Any] = [None] * len(keys)
        groups = [(self._by_id[node_id], positions) for node_id, positions in by_node.items()]
        # NOTE: the nodes are read at once (the transport's worker threads), each its own
        # pipelined stream: a batch over N nodes waits for the slowest, not for their sum
        futures = [self.transport._executor.submit(
            self._read_node, node, prefix, keys, positions, outs, allocate, deadline, results)
            for node, positions in groups[1:]]
        counts = [self._read_node(groups[0][0], prefix, keys, groups[0][1], outs, allocate,
                                  deadline, results)] if groups else []
        counts.extend(future.result() for future in futures)
        num_ok = sum(served for served, _ in counts)
        num_bytes = sum(served_bytes for _, served_bytes in counts)
        served_keys = []
        for _, positions in groups:
            for i in positions:
                if results[i] is None:
                    rest.append(i)
                else:
                    served_keys.append(keys[i])
        if self.hits is not None and served_keys:
            self.hits.report(served_keys)      # the master's hits, recency and promotion
        if num_ok:
            transfers.count_reads(self.transport.name, num_ok, num_bytes)
        with self._lock:
            self.num_hits += num_ok
            self.num_misses += len(keys) - num_ok
        return fetch_rest(results, rest, keys, outs, fetch)

    def _read_node(self, node, prefix: str, keys, positions: list[int], outs, allocate,
                   deadline: Deadline, results: list) -> tuple[int, int]:
        """KEYED_READs of ``positions`` at ``node``; fills ``results`` for the keys served
        (verified), leaves None for the others. Returns (keys served, bytes)."""
        holders: dict[int, Any] = {}
        views: dict[int, memoryview] = {}
        items = []
        limits = []
        # NOTE: a value the tcp transport would stripe over several connections is read
        # faster that way: the daemon answers its location (LOCATED), read by _read_located
        largest = self._largest_bytes
        for i in positions:
            limit = largest
            if outs is not None:
                try:
                    limit = min(largest, as_destination(outs[i]).nbytes)
                except InvalidArgumentError:
                    limit = -1       # the master path reports it
            limits.append(limit)
            items.append(((prefix + keys[i]).encode(), node.keyed_read_capability,
                          max(limit, 0)))

        def allocate_for(index: int, size: int) -> memoryview | None:
            i = positions[index]
            if limits[index] < 0:
                return None
            if outs is None:
                holders[i], views[i] = allocate(size)
            else:
                views[i] = as_destination(outs[i])[:size]
                holders[i] = size
            return views[i]

        pool = self.transport._pool
        try:
            conn, _ = pool.acquire(node.data_addr, node.node_id, deadline)
        except KVStoreError:
            self._stale()
            return 0, 0
        healthy = False
        try:
            conn.set_deadline(deadline)
            replies = keyed_read.read_keyed(conn, items, allocate_for, locate=True)
            healthy = True
        except (OSError, KVStoreError):
            replies = [None] * len(items)     # unanswered: the master path
            self._stale()
        finally:
            if healthy:
                pool.release(conn)
            else:
                conn.close()
        served = served_bytes = 0
        located = []
        for index, (i, reply) in enumerate(zip(positions, replies)):
            if isinstance(reply, ReplyError) or reply is None:
                self._refused(node.node_id, reply)
                continue
            if type(reply) is keyed_read.Located:
                if limits[index] >= 0:
                    located.append((i, reply))
                continue
            view = views[i]
            if is_empty_marker(view.nbytes, reply):
                results[i] = self._empty(outs, allocate, i)
            elif checksum(view) != reply:
                continue             # a range reused since the table listed it: refused
            else:
                results[i] = holders[i]
            served += 1
            served_bytes += view.nbytes
        if located:
            num, num_bytes = self._read_located(node, prefix, keys, located, outs, allocate,
                                                deadline, results)
            served += num
            served_bytes += num_bytes
        return served, served_bytes

    def _read_located(self, node, prefix: str, keys, located: list, outs, allocate,
                      deadline: Deadline, results: list) -> tuple[int, int]:
        """Read the LOCATED values ``located`` ((position, Located)) by CHECKED_READs of
        their ranges at ``node`` (striped by the transport); fills ``results`` for those
        verified, leaves None for the others (a refusal, an error, a mismatch, a ``out``
        too small: the master path). Returns (keys served, bytes)."""
        reads, items = [], []
        for i, where in located:
            if outs is None:
                holder, dst = allocate(where.size_bytes)
            else:
                dst = as_destination(outs[i])
                if dst.nbytes < where.size_bytes:
                    continue             # the master path reports it
                dst, holder = dst[:where.size_bytes], where.size_bytes
            # NOTE: the identity names the key as the daemon's table does (with the
            # caller's prefix); the keyed-read capability allows the range for that key
            target = Target(node.node_id, node.host_id, node.data_addr, where.segment_id, "",
                            where.offset, where.size_bytes,
                            encode_identity(prefix + keys[i], where.checksum,
                                            node.keyed_read_capability))
            reads.append((i, where, holder))
            items.append((target, dst))
        if not items:
            return 0, 0
        remaining_s = deadline.remaining_s()
        if remaining_s <= 0:
            return 0, 0
        errors = self.transport.read_checked_many(items, timeout_s=remaining_s)
        served = served_bytes = 0
        for (i, where, holder), (target, dst), exc in zip(reads, items, errors):
            if exc is not None or checksum(dst) != where.checksum:
                if exc is not None:
                    self._refused(node.node_id, exc)
                continue                 # a range reused since the table listed it: refused
            results[i] = holder
            served += 1
            served_bytes += where.size_bytes
            if self.locations is not None and not prefix:
                self.locations.remember_checked(keys[i], target, where.size_bytes,
                                                where.checksum)
        with self._lock:
            self.num_located += served
        return served, served_bytes

    @staticmethod
    def _empty(outs, allocate, i: int) -> Any:
        """The result of an empty value (stored as a one-byte marker, ``checksum``)."""
        if outs is None:
            return allocate(0)[0]
        return 0

    def _refused(self, node_id: str, reply) -> None:
        status = getattr(reply, "status", None)
        if status == Status.LOCATION_OFF:
            with self._lock:
                self._node_off_until_s[node_id] = self._clock() + NODE_OFF_S
        elif status == Status.CAPABILITY_REFUSED:
            self._stale(force=True)
        elif status == Status.KEY_NOT_HERE:
            self._stale()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.num_hits, "misses": self.num_misses,
                    "refreshes": self.num_refreshes, "located": self.num_located,
                    "nodes": len(self._by_id)}


def home_reads_for(master, transfers, host_id: str, enabled: bool) -> HomeReads | None:
    """Home reads over the TCP transport of ``transfers``; None when off or no TCP."""
    tcp = next((t for t in transfers.transports if t.name == "tcp"), None)
    if not enabled or tcp is None:
        return None
    first = transfers.transports[0] if transfers.transports else None
    return HomeReads(master, tcp, host_id=host_id,
                     shm_first=first is not None and first.name == "shm")
