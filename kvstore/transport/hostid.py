"""Which machine this is, as far as shared memory is concerned."""

from __future__ import annotations

import functools
import hashlib
import os
import socket

HOST_ID_ENV = "KVSTORE_HOST_ID"


@functools.lru_cache(maxsize=1)
def local_host_id() -> str:
    """A stable id of this machine: equal in two processes iff they can share POSIX shm.

    Derived from the kernel's boot id, /etc/machine-id and the hostname (two containers on one
    kernel usually differ in hostname and in their /dev/shm, so they get different ids). The
    environment variable ``KVSTORE_HOST_ID`` overrides it (read once per process), e.g. to
    make two processes on one machine behave as if on different hosts.
    """
    override = os.environ.get(HOST_ID_ENV)
    if override:
        return override
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path, encoding="ascii") as file:
                parts.append(file.read().strip())
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
