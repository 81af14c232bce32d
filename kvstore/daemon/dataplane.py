"""The daemon's data-plane server: serves READ/WRITE of segment ranges (data_frames.py format).

Storage is reached only through the tier backends (``kvstore.daemon.backends.Backend``):
a backend that hands out a view (DRAM) is received into / sent from directly; any other
(SSD, HBM) through its ``write_stream`` / ``read_stream``, the socket filling or draining
the backend's own piece buffers (the SSD backend writes and reads ahead meanwhile).
Socket-level work stays here; the commit requests (COMMIT, CLIENT_COMMIT, WRITE_COMMIT's
commit) are ``dataplane_commits.CommitRequests``.

Threading and resource handling: ``kvstore._tcpserver.ThreadedTcpServer`` (one accept
thread, one thread per connection with blocking sockets; at most ``max_connections``).
Each request is served on its connection's own thread, start to end (no hand-off).

Reading requests: every byte after the handshake comes through one buffered reader per
connection (``socket.makefile``, ``REQUEST_BUFFER_BYTES``), so one ``recv`` takes a whole
request header, segment id and capability (and, in a pipelined batch, the requests behind
it), where reading them one field at a time cost a system call each. A WRITE's payload
goes from the reader into the segment: what the reader already holds of it is copied (at
most ``REQUEST_BUFFER_BYTES``), the rest is received straight into the mapping.

Error handling: a bad frame ends only its own connection (after an error reply where the
format allows one); the server keeps serving every other client. A client that connects and
sends no complete handshake within ``handshake_timeout_s`` is disconnected.

TLS (``tls``): see ``kvstore._tcpserver``; a plain-text client gets AUTH_FAILED ("this data
plane requires TLS") and a close. Over TLS every payload is encrypted and decrypted by this
process: a WRITE still lands in the mapping by ``recv_into``, a READ is sent with one
``sendall`` of the view, with no copy in Python.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from kvstore._principal import principal_for_token
from kvstore._tcpserver import ThreadedTcpServer
from kvstore._tls import TLSConfig
from kvstore._wire import BadHello, data_plane_token, read_hello, tokens_equal
from kvstore.daemon.backends import Backend
from kvstore.daemon.dataplane_commits import (
    CommitRequests, read_commit_tail, read_reserved_tail,
)
from kvstore.daemon.frame_reads import BadFrame, read_exact, read_into
from kvstore.daemon.write_guard import CapabilityRefused, RangeCommitted, WriteGuard
from kvstore.transport import check_batch, checked_read, data_frames
from kvstore.transport.data_frames import Op, Status

log = logging.getLogger("kvstore.daemon.dataplane")

# NOTE: the reader's buffer: a request header, segment id and capability are at most ~600
# bytes and a pipelined batch keeps 16 requests in flight (~3 KiB of READ requests), while a
# WRITE's payload bytes that land here are copied once more: 4 KiB holds the first and
# bounds the second.
REQUEST_BUFFER_BYTES = 4096
_READ, _WRITE, _CHECK_WRITE = int(Op.READ), int(Op.WRITE), int(Op.CHECK_WRITE)
_WRITE_COMMIT = int(Op.WRITE_COMMIT)
_CHECKED_READ = int(Op.CHECKED_READ)
_WRITE_RESERVED = int(Op.WRITE_RESERVED)
_REPLY_OK = int(Status.OK)


@dataclass
class DataPlaneStats:
    """Counters since start. Updated without a lock: exact enough for metrics, never negative."""

    num_connections: int = 0
    num_reads: int = 0
    num_writes: int = 0
    num_errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    num_write_checks: int = 0   # ranges write-checked (before NIXL writes), allowed or not
    num_check_requests: int = 0  # CHECK_WRITE and CHECK_WRITES requests (one per batch)


class DataPlaneServer(CommitRequests, ThreadedTcpServer):
    """Serves the segments given to it over TCP on exactly ``host``:``port`` (0 = pick)."""

    def __init__(self, segments: list[Backend], *, node_id: str, host: str, port: int = 0,
                 token: str | None = None, tls: TLSConfig | None = None,
                 max_connections: int = 1024, handshake_timeout_s: float = 10.0,
                 guard: WriteGuard | None = None):
        super().__init__(host=host, port=port, max_connections=max_connections,
                         name="kvstore-dataplane", log=log,
                         ssl_context=tls.server_context() if tls is not None else None,
                         handshake_timeout_s=handshake_timeout_s)
        self.node_id = node_id
        self._segment_id_to_segment = {s.segment_id.encode(): s for s in segments}
        self._token = token
        self._guard = guard if guard is not None else WriteGuard(node_id)
        # NOTE: tenants' clients present this one (the master hands it to them), so that
        # no tenant needs the cluster token; kvstore/_wire.py data_plane_token
        self._tenant_token = data_plane_token(token) if token else None
        self._handshake_timeout_s = handshake_timeout_s
        self.stats = DataPlaneStats()
        self.address = ""
        # COMMIT handler: (base_seq, body) -> the table's sequence after applying it; set by
        # the daemon once its object table exists (None: COMMIT answered INTERNAL)
        self.on_commit = None
        # CLIENT_COMMIT handler: (body, principal) -> [(index, reason)] of refused entries
        # (daemon/client_commits.py); None: answered INTERNAL like COMMIT
        self.on_client_commit = None
        # WRITE_COMMIT handler: (key, segment_id, offset, length, checksum, capability,
        # principal) -> [(0, reason)] if the commit was refused (client_commits.apply_one);
        # None: answered INTERNAL
        self.on_write_commit = None
        # called before a WRITE is checked (the commit ring's drain, so a ring-committed
        # range is known to the guard); None: no ring
        self.before_write_check = None
        # CHECKED_READ decider (daemon/location_reads.py), set by the daemon once its
        # object table exists; None: every CHECKED_READ is answered LOCATION_OFF
        self.location_reads = None
        # KEYED_READ handler (daemon/keyed_reads.py), set with ``location_reads``; None:
        # a KEYED_READ is a bad frame
        self.keyed_reads = None
        # WRITE_RESERVED handler (daemon/reserved_puts.py), set once the object table
        # exists; None: a WRITE_RESERVED is a bad frame (as on a daemon older than op 18)
        self.reserved_puts = None

    def start(self) -> str:
        """Bind, listen and start accepting; return the bound "host:port"."""
        host, port = self.bind_and_listen()
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    def on_accept(self) -> None:
        self.stats.num_connections += 1

    def plaintext_refusal(self) -> bytes:
        self.stats.num_errors += 1
        return data_frames.encode_reply(Status.AUTH_FAILED, 0, 0,
                                        "this data plane requires TLS: connect with "
                                        "tls=TLSConfig(...)")

    def handle_connection(self, conn: socket.socket, peer: tuple) -> None:
        reader = None
        try:
            data_frames.configure_socket(conn)
            conn.settimeout(self._handshake_timeout_s)
            principal = self._handshake(conn)
            if principal is not None:
                conn.settimeout(None)
                # NOTE: made after the handshake (read unbuffered): a client sends nothing
                # past its hello before the reply, and the timeout above is gone by now
                reader = conn.makefile("rb", buffering=REQUEST_BUFFER_BYTES)
                while self._serve_one(conn, reader, principal):
                    pass
        except BadFrame as exc:
            self.stats.num_errors += 1
            log.warning("data plane: bad frame from %s: %s", peer, exc)
            self._reply_quietly(conn, Status.BAD_FRAME, str(exc))
        except (OSError, data_frames.PeerClosedError) as exc:
            # a peer that vanished (or a stop()) is routine, not an error of ours
            log.debug("data plane: connection from %s ended: %s", peer, exc)
        except Exception:
            self.stats.num_errors += 1
            raise
        finally:
            if reader is not None:  # it holds the descriptor open until closed too
                reader.close()

    def _handshake(self, conn: socket.socket) -> str | None:
        """The connection's principal once its hello is accepted; None if refused."""
        try:
            token = read_hello(lambda n: data_frames.recv_exact(conn, n),
                               data_frames.HELLO_MAGIC, data_frames.PROTOCOL_VERSION)
        except BadHello as exc:
            raise BadFrame(str(exc)) from exc
        if not (tokens_equal(self._token, token) or tokens_equal(self._tenant_token, token)):
            self.stats.num_errors += 1
            log.warning("data plane: wrong token from %s", conn.getpeername())
            self._reply_quietly(conn, Status.AUTH_FAILED, "wrong or missing token")
            return None
        conn.sendall(data_frames.encode_reply(Status.OK, 0, 0, self.node_id))
        return principal_for_token(token)

    def _serve_one(self, conn: socket.socket, reader, principal: str) -> bool:
        """Serve one request; False when the connection must end (clean close or refusal)."""
        header = reader.read(data_frames.REQUEST.size)
        if not header:
            return False  # clean close between requests
        if len(header) < data_frames.REQUEST.size:
            raise data_frames.PeerClosedError(f"peer closed after {len(header)} bytes of "
                                              "a request header")
        magic, op_code, flags, seg_len, request_id, offset, length = \
            data_frames.REQUEST.unpack(header)
        if magic != data_frames.REQUEST_MAGIC:
            raise BadFrame(f"bad request magic {bytes(magic)!r}")
        if op_code != _READ and op_code != _WRITE and op_code != _CHECK_WRITE \
                and op_code != _WRITE_COMMIT and op_code != _CHECKED_READ \
                and (op_code != _WRITE_RESERVED or self.reserved_puts is None):
            return self._serve_control(conn, reader, op_code, flags, seg_len, request_id,
                                       offset, length, principal)
        if not 0 < seg_len <= data_frames.MAX_SEGMENT_ID_BYTES:
            raise BadFrame(f"segment id length {seg_len}")
        segment = self._segment_id_to_segment.get(read_exact(reader, seg_len))
        blob = b""
        if flags & data_frames.FLAG_CAPABILITY:
            (cap_len,) = data_frames.CAPABILITY_LENGTH.unpack(
                read_exact(reader, data_frames.CAPABILITY_LENGTH.size))
            blob = read_exact(reader, cap_len)
        commit_tail = read_commit_tail(reader) if op_code == _WRITE_COMMIT else (
            read_reserved_tail(reader) if op_code == _WRITE_RESERVED else None)
        status, message = Status.OK, ""
        if segment is None:
            status, message = Status.NO_SEGMENT, "no such segment on this node"
        elif not segment.check_range(offset, length):
            status, message = Status.OUT_OF_RANGE, (
                f"range [{offset}, +{length}) outside segment of {segment.size_bytes} bytes")
        elif op_code == _CHECKED_READ:
            status, message = self._check_location(segment, offset, length, blob, principal)
        elif op_code != _READ:
            status, message = self._check_write(segment, offset, length, blob, principal)
        elif self._guard.checking_reads:
            status, message = self._check_read(segment, offset, length, blob, principal)
        if op_code == _CHECK_WRITE:
            # NOTE: no payload follows, so a refusal leaves the connection usable
            self.stats.num_write_checks += 1
            self.stats.num_check_requests += 1
            self.stats.num_errors += status != Status.OK
            conn.sendall(data_frames.encode_reply(status, request_id, 0, message))
            return True
        if status != Status.OK:
            self.stats.num_errors += 1
            conn.sendall(data_frames.encode_reply(status, request_id, 0, message))
            # NOTE: a refused WRITE's payload is still on the wire; we cannot skip a length
            # we do not trust, so the connection ends (WRITE, WRITE_COMMIT). A refused READ
            # or CHECKED_READ leaves it usable.
            return op_code == _READ or op_code == _CHECKED_READ
        if op_code == _WRITE:
            self._receive_into(reader, segment, offset, length)
            conn.sendall(data_frames.REPLY.pack(_REPLY_OK, 0, 0, request_id, 0))
            self.stats.num_writes += 1
            self.stats.bytes_written += length
        elif op_code == _WRITE_COMMIT:
            self._receive_into(reader, segment, offset, length)
            self.stats.num_writes += 1
            self.stats.bytes_written += length
            self._write_commit(conn, segment, offset, length, blob, commit_tail, request_id,
                               principal)
        elif op_code == _WRITE_RESERVED:
            self._receive_into(reader, segment, offset, length)
            self.stats.num_writes += 1
            self.stats.bytes_written += length
            self.reserved_puts.serve(conn, segment.segment_id, offset, length, commit_tail,
                                     request_id, principal)
        else:
            self.send_from(conn, segment, data_frames.REPLY.pack(_REPLY_OK, 0, 0, request_id,
                                                                  length), offset, length)
            self.stats.num_reads += 1
            self.stats.bytes_read += length
        return True

    def _serve_control(self, conn: socket.socket, reader, op_code: int, flags: int,
                       seg_len: int, request_id: int, offset: int, length: int,
                       principal: str) -> bool:
        """PING, COMMIT, CLIENT_COMMIT, CHECK_WRITES, KEYED_READ (daemon/keyed_reads.py);
        BadFrame for any other op."""
        if op_code == Op.PING:
            if seg_len:
                raise BadFrame("PING carries no segment id")
            conn.sendall(data_frames.encode_reply(Status.OK, request_id))
            return True
        if op_code == Op.COMMIT:
            return self._commit(conn, reader, seg_len, request_id, offset, length,
                                bool(flags & data_frames.FLAG_SIGNED))
        if op_code == Op.CLIENT_COMMIT:
            return self._client_commit(conn, reader, seg_len, request_id, length, principal)
        if op_code == Op.CHECK_WRITES:
            return self._check_writes(conn, reader, seg_len, request_id, offset, length,
                                      principal)
        if op_code == Op.KEYED_READ and self.keyed_reads is not None:
            return self.keyed_reads.serve(conn, reader, flags, seg_len, request_id, offset,
                                          length)
        raise BadFrame(f"unknown op {op_code}")

    def _check_writes(self, conn: socket.socket, reader, seg_len: int, request_id: int,
                      count: int, length: int, principal: str) -> bool:
        """Check every range of a CHECK_WRITES body (``check_batch``); one reply listing the
        refused ones. The connection stays usable (no payload follows)."""
        if seg_len:
            raise BadFrame("CHECK_WRITES carries no segment id")
        if length > check_batch.MAX_BODY_BYTES or count > check_batch.MAX_RANGES:
            raise BadFrame(f"CHECK_WRITES of {count} ranges in {length} bytes exceeds "
                           f"{check_batch.MAX_RANGES} ranges or "
                           f"{check_batch.MAX_BODY_BYTES} bytes")
        try:
            ranges = list(check_batch.decode_ranges(read_exact(reader, length)))
        except ValueError as exc:
            raise BadFrame(f"CHECK_WRITES body: {exc}") from exc
        if len(ranges) != count:
            raise BadFrame(f"CHECK_WRITES announces {count} ranges, carries {len(ranges)}")
        # NOTE: the commit ring drained once for the whole batch, not once per range
        if self.before_write_check is not None and self._guard.enforcing:
            self.before_write_check()
        refusals = []
        for index, (segment_id, offset, range_length, blob) in enumerate(ranges):
            segment = self._segment_id_to_segment.get(segment_id)
            if segment is None:
                status, message = Status.NO_SEGMENT, "no such segment on this node"
            elif not segment.check_range(offset, range_length):
                status, message = Status.OUT_OF_RANGE, (
                    f"range [{offset}, +{range_length}) outside segment of "
                    f"{segment.size_bytes} bytes")
            else:
                status, message = self._check_write(segment, offset, range_length, blob,
                                                    principal, drain=False)
            if status != Status.OK:
                refusals.append((index, status, message))
        self.stats.num_write_checks += count
        self.stats.num_check_requests += 1
        self.stats.num_errors += len(refusals)
        payload = check_batch.encode_refusals(refusals)
        data_frames.sendmsg_all(conn, [data_frames.encode_reply(Status.OK, request_id,
                                                                len(payload)), payload])
        return True

    def _check_write(self, segment: Backend, offset: int, length: int, blob: bytes,
                     principal: str, *, drain: bool = True) -> tuple[Status, str]:
        """(OK, "") if the guard allows the write, else the refusal's status and reason.
        ``drain``: drain the commit ring first (a batch drains it once)."""
        if drain and self.before_write_check is not None and self._guard.enforcing:
            self.before_write_check()
        try:
            self._guard.check(segment.segment_id, offset, length, blob, principal)
        except CapabilityRefused as exc:
            log.warning("data plane: write of %s [%d, +%d) refused: %s", segment.segment_id,
                        offset, length, exc)
            return Status.CAPABILITY_REFUSED, str(exc)
        except RangeCommitted as exc:
            log.warning("data plane: write of %s [%d, +%d) refused: %s", segment.segment_id,
                        offset, length, exc)
            return Status.RANGE_COMMITTED, str(exc)
        return Status.OK, ""

    def _check_read(self, segment: Backend, offset: int, length: int, blob: bytes,
                    principal: str) -> tuple[Status, str]:
        """(OK, "") if the guard allows the READ, else CAPABILITY_REFUSED and the reason."""
        try:
            self._guard.check_read(segment.segment_id, offset, length, blob, principal)
        except CapabilityRefused as exc:
            log.warning("data plane: read of %s [%d, +%d) refused: %s", segment.segment_id,
                        offset, length, exc)
            return Status.CAPABILITY_REFUSED, str(exc)
        return Status.OK, ""

    def _check_location(self, segment: Backend, offset: int, length: int, blob: bytes,
                        principal: str) -> tuple[Status, str]:
        """(OK, "") if a CHECKED_READ may be served (``location_reads`` allows it, then the
        read capability it carries), else the refusal; BadFrame for an identity that does
        not parse."""
        try:
            key, checksum, capability = checked_read.decode_identity(blob)
        except ValueError as exc:
            raise BadFrame(f"CHECKED_READ identity: {exc}") from exc
        decider = self.location_reads
        if decider is None:
            return Status.LOCATION_OFF, "this node keeps no object table"
        refusal = decider.refusal(key, checksum, segment.segment_id, offset, length)
        if refusal is not None:
            return refusal
        if self._guard.checking_reads:
            try:
                self._guard.check_read(segment.segment_id, offset, length, capability,
                                       principal)
            except CapabilityRefused as exc:
                # NOTE: a large home read (daemon/keyed_reads.py, LOCATED) reads its
                # stripes with the keyed-read capability: it allows what a KEYED_READ of
                # the key would, the object just checked to be in this node's table
                if self._keyed_allows(key, capability):
                    return Status.OK, ""
                log.warning("data plane: read of %s [%d, +%d) refused: %s",
                            segment.segment_id, offset, length, exc)
                return Status.CAPABILITY_REFUSED, str(exc)
        return Status.OK, ""

    def _keyed_allows(self, key: str, capability: bytes) -> bool:
        """Whether ``capability`` is a keyed-read capability valid here for ``key``."""
        try:
            return key.startswith(self._guard.check_keyed(capability))
        except CapabilityRefused:
            return False

    def _receive_into(self, reader, backend: Backend, offset: int, length: int) -> None:
        view = backend.view(offset, length)
        if view is not None:
            read_into(reader, view)
            return
        backend.write_stream(offset, length, lambda piece: read_into(reader, piece))

    def send_from(self, conn: socket.socket, backend: Backend, header: bytes, offset: int,
                   length: int) -> None:
        view = backend.view(offset, length)
        if view is not None:
            data_frames.sendmsg_all(conn, [header, view])
            return
        conn.sendall(header)
        backend.read_stream(offset, length, conn.sendall)

    @staticmethod
    def _reply_quietly(conn: socket.socket, status: Status, message: str) -> None:
        try:
            conn.settimeout(1.0)
            conn.sendall(data_frames.encode_reply(status, 0, 0, message))
        except OSError:
            pass
