"""Capabilities: the master's signed permission to write one allocated range (write
capabilities) or to read one replica's range (read capabilities).

Why: the data plane's token proves only that a client belongs to the cluster. Without more,
any such client could WRITE anywhere in a daemon's segments, including over committed
objects of other writers. A capability names exactly one range the master allocated for one
object and one writer, for a limited time, and a daemon can verify it without asking the
master.

Format (little-endian), at most ``MAX_CAPABILITY_BYTES``::

    version u8 (1) | offset u64 | length u64 | expiry_ms u64 | node_seq u64 |
    object_id 16 bytes | writer_len u8 | writer (UTF-8) | mac 16 bytes

``mac`` is keyed BLAKE2b-128 (the node's secret as key) over everything before it plus the
node id and the segment id, so a capability is valid only on the node and segment it was
issued for. ``object_id`` is ``object_id(key)``; ``expiry_ms`` is Unix time in ms (the
master's wall clock; hosts are expected to keep their clocks in sync: skew lengthens or
shortens the window by as much). ``writer`` is the principal the master's auth layer
assigned to the caller (``kvstore._principal``). ``node_seq`` is the node's change sequence
at the master when it issued the capability (the master knew every commit and removal up to
it): a daemon refuses a write over an object committed after that sequence (the capability
is stale: a replay after the put ended, or a range freed and allocated again since), and
trusts the master about objects at or before it (their removal may not have reached the
daemon yet).

Read capabilities have the same format and secret, with ``node_seq`` 0 and the reader's
principal as ``writer``; their MAC also covers the word "read" (``_READ_PURPOSE``), so a
read capability never verifies as a write capability, nor the other way round. The master
issues one per replica in GetReplicas replies, valid for the lease TTL of that call: a
tenant can READ over the data plane only ranges of objects the master let it see.

Batch capabilities (``issue_batch``/``check_batch``, issue 10 10m): one MAC for every
replica one PutStart allocated on one node, for a writer's own commit of them (CLIENT_COMMIT
or a commit-ring record), so the daemon verifies one MAC per batch instead of one per entry.
A separate type from ``Capability`` (a write capability allows a WRITE; a batch capability
allows only the commit of exactly its entries). Format (little-endian)::

    version u8 (2) | expiry_ms u64 | node_seq u64 | count u32 | writer_len u8 | writer |
    mac 16 bytes

``mac`` is keyed BLAKE2b-128 (the node's secret) over ``b"batch\0" + node_id + b"\0"``,
everything before it, and the entries in order: every entry's key, segment id, offset and
size (``_entries_bytes``: a segment table, then packed columns, each length stated), so
changing, adding, dropping or reordering an entry, or presenting it to another node, makes
it fail. ``b"batch"`` keeps it apart from the other MACs: a write capability's body starts
with the byte 1, a commit push's MAC input with ``b"commit"``.

Secrets: ``new_secret()`` per node, made by the master at each registration (so a daemon's
re-registration rotates it) and sent in the registration reply; never written to disk.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import NamedTuple

VERSION = 1
SECRET_BYTES = 32
MAC_BYTES = 16
OBJECT_ID_BYTES = 16
MAX_WRITER_BYTES = 255
#: The writer named in the capabilities of tier moves (the daemon copies on the master's order)
MASTER_WRITER = "kvstore-master"
_FIXED = struct.Struct("<BQQQQ16sB")
MAX_CAPABILITY_BYTES = _FIXED.size + MAX_WRITER_BYTES + MAC_BYTES
#: Where ``expiry_ms`` lies in the fixed part (after version u8, offset u64, length u64).
_EXPIRY_OFFSET = 1 + 8 + 8
_EXPIRY = struct.Struct("<Q")


class Capability(NamedTuple):
    """A decoded, verified capability: the range it allows and for whom."""

    offset: int
    length: int
    expiry_ms: int
    node_seq: int
    object_id: bytes
    writer: str


class CapabilityRefused(Exception):
    """A capability is missing, malformed, forged, for another range or node, or expired.
    ``str()`` is the reason, meant for the refused client."""


def new_secret() -> bytes:
    """A fresh random per-node key."""
    return secrets.token_bytes(SECRET_BYTES)


def object_id(key: str) -> bytes:
    """The object identity a capability binds: a 128-bit digest of the key."""
    return hashlib.blake2b(key.encode(), digest_size=OBJECT_ID_BYTES).digest()


def commit_mac(secret: bytes, node_id: str, base_seq: int, body: bytes) -> bytes:
    """The MAC a master appends to a COMMIT push for ``node_id`` (keyed by the node's
    secret of this registration): only that master, in this registration, can change the
    daemon's object table; a client holding the cluster token, or a deposed master whose
    node has re-registered since, cannot."""
    mac = hashlib.blake2b(b"commit\0" + node_id.encode() + b"\0" +
                          base_seq.to_bytes(8, "little"), key=secret, digest_size=MAC_BYTES)
    mac.update(body)
    return mac.digest()


#: What a read capability's MAC covers beyond a write capability's (see the module docstring).
_READ_PURPOSE = b"read"

#: Keyed BLAKE2b states by secret, copied for each MAC (at most _MAX_KEYED secrets kept).
_keyed: dict[bytes, "hashlib.blake2b"] = {}
_MAX_KEYED = 4096


def _keyed_state(secret: bytes) -> "hashlib.blake2b":
    keyed = _keyed.get(secret)
    if keyed is None:
        if len(_keyed) >= _MAX_KEYED:
            _keyed.clear()     # secrets rotate with registrations; old ones are garbage
        keyed = _keyed[secret] = hashlib.blake2b(key=secret, digest_size=MAC_BYTES)
    return keyed


def _mac(secret: bytes, body: bytes, node_id: str, segment_id: str,
         purpose: bytes = b"") -> bytes:
    # NOTE: copying a keyed state skips the key block's compression: ~1 us of the ~3.5 us a
    # capability costs, paid per replica by PutStart and per entry by a client commit.
    # purpose b"" is the write capabilities' MAC as it was before read capabilities
    mac = _keyed_state(secret).copy()
    mac.update(body)
    mac.update(purpose + b"\0" + node_id.encode() + b"\0" + segment_id.encode())
    return mac.digest()


def issue(secret: bytes, node_id: str, segment_id: str, offset: int, length: int,
          key: str, writer: str, expiry_ms: int, node_seq: int) -> bytes:
    """The capability for writing ``[offset, offset + length)`` of ``segment_id`` on
    ``node_id`` for ``key``'s object, by ``writer``, until ``expiry_ms``, issued when the
    node's change sequence was ``node_seq``. Raises ValueError
    for a writer longer than MAX_WRITER_BYTES (a master-side bug, never user input)."""
    return _issue(secret, node_id, segment_id, offset, length, key, writer, expiry_ms,
                  node_seq, b"")


def issue_many(writer: str, expiry_ms: int, grants) -> list[bytes]:
    """``issue`` for each ``(secret, node_id, segment_id, offset, length, key, node_seq)``
    of ``grants``, all for ``writer`` until ``expiry_ms``; b"" where ``secret`` is empty
    (a node that checks none). The same bytes as ``issue`` (tests/test_capability_batch.py).
    Raises ValueError as ``issue``.

    NOTE: PutStart signs one capability per replica; here the writer's bytes, each secret's
    keyed state, each segment's MAC suffix and each key's object id (a key's replicas follow
    one another) are prepared once per batch instead of once per replica (issue 10, 10p)."""
    principal_bytes = writer.encode()
    if len(principal_bytes) > MAX_WRITER_BYTES:
        raise ValueError(f"principal identity longer than {MAX_WRITER_BYTES} bytes")
    pack, writer_len = _FIXED.pack, len(principal_bytes)
    suffixes: dict[tuple[str, str], bytes] = {}
    keyed_states: dict[bytes, "hashlib.blake2b"] = {}
    last_key, last_id = None, b""
    caps = []
    for secret, node_id, segment_id, offset, length, key, node_seq in grants:
        if not secret:
            caps.append(b"")
            continue
        if key != last_key:
            last_key, last_id = key, object_id(key)
        keyed = keyed_states.get(secret)
        if keyed is None:
            keyed = keyed_states[secret] = _keyed_state(secret)
        suffix = suffixes.get((node_id, segment_id))
        if suffix is None:
            suffix = suffixes[(node_id, segment_id)] = (b"\0" + node_id.encode() + b"\0" +
                                                        segment_id.encode())
        body = pack(VERSION, offset, length, expiry_ms, node_seq, last_id,
                    writer_len) + principal_bytes
        mac = keyed.copy()
        mac.update(body)
        mac.update(suffix)
        caps.append(body + mac.digest())
    return caps


BATCH_VERSION = 2
_BATCH_FIXED = struct.Struct("<BQQIB")
_BATCH_PURPOSE = b"batch\0"
_BATCH_EXPIRY_OFFSET = 1
_BATCH_COUNT_OFFSET = 1 + 8 + 8


class BatchCapability(NamedTuple):
    """A decoded, verified batch capability (``check_batch``)."""

    expiry_ms: int
    node_seq: int
    count: int
    writer: str


def _entries_bytes(segment_ids, offsets, sizes, keys) -> bytes:
    """What a batch MAC covers of its entries: the segment table (count u16, then each
    name's length u8 and UTF-8 bytes, in first-use order), then per entry its segment's
    index (u16), offset (u64), size (u64) and key length (u32) as packed columns, then the
    keys' UTF-8 bytes. NOTE: columns instead of one record per entry: a handful of C calls
    per batch rather than several Python steps per entry."""
    table: dict[str, int] = {}
    indices = [table.setdefault(segment_id, len(table)) for segment_id in segment_ids]
    key_bytes = [key.encode() for key in keys]
    count = len(key_bytes)
    names = [name.encode() for name in table]
    return b"".join((
        struct.pack(f"<H{len(names)}B", len(names), *map(len, names)), *names,
        struct.pack(f"<{count}H{count}Q{count}Q{count}I", *indices, *offsets, *sizes,
                    *map(len, key_bytes)),
        *key_bytes))


def _batch_mac(secret: bytes, node_id: str, body: bytes, entries: bytes) -> bytes:
    mac = _keyed_state(secret).copy()
    mac.update(_BATCH_PURPOSE + node_id.encode() + b"\0")
    mac.update(body)
    mac.update(entries)
    return mac.digest()


def issue_batch(secret: bytes, node_id: str, writer: str, expiry_ms: int, node_seq: int,
                segment_ids, offsets, sizes, keys) -> bytes:
    """The batch capability allowing ``writer`` to commit exactly the entries ``(keys[i],
    segment_ids[i], offsets[i], sizes[i])``, in this order, on ``node_id`` until
    ``expiry_ms``, issued when the node's change sequence was ``node_seq``. Raises
    ValueError for a writer longer than MAX_WRITER_BYTES, more than 65,535 entries or
    segments, or lists of different lengths (master-side bugs, never user input)."""
    principal_bytes = writer.encode()
    if len(principal_bytes) > MAX_WRITER_BYTES:
        raise ValueError(f"principal identity longer than {MAX_WRITER_BYTES} bytes")
    count = len(keys)
    if not (len(segment_ids) == len(offsets) == len(sizes) == count) or count > 0xFFFF:
        raise ValueError("batch capability entries of different lengths or too many")
    body = _BATCH_FIXED.pack(BATCH_VERSION, expiry_ms, node_seq, count,
                             len(principal_bytes)) + principal_bytes
    return body + _batch_mac(secret, node_id, body,
                             _entries_bytes(segment_ids, offsets, sizes, keys))


def batch_count(blob: bytes) -> int:
    """The number of entries a batch capability states, unverified; -1 for a blob that is
    not one. For a holder deciding whether its commit matches the batch."""
    if len(blob) < _BATCH_FIXED.size + MAC_BYTES or blob[0] != BATCH_VERSION:
        return -1
    return struct.unpack_from("<I", blob, _BATCH_COUNT_OFFSET)[0]


def batch_expiry_ms(blob: bytes) -> int:
    """The expiry (Unix ms) a batch capability states, unverified; 0 for a blob that is
    not one (so it reads as expired)."""
    if len(blob) < _BATCH_FIXED.size + MAC_BYTES or blob[0] != BATCH_VERSION:
        return 0
    return _EXPIRY.unpack_from(blob, _BATCH_EXPIRY_OFFSET)[0]


def check_batch(secret: bytes, node_id: str, blob: bytes, writer: str, now_ms: int,
                segment_ids, offsets, sizes, keys) -> BatchCapability:
    """Verify that ``blob`` allows ``writer`` to commit exactly these entries (parallel
    lists, in this order) on ``node_id`` at ``now_ms``. Returns the decoded
    BatchCapability; raises CapabilityRefused naming the reason: malformed, another entry
    count, bad MAC (an entry changed, added, dropped or reordered, or issued for another
    node or registration), expired, another writer. One MAC for the whole batch."""
    if len(blob) < _BATCH_FIXED.size + MAC_BYTES or \
            len(blob) > _BATCH_FIXED.size + MAX_WRITER_BYTES + MAC_BYTES:
        raise CapabilityRefused(f"malformed batch capability ({len(blob)} bytes)")
    version, expiry, node_seq, count, principal_len = _BATCH_FIXED.unpack_from(blob)
    body_len = _BATCH_FIXED.size + principal_len
    if version != BATCH_VERSION or len(blob) != body_len + MAC_BYTES:
        raise CapabilityRefused("malformed batch capability")
    if not (len(segment_ids) == len(offsets) == len(sizes) == len(keys) == count):
        raise CapabilityRefused(f"batch capability is for {count} entries, not "
                                f"{len(keys)}")
    body = blob[:body_len]
    try:
        entries = _entries_bytes(segment_ids, offsets, sizes, keys)
    except struct.error as exc:       # an offset or size out of u64, too many segments
        raise CapabilityRefused(f"batch entries out of range: {exc}") from None
    if not hmac.compare_digest(_batch_mac(secret, node_id, body, entries), blob[body_len:]):
        raise CapabilityRefused("batch capability does not verify (an entry changed, "
                                "added or dropped, or issued for another node or "
                                "registration)")
    if now_ms >= expiry:
        raise CapabilityRefused(f"batch capability expired {now_ms - expiry} ms ago")
    cap_writer = body[_BATCH_FIXED.size:].decode("utf-8", "replace")
    if cap_writer != writer:
        raise CapabilityRefused(f"batch capability belongs to writer {cap_writer!r}")
    return BatchCapability(expiry, node_seq, count, cap_writer)


def issue_read(secret: bytes, node_id: str, segment_id: str, offset: int, length: int,
               key: str, reader: str, expiry_ms: int) -> bytes:
    """The read capability for ``[offset, offset + length)`` of ``segment_id`` on
    ``node_id`` (a replica of ``key``), for ``reader``, until ``expiry_ms``. ValueError as
    ``issue``."""
    return _issue(secret, node_id, segment_id, offset, length, key, reader, expiry_ms, 0,
                  _READ_PURPOSE)


def _issue(secret: bytes, node_id: str, segment_id: str, offset: int, length: int, key: str,
           principal: str, expiry_ms: int, node_seq: int, purpose: bytes) -> bytes:
    principal_bytes = principal.encode()
    if len(principal_bytes) > MAX_WRITER_BYTES:
        raise ValueError(f"principal identity longer than {MAX_WRITER_BYTES} bytes")
    body = _FIXED.pack(VERSION, offset, length, expiry_ms, node_seq, object_id(key),
                       len(principal_bytes)) + principal_bytes
    return body + _mac(secret, body, node_id, segment_id, purpose)


def expiry_ms(blob: bytes) -> int:
    """The expiry (Unix ms) a capability states, unverified; 0 for a blob too short to be
    one (so it reads as expired). For a holder deciding how to use its own capability."""
    if len(blob) < _FIXED.size:
        return 0
    return _EXPIRY.unpack_from(blob, _EXPIRY_OFFSET)[0]


def check(secret: bytes, node_id: str, segment_id: str, blob: bytes, offset: int,
          length: int, writer: str, now_ms: int) -> Capability:
    """Verify that ``blob`` allows ``writer`` to write ``[offset, offset + length)`` of
    ``segment_id`` on ``node_id`` at ``now_ms``; the range may be a part of the
    capability's range (a striped write), never reach outside it.

    Returns the decoded Capability. Raises CapabilityRefused naming the reason: missing,
    malformed, bad MAC (forged, or issued for another node, segment or secret), expired,
    another writer, or a range outside the allowed one.
    """
    return _check(secret, node_id, segment_id, blob, offset, length, writer, now_ms, b"",
                  "write", "per allocated range with PutStart")


def accepted_commits(secret: bytes, node_id: str, writer: str, now_ms: int,
                     segment_ids: list[str], offsets: list[int], lengths: list[int],
                     keys: list[str], blobs: list[bytes]) -> list[int | None]:
    """For each commit entry ``i`` (``keys[i]`` at exactly ``[offsets[i], +lengths[i])`` of
    ``segment_ids[i]`` by ``writer``): the capability's ``node_seq`` when ``blobs[i]``
    passes every test of ``check`` at ``now_ms`` AND states exactly that range and
    ``object_id(keys[i])``; None otherwise (``check`` then names the reason).

    The same predicate as ``check`` plus the exact-range and key tests, per entry; what a
    whole record shares (the keyed state, the node and segment suffix, the writer's bytes,
    the clock) is prepared once. NOTE: ~45% of a ring entry's capability cost at 128
    entries a record (issue 10, 10d); each entry's MAC is still verified."""
    keyed = _keyed_state(secret)
    node_part = b"\0" + node_id.encode() + b"\0"
    suffixes: dict[str, bytes] = {}
    writer_bytes = writer.encode()
    writer_len = len(writer_bytes)
    fixed_size, unpack = _FIXED.size, _FIXED.unpack_from
    min_size, compare = fixed_size + MAC_BYTES, hmac.compare_digest
    accepted: list[int | None] = []
    for segment_id, offset, length, key, blob in zip(segment_ids, offsets, lengths, keys,
                                                     blobs):
        node_seq = None
        if min_size <= len(blob) <= MAX_CAPABILITY_BYTES:
            version, cap_offset, cap_length, expiry, seq, obj_id, principal_len = \
                unpack(blob)
            body_len = fixed_size + principal_len
            if (version == VERSION and len(blob) == body_len + MAC_BYTES
                    and principal_len == writer_len and now_ms < expiry
                    and cap_offset == offset and cap_length == length
                    and blob[fixed_size:body_len] == writer_bytes):
                suffix = suffixes.get(segment_id)
                if suffix is None:
                    suffix = suffixes[segment_id] = node_part + segment_id.encode()
                mac = keyed.copy()
                mac.update(blob[:body_len])
                mac.update(suffix)
                if compare(mac.digest(), blob[body_len:]) and obj_id == object_id(key):
                    node_seq = seq
        accepted.append(node_seq)
    return accepted


def check_read(secret: bytes, node_id: str, segment_id: str, blob: bytes, offset: int,
               length: int, reader: str, now_ms: int) -> Capability:
    """``check`` for a READ: ``blob`` must be a read capability (``issue_read``) allowing
    ``reader`` to read ``[offset, offset + length)`` (or a part of it: a striped read).
    Raises CapabilityRefused naming the reason, as ``check``; a write capability is refused
    here as one that does not verify."""
    return _check(secret, node_id, segment_id, blob, offset, length, reader, now_ms,
                  _READ_PURPOSE, "read", "per replica with GetReplicas")


def _check(secret: bytes, node_id: str, segment_id: str, blob: bytes, offset: int,
           length: int, principal: str, now_ms: int, purpose: bytes, kind: str,
           where: str) -> Capability:
    if not blob:
        raise CapabilityRefused(f"no {kind} capability (the master issues one {where})")
    if len(blob) < _FIXED.size + MAC_BYTES or len(blob) > MAX_CAPABILITY_BYTES:
        raise CapabilityRefused(f"malformed {kind} capability ({len(blob)} bytes)")
    version, cap_offset, cap_length, expiry_ms, node_seq, obj_id, principal_len = \
        _FIXED.unpack_from(blob)
    body_len = _FIXED.size + principal_len
    if version != VERSION or len(blob) != body_len + MAC_BYTES:
        raise CapabilityRefused(f"malformed {kind} capability")
    body = blob[:body_len]
    if not hmac.compare_digest(_mac(secret, body, node_id, segment_id, purpose),
                               blob[body_len:]):
        raise CapabilityRefused(f"{kind} capability does not verify (forged, or issued for "
                                "another node, segment or registration)")
    cap_principal = body[_FIXED.size:].decode("utf-8", "replace")
    if now_ms >= expiry_ms:
        raise CapabilityRefused(f"{kind} capability expired {now_ms - expiry_ms} ms ago")
    if cap_principal != principal:
        role = "writer" if kind == "write" else "reader"
        raise CapabilityRefused(f"{kind} capability belongs to {role} {cap_principal!r}")
    if offset < cap_offset or offset + length > cap_offset + cap_length:
        raise CapabilityRefused(
            f"{kind} capability allows [{cap_offset}, +{cap_length}), not "
            f"[{offset}, +{length})")
    return Capability(cap_offset, cap_length, expiry_ms, node_seq, obj_id, cap_principal)


#: What a keyed-read capability's MAC covers beyond a write capability's.
_KEYED_PURPOSE = b"keyed"


def issue_keyed(secret: bytes, node_id: str, key_prefix: str, expiry_ms: int) -> bytes:
    """The keyed-read capability: the master's permission to read, by name, any key that
    starts with ``key_prefix`` (a tenant's ``{namespace}/``; "" for the cluster principal)
    from ``node_id``'s own object table until ``expiry_ms`` (docs/ARCHITECTURE.md, Home
    reads). The format above with no segment, range 0, the prefix in the principal slot and
    "keyed" under the MAC, so it verifies as no other kind. ValueError as ``issue``."""
    return _issue(secret, node_id, "", 0, 0, "", key_prefix, expiry_ms, 0, _KEYED_PURPOSE)


def check_keyed(secret: bytes, node_id: str, blob: bytes, now_ms: int) -> str:
    """The key prefix a keyed-read capability (``issue_keyed``) allows on ``node_id`` at
    ``now_ms``; CapabilityRefused naming the reason (missing, malformed, forged or of
    another kind, node or registration, expired)."""
    prefix = ""
    if len(blob) >= _FIXED.size:
        prefix_len = blob[_FIXED.size - 1]
        prefix = blob[_FIXED.size:_FIXED.size + prefix_len].decode("utf-8", "replace")
    # NOTE: the prefix read unverified only names what _check then verifies under the MAC
    return _check(secret, node_id, "", blob, 0, 0, prefix, now_ms, _KEYED_PURPOSE,
                  "keyed-read", "per node with GetHomeNodes").writer
