"""Reclaim what daemons killed without a chance to clean up (SIGKILL, OOM, power) left behind.

Trigger: a daemon's start, before it creates its own segments (``--no-reap-orphans`` turns it
off). Rule: a POSIX shm object in /dev/shm, or an ``.seg`` file in the SSD directory, is an
orphan iff its name is one ``unique_shm_name`` makes with prefix ``kvstore-...``, it carries
*this* machine's host tag, it belongs to our user, and the process id in its name is not
running. Only then is it removed. Edge cases: a pid reused by an unrelated process keeps the
orphan (until that process exits): the safe direction. Another machine's or another user's
segments are never touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kvstore._posix_shm import SHM_NAME_RE, host_tag

log = logging.getLogger("kvstore.daemon.orphans")

SHM_DIR = Path("/dev/shm")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _is_orphan(path: Path, name: str) -> bool:
    match = SHM_NAME_RE.match(name)
    if not match or not match["prefix"].startswith("kvstore-") or match["host"] != host_tag():
        return False
    try:
        if path.stat().st_uid != os.getuid():
            return False
    except OSError:
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not _pid_alive(pid)


def reap_orphans(ssd_dir: str | None = None) -> list[str]:
    """Remove orphaned segments (see the module docstring); return the paths removed.

    Never raises: a directory that cannot be listed or a file that cannot be removed is
    logged and skipped.
    """
    removed: list[str] = []
    candidates: list[tuple[Path, str]] = []
    for directory, suffix in ((SHM_DIR, ""), (Path(ssd_dir) if ssd_dir else None, ".seg")):
        if directory is None:
            continue
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for path in entries:
            if suffix and not path.name.endswith(suffix):
                continue
            candidates.append((path, path.name[:-len(suffix)] if suffix else path.name))
    for path, name in candidates:
        if not _is_orphan(path, name):
            continue
        try:
            path.unlink()
            removed.append(str(path))
        except OSError as exc:
            log.warning("cannot remove orphaned segment %s: %s", path, exc)
    if removed:
        log.info("removed %d orphaned segment(s) of dead daemons: %s", len(removed),
                 ", ".join(removed))
    return removed
