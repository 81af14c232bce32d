"""Run a ``kvstore`` server command (``kvstore daemon ...``, ``kvstore master ...``) with
cProfile in every thread it starts; on SIGUSR2 write the threads' merged profile (pstats
format, one file per thread-name group: the data plane's connection threads, the master's
fast-path threads, everything else) to OUT_PREFIX.GROUP.prof and go on serving.

A tool for bench/daemon_put_profile.py (which starts it, drives puts, signals it, prints
the profiles); runs in the tree whose python runs it.

    .venv/bin/python bench/profiled_server.py OUT_PREFIX daemon --master ... [flags]
"""

from __future__ import annotations

import cProfile
import signal
import sys
import threading


def group_of(name: str) -> str:
    """The thread-name group a profile is merged into."""
    if name.startswith("kvstore-dataplane"):
        return "dataplane"
    if name.startswith("kvstore-master-fast"):
        return "master-fast"
    return "other"


def main() -> None:
    out_prefix, args = sys.argv[1], sys.argv[2:]
    profiles: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()

    def hook(frame, event, arg):
        sys.setprofile(None)
        profile = cProfile.Profile()
        with lock:
            profiles.append((threading.current_thread().name, profile))
        profile.enable()

    def dump(signum, frame):
        import pstats
        with lock:
            taken = list(profiles)
        merged: dict[str, pstats.Stats] = {}
        for name, profile in taken:
            try:
                stats = pstats.Stats(profile)
            except TypeError:
                continue    # nothing recorded in that thread
            group = group_of(name)
            if group in merged:
                merged[group].add(stats)
            else:
                merged[group] = stats
        for group, stats in merged.items():
            stats.dump_stats(f"{out_prefix}.{group}.prof")
        print(f"profiles written: {sorted(merged)}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR2, dump)
    threading.setprofile(hook)
    from kvstore.cli import main as kvstore_main
    sys.argv = ["kvstore", *args]
    kvstore_main()


if __name__ == "__main__":
    main()
