"""A writer's own commit of its replicas on this daemon (CLIENT_COMMIT; durable commit's
client-parallel path, issue 10).

Guarantee: ``apply`` returns only once every entry it accepted is in the object table (and,
for SSD, in its synced on-disk index), so the client may count the replica durable: a
master restarted after a crash adopts it from this daemon's inventory. An entry is accepted
only if its write capability (``kvstore/capability.py``, issued by the master's PutStart)
verifies with this node's secret for the connection's principal, names exactly the
committed range and the key's object, and has not expired, or the body's batch capability
(``ClientCommit.batch_capability``, one MAC binding every entry in order) does; then the table's own rules
apply (``ObjectTable.commit_from_client``: no key removed since the capability, no overlap
with an object committed since). A refused entry changes nothing.

Errors: a body that is not a ``ClientCommit`` message, or whose arrays differ in length,
raises ValueError (the data plane answers it BAD_FRAME); a refusal is a per-entry
``(index, reason)``, never an exception.
"""

from __future__ import annotations

from functools import partial

from google.protobuf.message import DecodeError

from kvstore.capability import CapabilityRefused
from kvstore.daemon.objects import CODEC_RAW, ObjectTable, StoredObject
from kvstore.daemon.write_guard import WriteGuard
from kvstore.v1 import master_pb2 as pb

#: StoredObject from a (segment_id, offset, length, checksum, codec) tuple, all in C.
#: NOTE: a NamedTuple's own constructor is a Python function: one frame per entry (~15% of
#: a 128-entry record's apply, issue 10, 10d2)
_stored_object = partial(tuple.__new__, StoredObject)


def apply_one(objects: ObjectTable, guard: WriteGuard, key: str, segment_id: str, offset: int,
              size: int, checksum: int, blob: bytes, writer: str) -> list[tuple[int, str]]:
    """``apply`` of one entry, given as values (a WRITE_COMMIT's, once its payload landed):
    the same checks and table rules; ``[(0, reason)]`` if refused, else empty."""
    (node_seq,) = guard.check_commits([segment_id], [offset], [size], [key], [blob], writer)
    if isinstance(node_seq, CapabilityRefused):
        return [(0, str(node_seq))]
    return objects.commit_from_client(
        [(0, key, StoredObject(segment_id, offset, size, checksum, CODEC_RAW), node_seq)])


def apply(objects: ObjectTable, guard: WriteGuard, body: bytes,
          writer: str) -> list[tuple[int, str]]:
    """Verify and apply one CLIENT_COMMIT body from a connection of ``writer``; return
    ``(index, reason)`` of each refused entry (empty: all committed)."""
    accepted, refused = verify(guard, body, writer)
    if accepted:
        refused.extend(objects.commit_from_client(accepted))
    return refused


def verify(guard: WriteGuard, body: bytes,
           writer: str) -> tuple[list[tuple[int, str, StoredObject, int]], list[tuple[int, str]]]:
    """The capability half of ``apply``: ``(accepted, refused)``, the entries whose
    capability verified as ``ObjectTable.commit_from_client`` takes them, and ``(index,
    reason)`` of the others; nothing applied. ValueError as for ``apply``."""
    try:
        commit = pb.ClientCommit.FromString(body)
    except DecodeError as exc:
        raise ValueError(f"CLIENT_COMMIT body does not parse: {exc}") from exc
    # NOTE: plain lists first: indexing a protobuf repeated field costs more than a list's
    keys, segment_ids = list(commit.keys), list(commit.segment_ids)
    offsets, sizes, checksums = list(commit.offsets), list(commit.sizes), list(commit.checksums)
    blobs, codecs = list(commit.capabilities), list(commit.codecs)
    count = len(keys)
    batch = commit.batch_capability
    if not (len(segment_ids) == len(offsets) == len(sizes) == len(checksums) == count) \
            or len(blobs) not in ((0, count) if batch else (count,)) \
            or len(codecs) not in (0, count):
        raise ValueError("CLIENT_COMMIT arrays of different lengths")
    if not codecs:
        codecs = [CODEC_RAW] * count
    refused: list[tuple[int, str]] = []
    objects_in = map(_stored_object, zip(segment_ids, offsets, sizes, checksums, codecs))
    if batch:
        # NOTE: one MAC for the whole body instead of one per entry (issue 10, 10m); the
        # table's own rules (claim, removed keys) still apply entry by entry below
        try:
            node_seq = guard.check_batch_commit(segment_ids, offsets, sizes, keys, batch,
                                                writer)
        except CapabilityRefused as refusal:
            return [], [(i, str(refusal)) for i in range(count)]
        accepted = list(zip(range(count), keys, objects_in, [node_seq] * count))
    else:
        checked = guard.check_commits(segment_ids, offsets, sizes, keys, blobs, writer)
        accepted = []
        for i, stored in enumerate(objects_in):
            node_seq = checked[i]
            if isinstance(node_seq, CapabilityRefused):
                refused.append((i, str(node_seq)))
                continue
            accepted.append((i, keys[i], stored, node_seq))
    return accepted, refused
