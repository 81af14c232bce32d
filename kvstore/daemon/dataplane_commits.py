"""The data plane's commit requests (the daemon's side): COMMIT (a change set the master
pushes, durable commit), CLIENT_COMMIT (a writer's own commit of its replicas) and the
commit half of WRITE_COMMIT (a single tcp put's write and commit in one message), and the
tail of WRITE_RESERVED (served by daemon/reserved_puts.py). Each
replies only once what it accepted is durable in the node's object table; the handlers
that apply them are set by the daemon (``on_commit``, ``on_client_commit``,
``on_write_commit``: daemon/server.py); without them a request is answered INTERNAL.
Formats: ``kvstore.transport.data_frames``."""

from __future__ import annotations

import logging
import socket

from kvstore.daemon.backends import Backend
from kvstore.daemon.frame_reads import BadFrame, read_exact
from kvstore.daemon.write_guard import CapabilityRefused
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Status

log = logging.getLogger("kvstore.daemon.dataplane")

_REPLY_OK = int(Status.OK)


def commit_body(reader, op_name: str, seg_len: int, length: int) -> bytes:
    """The body of a COMMIT or CLIENT_COMMIT frame (no segment id, at most
    ``MAX_COMMIT_BYTES``); BadFrame otherwise."""
    if seg_len:
        raise BadFrame(f"{op_name} carries no segment id")
    if length > data_frames.MAX_COMMIT_BYTES:
        raise BadFrame(f"{op_name} body of {length} bytes exceeds "
                       f"{data_frames.MAX_COMMIT_BYTES}")
    return read_exact(reader, length)


def read_commit_tail(reader) -> tuple[str, int]:
    """A WRITE_COMMIT's key and checksum (``data_frames.WRITE_COMMIT_TAIL``); BadFrame
    for a key of 0 or over ``MAX_KEY_BYTES`` bytes, or not UTF-8."""
    key_len, checksum = data_frames.WRITE_COMMIT_TAIL.unpack(
        read_exact(reader, data_frames.WRITE_COMMIT_TAIL.size))
    if not 0 < key_len <= data_frames.MAX_KEY_BYTES:
        raise BadFrame(f"WRITE_COMMIT key length {key_len}")
    try:
        return read_exact(reader, key_len).decode(), checksum
    except UnicodeDecodeError as exc:
        raise BadFrame(f"WRITE_COMMIT key is not UTF-8: {exc}") from exc


def read_reserved_tail(reader) -> tuple[str, int, int, str]:
    """A WRITE_RESERVED's (key, checksum, reservation_id, client_id); BadFrame for a key or
    client id of a bad length or not UTF-8, or a reservation id of 0."""
    key_len, checksum = data_frames.WRITE_COMMIT_TAIL.unpack(
        read_exact(reader, data_frames.WRITE_COMMIT_TAIL.size))
    if not 0 < key_len <= data_frames.MAX_KEY_BYTES:
        raise BadFrame(f"WRITE_RESERVED key length {key_len}")
    key_bytes = read_exact(reader, key_len)
    reservation_id, id_len = data_frames.WRITE_RESERVED_TAIL.unpack(
        read_exact(reader, data_frames.WRITE_RESERVED_TAIL.size))
    if not reservation_id:
        raise BadFrame("WRITE_RESERVED names reservation 0")
    if id_len > data_frames.MAX_CLIENT_ID_BYTES:
        raise BadFrame(f"WRITE_RESERVED client id length {id_len}")
    try:
        return (key_bytes.decode(), checksum, reservation_id,
                read_exact(reader, id_len).decode() if id_len else "")
    except UnicodeDecodeError as exc:
        raise BadFrame(f"WRITE_RESERVED key or client id is not UTF-8: {exc}") from exc


def _reply_no_table(conn: socket.socket, request_id: int) -> None:
    """INTERNAL for a commit request on a node whose object table does not exist (yet)."""
    conn.sendall(data_frames.encode_reply(Status.INTERNAL, request_id, 0,
                                          "this node keeps no object table"))


class CommitRequests:
    """The commit requests of ``DataPlaneServer`` (a mixin: it uses the server's ``_guard``,
    ``stats`` and ``on_*`` handlers)."""

    def _commit(self, conn: socket.socket, reader, seg_len: int, request_id: int,
                base_seq: int, length: int, signed: bool) -> bool:
        """Apply a change set from the master (durable commit); reply once it is durable.
        A node with a capability secret applies only pushes its master signed."""
        body = commit_body(reader, "COMMIT", seg_len, length)
        try:
            body = self._guard.verify_commit(base_seq, body, signed)
        except CapabilityRefused as exc:
            self.stats.num_errors += 1
            log.warning("data plane: COMMIT refused: %s", exc)
            conn.sendall(data_frames.encode_reply(Status.CAPABILITY_REFUSED, request_id, 0,
                                                  str(exc)))
            return True
        handler = self.on_commit
        if handler is None:
            _reply_no_table(conn, request_id)
            return True
        try:
            applied_seq = handler(base_seq, body)
        except Exception as exc:  # noqa: BLE001 - a bad body or a failed sync: say so
            self.stats.num_errors += 1
            log.warning("data plane: COMMIT failed: %s", exc)
            conn.sendall(data_frames.encode_reply(Status.INTERNAL, request_id, 0,
                                                  f"commit failed: {exc}"))
            return True
        conn.sendall(data_frames.encode_reply(Status.OK, request_id, applied_seq))
        return True

    def _client_commit(self, conn: socket.socket, reader, seg_len: int, request_id: int,
                       length: int, principal: str) -> bool:
        """Apply a writer's own commit of its replicas; reply once the accepted entries are
        durable, listing the refused ones in the payload."""
        body = commit_body(reader, "CLIENT_COMMIT", seg_len, length)
        handler = self.on_client_commit
        if handler is None:
            _reply_no_table(conn, request_id)
            return True
        try:
            refused = handler(body, principal)
        except ValueError as exc:
            raise BadFrame(str(exc)) from exc
        if refused:
            self.stats.num_errors += 1
            log.warning("data plane: CLIENT_COMMIT refused %d entries, first: %s",
                        len(refused), refused[0][1])
        payload = "".join(f"{i}\t{reason}\n" for i, reason in refused).encode()
        data_frames.sendmsg_all(conn, [data_frames.encode_reply(Status.OK, request_id,
                                                                len(payload)), payload])
        return True

    def _write_commit(self, conn: socket.socket, segment: Backend, offset: int, length: int,
                      blob: bytes, tail: tuple[str, int], request_id: int,
                      principal: str) -> None:
        """Commit a WRITE_COMMIT's object once its payload landed; reply OK only once it
        is in the table, CAPABILITY_REFUSED (the reason) if the commit was refused."""
        handler = self.on_write_commit
        if handler is None:
            _reply_no_table(conn, request_id)
            return
        key, checksum = tail
        refused = handler(key, segment.segment_id, offset, length, checksum, blob, principal)
        if refused:
            self.stats.num_errors += 1
            log.warning("data plane: WRITE_COMMIT of %r refused: %s", key, refused[0][1])
            conn.sendall(data_frames.encode_reply(Status.CAPABILITY_REFUSED, request_id, 0,
                                                  f"commit refused: {refused[0][1]}"))
            return
        conn.sendall(data_frames.REPLY.pack(_REPLY_OK, 0, 0, request_id, 0))
