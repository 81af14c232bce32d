"""What ``kvstore bench transfer`` prints and writes: the table (every figure beside its
ceiling as a ratio) and the JSON document (every row, the command line, versions and
machine facts)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from kvstore._units import format_size


def _cell(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def link_ceiling(row: dict, loopback_by_size: dict[int, float],
                 raw_nixl_by_size: dict[int, dict[str, float]],
                 disk_by_size: dict[int, dict[str, float]] | None = None) -> float | None:
    """The row's link ceiling in GB/s: the disk (write for puts, read for gets) for ssd rows,
    loopback TCP for tcp rows, raw NIXL of the same op and mode (one value per transfer for
    single rows, the batch in one transfer for batch rows: ``nixl_ceiling``) for nixl rows
    (the row's ``link_gbps``, measured in rounds alternating with its own, where present),
    None for the others."""
    if row["level"] == "ssd":
        return (disk_by_size or {}).get(row["size_bytes"], {}).get(row["op"])
    if row["transport"] == "tcp":
        return loopback_by_size.get(row["size_bytes"])
    if row["transport"] == "nixl":
        if row.get("link_gbps") is not None:      # measured in rounds beside the row's own
            return row["link_gbps"]
        ops = raw_nixl_by_size.get(row["size_bytes"], {})
        if row["mode"] == "batch" and f"{row['op']}_batch" in ops:
            return ops[f"{row['op']}_batch"]
        return ops.get(row["op"])
    return None


def format_table(rows: list[dict], loopback_by_size: dict[int, float],
                 raw_nixl_by_size: dict[int, dict[str, float]] | None = None,
                 disk_by_size: dict[int, dict[str, float]] | None = None) -> str:
    """One line per row: GB/s, the memcpy ceiling and the ratio, the link ceiling and ratio
    (``link_ceiling``), CPU s/GB, p50/p90/p99 latency of one call."""
    header = (f"{'level':<9} {'transport':<9} {'size':>9} {'mode':<6} {'items':>5} {'conc':>4}"
              f" {'op':<4} {'GB/s':>7} {'memcpy':>7} {'%memcpy':>7} {'link':>7} {'%link':>7}"
              f" {'cpu s/GB':>8} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        loopback = link_ceiling(row, loopback_by_size, raw_nixl_by_size or {}, disk_by_size)
        lines.append(
            f"{row['level']:<9} {row['transport']:<9} {format_size(row['size_bytes']):>9} "
            f"{row['mode']:<6} {row['batch_items']:>5} {row['concurrency']:>4} {row['op']:<4} "
            f"{row['gbps']:>7.2f} {row['memcpy_gbps']:>7.2f} "
            f"{100 * row['gbps'] / row['memcpy_gbps']:>6.0f}% {_cell(loopback, '.2f'):>7} "
            f"{_cell(loopback and 100 * row['gbps'] / loopback, '.0f') + ('%' if loopback else ''):>7} "
            f"{_cell(row['cpu_s_per_gb'], '.3f'):>8} {_cell(row.get('p50_us'), '.0f'):>8} "
            f"{_cell(row.get('p90_us'), '.0f'):>8} {_cell(row.get('p99_us'), '.0f'):>8}")
    return "\n".join(lines)


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where /proc/loadavg cannot be read)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def source_tree() -> str:
    """The checkout the running kvstore is imported from: "SHORT_COMMIT (PATH)", or the
    path alone where git cannot say (not a checkout, no git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent.parent
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip() \
            + f" ({root})"
    except (OSError, subprocess.CalledProcessError):
        return str(root)


def machine_facts() -> dict:
    """Host, CPU, memory, OS and the versions of Python, kvstore and the libraries measured."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem_bytes = None
    return {"host": platform.node(), "os": platform.platform(), "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(), "memory_bytes": mem_bytes,
            "python": sys.version.split()[0],
            "versions": {name: version(name) for name in ("kvstore", "numpy", "grpcio",
                                                          "protobuf", "torch")}}


def document(rows: list[dict], loopback_by_size: dict[int, float], settings: dict,
             load_at_start: list[float] | None, interrupted: bool) -> dict:
    """The JSON document of one run."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": sys.argv, "settings": settings, "machine": machine_facts(),
            "loadavg_at_start": load_at_start, "loadavg_at_end": loadavg(),
            "interrupted": interrupted,
            "loopback_gbps": {str(k): v for k, v in loopback_by_size.items()}, "rows": rows}
