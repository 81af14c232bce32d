"""The SSD tier's directory: its files, the checks at start, and the replay of its index.

Files in the ``--ssd`` directory (stable names, so a restarted daemon finds them; the orphan
reaper only removes names that embed a dead pid, never these):

- ``kvstore-ssd.data`` (DATA_NAME): the extents, at the offsets the master's allocator
  hands out. Preallocated (posix_fallocate) at first start (``open_data``), then pre-written
  with zeros in the background (``kvstore.daemon.ssd_prewrite``). Opened with O_DIRECT where
  the filesystem allows (tmpfs does not); otherwise buffered, said in the log.
- ``kvstore-ssd.index`` (INDEX_NAME): committed objects (``kvstore.daemon.ssd_index``).
- ``kvstore-ssd.json`` (META_NAME): format, size and the node id that owns the directory.
- ``kvstore-ssd.lock`` (LOCK_NAME): an flock held while a daemon uses the directory
  (``take_lock``: a second daemon on the same directory fails at start).
- ``kvstore-ssd.prewrite`` (PREWRITE_NAME): while the data file's pre-write is unfinished,
  how far it got (``read_prewrite_progress``/``save_prewrite_progress``), so a restarted
  daemon resumes it; removed when the pass is complete.

Errors: ConfigError for a directory locked by another daemon, an unreadable meta file, a
size or format that differs from the one the directory was created with, or a data file
that cannot be allocated; OSError otherwise.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Callable

from kvstore._errors import ConfigError
from kvstore.daemon.aligned_io import BLOCK_BYTES, open_direct
from kvstore.daemon.ssd_index import IndexEntry, load_index, write_compacted

# NOTE: the backend's logger: these lines are the SSD backend's start, whichever module
log = logging.getLogger("kvstore.daemon.ssd")

DATA_NAME = "kvstore-ssd.data"
INDEX_NAME = "kvstore-ssd.index"
META_NAME = "kvstore-ssd.json"
LOCK_NAME = "kvstore-ssd.lock"
PREWRITE_NAME = "kvstore-ssd.prewrite"
FORMAT_VERSION = 1


def recorded_node_id(directory: str) -> str | None:
    """The node id that owns ``directory`` (from a previous start), or None."""
    try:
        return json.loads((Path(directory) / META_NAME).read_text())["node_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def take_lock(directory: Path) -> int:
    """Take the directory's flock; returns its fd (the caller closes it to release).
    ConfigError if another daemon holds it."""
    fd = os.open(directory / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise ConfigError(f"--ssd: directory {str(directory)!r} is in use by another "
                          f"daemon") from exc
    return fd


def check_meta(directory: Path, size_bytes: int, node_id: str) -> None:
    """Check the meta file of a directory used before (same format and size: ConfigError
    otherwise; another node id is adopted, with a warning), then write it for ``node_id``
    (atomically: temporary file and rename)."""
    meta_path = directory / META_NAME
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ConfigError(f"--ssd: unreadable {meta_path}: {exc}") from exc
        if meta.get("format") != FORMAT_VERSION or meta.get("size_bytes") != size_bytes:
            raise ConfigError(
                f"--ssd: {str(directory)!r} holds a store of {meta.get('size_bytes')} "
                f"bytes (format {meta.get('format')}); start with that size or an empty "
                f"directory")
        if meta.get("node_id") != node_id:
            log.warning("SSD directory %s belonged to node %s; node %s adopts its objects",
                        directory, meta.get("node_id"), node_id)
    meta = {"format": FORMAT_VERSION, "size_bytes": size_bytes, "node_id": node_id}
    temporary = meta_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(meta))
    os.chmod(temporary, 0o600)
    os.replace(temporary, meta_path)


def open_data(data_path: Path, size_bytes: int,
              direct_io: bool) -> tuple[int, bool, bool]:
    """Open the data file, creating and preallocating it (whole blocks) if it is smaller;
    returns (fd, whether it is open with O_DIRECT: only if ``direct_io`` and the
    filesystem takes it, whether the file was created now: empty before, so nothing in it
    may be kept)."""
    file_bytes = -(-size_bytes // BLOCK_BYTES) * BLOCK_BYTES
    fd = os.open(data_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.fchmod(fd, 0o600)
        created = os.fstat(fd).st_size == 0
        if os.fstat(fd).st_size < file_bytes:
            os.ftruncate(fd, file_bytes)
            try:
                os.posix_fallocate(fd, 0, file_bytes)
            except OSError as exc:
                raise ConfigError(f"--ssd: cannot allocate {file_bytes} bytes in "
                                  f"{data_path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if direct_io:
        data_fd, direct = open_direct(str(data_path), os.O_RDWR)
    else:
        data_fd, direct = os.open(data_path, os.O_RDWR), False
    if direct_io and not direct:
        log.warning("SSD %s: O_DIRECT refused by the filesystem; using buffered I/O "
                    "through the page cache", data_path)
    log.info("SSD %s: %d bytes, %s I/O", data_path, size_bytes,
             "direct" if direct else "buffered")
    return data_fd, direct, created


def read_prewrite_progress(directory: Path) -> int | None:
    """Where the data file's unfinished pre-write goes on (bytes), or None: no note (the
    pass completed, or never started), or one that does not parse (logged)."""
    path = directory / PREWRITE_NAME
    try:
        next_bytes = json.loads(path.read_text())["next_bytes"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("SSD %s: unreadable pre-write note, not resumed: %s", path, exc)
        return None
    if not isinstance(next_bytes, int) or next_bytes < 0:
        log.warning("SSD %s: bad pre-write note %r, not resumed", path, next_bytes)
        return None
    return next_bytes


def save_prewrite_progress(directory: Path, next_bytes: int, file_bytes: int) -> None:
    """Note that the pre-write got to ``next_bytes`` (atomically: temporary file and
    rename), or remove the note once it reached ``file_bytes``. NOTE: not fsynced: a note
    lost or older after a crash only makes the next start zero regions again, which is safe
    (``kvstore.daemon.ssd_prewrite``); a note is never ahead of the zeros."""
    path = directory / PREWRITE_NAME
    if next_bytes >= file_bytes:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_suffix(".tmp-prewrite")
    temporary.write_text(json.dumps({"next_bytes": next_bytes}))
    os.replace(temporary, path)


def replay_index(index_path: str,
                 check_entry: Callable[[IndexEntry, int], str]) -> tuple[list[IndexEntry], int]:
    """Replay the index, keep the entries ``check_entry(entry, end of the previous kept
    entry)`` accepts (it returns "" or the reason to drop one, logged), in offset order, and
    compact the index to them. Returns (kept entries, number dropped by the check); corrupt
    or torn records are skipped (logged)."""
    key_to_entry, num_bad = load_index(index_path)
    if num_bad:
        log.warning("SSD index %s: %d corrupt or torn record(s) skipped", index_path, num_bad)
    kept: list[IndexEntry] = []
    num_dropped = 0
    end = 0
    for entry in sorted(key_to_entry.values(), key=lambda e: e.offset):
        reason = check_entry(entry, end)
        if reason:
            num_dropped += 1
            log.warning("SSD: dropping object %r at [%d, +%d): %s", entry.key,
                        entry.offset, entry.length, reason)
            continue
        kept.append(entry)
        end = entry.offset + entry.length
    write_compacted(index_path, kept)
    if key_to_entry:
        log.info("SSD: recovered %d object(s), dropped %d", len(kept), num_dropped + num_bad)
    return kept, num_dropped
