"""``KeyedReads``: serves KEYED_READs (op 17, ``transport/keyed_read.py``): a client's read
of a key by name from this node's own object table, without a range from the master.

Why: a client's first get of a key was GetReplicas (a master round trip) plus the READ; a
put free to choose places a key on its home node (``kvstore.home``), so the client sends
its first get there and the daemon answers from its table: one round trip.

Rule (docs/ARCHITECTURE.md, Home reads): a KEYED_READ of ``key`` is served iff
- the keyed-read capability it carries verifies for this node and registration, is
  unexpired and its key prefix starts ``key`` (a tenant's ``{namespace}/``: a tenant never
  reads another's key); no capability is needed while the master issues no read
  capabilities for this node (as for READs);
- the node holds its location lease (``location_reads.LocationReads.lease_refusal``: the
  same authority as a CHECKED_READ: the table holds every removal the master may have
  completed);
- the table lists ``key`` (committed on this node) with the raw codec, no larger than the
  request's limit.
Else the refusal (CAPABILITY_REFUSED, LOCATION_OFF, KEY_NOT_HERE, TOO_LARGE) with its reason;
the connection stays usable. An object over the limit of a request flagged FLAG_LOCATE is
answered LOCATED with where it lies (segment, offset, size, checksum) instead of TOO_LARGE:
the client then reads it striped by CHECKED_READs (the same lease and table check, at the
time of each stripe, and the checksum verified), carrying the keyed-read capability
(``dataplane._check_location`` accepts it for keys under its prefix). A served reply carries the table's checksum before the bytes:
the client verifies the bytes against it, so a range reused by a new put while this table
still lists the old key (the master frees a removed range at once) is refused there.
"""

from __future__ import annotations

import logging
import socket

from kvstore.capability import CapabilityRefused
from kvstore.daemon.frame_reads import BadFrame, read_exact
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Status
from kvstore.transport.keyed_read import CHECKSUM, MAX_KEY_BYTES

log = logging.getLogger("kvstore.daemon.keyed_reads")

_RAW_CODEC = 0


class KeyedReads:
    """The KEYED_READ handler of one data plane (see the module docstring)."""

    def __init__(self, table, location_reads, guard, segments: dict[str, object],
                 send_from):
        self._table = table
        self._location_reads = location_reads
        self._guard = guard
        self._segments = segments          # segment id -> Backend
        self._send_from = send_from        # (conn, backend, header, offset, length)
        self.num_served = 0               # counters: no lock, never negative
        self.num_refused = 0
        self.num_located = 0              # of num_served: answered with the location

    def serve(self, conn: socket.socket, reader, flags: int, seg_len: int, request_id: int,
              max_bytes: int, key_len: int) -> bool:
        """Read the rest of one KEYED_READ from ``reader`` and answer it; True (the
        connection stays usable). BadFrame for a malformed request."""
        if seg_len:
            raise BadFrame("KEYED_READ carries no segment id")
        if not 0 < key_len <= MAX_KEY_BYTES:
            raise BadFrame(f"KEYED_READ key length {key_len}")
        blob = b""
        if flags & data_frames.FLAG_CAPABILITY:
            (cap_len,) = data_frames.CAPABILITY_LENGTH.unpack(
                read_exact(reader, data_frames.CAPABILITY_LENGTH.size))
            blob = read_exact(reader, cap_len)
        try:
            key = read_exact(reader, key_len).decode()
        except UnicodeDecodeError as exc:
            raise BadFrame("KEYED_READ key is not UTF-8") from exc
        refusal, found = self._decide(key, blob, max_bytes,
                                      locate=bool(flags & data_frames.FLAG_LOCATE))
        if refusal is not None:
            self.num_refused += 1
            conn.sendall(data_frames.encode_reply(refusal[0], request_id, 0, refusal[1]))
            return True
        stored, segment = found
        self.num_served += 1
        if stored.length > max_bytes:
            self.num_located += 1
            segment_id = stored.segment_id.encode()
            payload = data_frames.LOCATION.pack(stored.checksum, stored.offset,
                                                stored.length) + segment_id
            conn.sendall(data_frames.REPLY.pack(Status.LOCATED, 0, 0, request_id,
                                                len(payload)) + payload)
            return True
        header = data_frames.REPLY.pack(0, 0, 0, request_id, CHECKSUM.size + stored.length) \
            + CHECKSUM.pack(stored.checksum)
        self._send_from(conn, segment, header, stored.offset, stored.length)
        return True

    def _decide(self, key: str, blob: bytes, max_bytes: int, *, locate: bool):
        """(refusal, None) or (None, (stored object, its backend)); with ``locate`` an
        object over ``max_bytes`` is no refusal (the caller answers its location)."""
        try:
            prefix = self._guard.check_keyed(blob)
        except CapabilityRefused as exc:
            log.warning("data plane: keyed read of %r refused: %s", key, exc)
            return (Status.CAPABILITY_REFUSED, str(exc)), None
        if not key.startswith(prefix):
            return (Status.CAPABILITY_REFUSED,
                    f"the keyed-read capability allows keys under {prefix!r} only"), None
        if self._location_reads is None:
            return (Status.LOCATION_OFF, "this node keeps no object table"), None
        off = self._location_reads.lease_refusal()
        if off is not None:
            return off, None
        stored = self._table.get(key)
        segment = self._segments.get(stored.segment_id) if stored is not None else None
        if segment is None or stored.codec != _RAW_CODEC:
            return (Status.KEY_NOT_HERE, f"{key!r} is not stored here"), None
        if stored.length > max_bytes and not locate:
            return (Status.TOO_LARGE, f"{key!r} has {stored.length} bytes, over the "
                    f"{max_bytes} asked for"), None
        return None, (stored, segment)
