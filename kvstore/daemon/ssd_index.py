"""The SSD tier's on-disk index: which objects lie where in the data file, surviving restarts.

Format: an append-only log of records, each aligned to RECORD_ALIGN_BYTES::

    magic "KVI1" | kind u8 (1 add, 2 drop) | codec u8 | key length u16 | frame count u16 |
    offset u64 | length u64 | checksum u64 | crc32 u32 (of everything before it, then the
    key and the frames) | key | frames (u64 offset in the extent, u32 raw bytes, u32 stored
    bytes: the lz4-compressed pieces of the extent, see kvstore.daemon.ssd_frames) | pad

Rules:
- An ``add`` record is appended only after the master committed the object (it arrived in a
  heartbeat change set or a commit push), i.e. after every write of its bytes returned, so
  an object half-written at a daemon crash never has one: it is discarded at restart, never
  served. The record and the data file are then synced together (``SsdBackend.sync``), so
  after a power loss in that window a record may be on disk before its bytes: the
  checksum check at start drops such an object (its put was never acknowledged).
- A ``drop`` record is appended when the master frees the object, and before any write
  overwrites an indexed extent (the master may reuse an extent before the daemon hears of
  the removal).
- Reading (``load_index``): a record whose magic, key length or crc32 is wrong is skipped (the
  reader resynchronises at the next aligned position), so a corrupted record loses that one
  object and a torn record at the end (a crash during an append) loses nothing committed.
  The last record for a key wins.

Thread-safety: none here; ``kvstore.daemon.ssd.SsdBackend`` serialises access.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"KVI1"
KIND_ADD = 1
KIND_DROP = 2
_HEADER = struct.Struct("<4sBBHHQQQ")
_FRAME = struct.Struct("<QII")
_CRC = struct.Struct("<I")
RECORD_ALIGN_BYTES = 64
MAX_KEY_BYTES = 4096


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One committed object in the SSD data file."""

    key: str
    offset: int
    length: int
    checksum: int
    codec: int               # the client's codec (kvstore.v1.Codec), as the master records it
    frames: tuple[tuple[int, int, int], ...] = ()  # (offset in extent, raw, stored) lz4 pieces


def encode_record(kind: int, entry: IndexEntry) -> bytes:
    """One record, padded to RECORD_ALIGN_BYTES."""
    key = entry.key.encode()
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key)} bytes is too long for the SSD index")
    frames = b"".join(_FRAME.pack(*frame) for frame in entry.frames)
    header = _HEADER.pack(MAGIC, kind, entry.codec, len(key), len(entry.frames), entry.offset,
                          entry.length, entry.checksum)
    crc = zlib.crc32(frames, zlib.crc32(key, zlib.crc32(header)))
    record = header + _CRC.pack(crc) + key + frames
    return record + b"\0" * (-len(record) % RECORD_ALIGN_BYTES)


def parse_records(data: bytes) -> tuple[dict[str, IndexEntry], int]:
    """Replay a log: (key -> live entry, number of records skipped as corrupt or torn)."""
    key_to_entry: dict[str, IndexEntry] = {}
    num_bad = 0
    position = 0
    fixed = _HEADER.size + _CRC.size
    view = memoryview(data)
    while position + fixed <= len(data):
        magic, kind, codec, key_len, num_frames, offset, length, checksum = \
            _HEADER.unpack_from(view, position)
        key_end = position + fixed + key_len
        end = key_end + num_frames * _FRAME.size
        if magic != MAGIC or kind not in (KIND_ADD, KIND_DROP) or key_len > MAX_KEY_BYTES \
                or end > len(data):
            if any(view[position:position + RECORD_ALIGN_BYTES]):
                num_bad += 1
            position += RECORD_ALIGN_BYTES
            continue
        (crc,) = _CRC.unpack_from(view, position + _HEADER.size)
        key_bytes = bytes(view[position + fixed:key_end])
        if zlib.crc32(view[key_end:end], zlib.crc32(key_bytes, zlib.crc32(
                view[position:position + _HEADER.size]))) != crc:
            num_bad += 1
            position += RECORD_ALIGN_BYTES
            continue
        try:
            key = key_bytes.decode()
        except UnicodeDecodeError:
            num_bad += 1
            position += RECORD_ALIGN_BYTES
            continue
        if kind == KIND_ADD:
            frames = tuple(_FRAME.unpack_from(view, key_end + i * _FRAME.size)
                           for i in range(num_frames))
            key_to_entry[key] = IndexEntry(key, offset, length, checksum, codec, frames)
        elif (old := key_to_entry.get(key)) is not None and old.offset == offset:
            del key_to_entry[key]
        position = end + (-(end - position) % RECORD_ALIGN_BYTES)
    if position < len(data) and any(view[position:]):
        num_bad += 1  # a record torn by a crash during its append
    return key_to_entry, num_bad


def load_index(path: str) -> tuple[dict[str, IndexEntry], int]:
    """Read and replay the log at ``path`` ({} and 0 when it does not exist)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return {}, 0
    return parse_records(data)


def write_compacted(path: str, entries: list[IndexEntry]) -> None:
    """Replace the log at ``path`` by one ``add`` record per entry, atomically (write a
    temporary file, fsync, rename, fsync the directory)."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"".join(encode_record(KIND_ADD, entry) for entry in entries))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
