"""PNG plots of ``kvstore bench transfer`` (and ``kvstore plan``) through matplotlib, an
optional extra: ``require_matplotlib`` runs before any measuring, so a missing matplotlib
costs a one-line error naming the install command, not a finished run without its plot."""

from __future__ import annotations

import click

INSTALL_HINT = "pip install 'kvstore[plot]'"


def require_matplotlib():
    """matplotlib.pyplot on the non-interactive Agg backend. Raises click.UsageError naming
    the install command when matplotlib cannot be imported."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise click.UsageError(f"--plot needs matplotlib, which is not installed: "
                               f"{INSTALL_HINT}") from exc
    return plt


def plot_transfer(rows: list[dict], loopback_by_size: dict[int, float],
                  raw_nixl_by_size: dict[int, dict[str, float]],
                  disk_by_size: dict[int, dict[str, float]], path: str, title: str) -> None:
    """GB/s against value size (log scale): one line per (level, transport, mode, op), solid
    for the client level, dotted for the transport level; the memcpy ceiling (best per size
    over the run), the loopback ceiling, the raw NIXL ceilings (WRITE, READ) and the disk's
    (write, read) dashed."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=90)
    lines: dict[tuple, list[tuple[int, float]]] = {}
    ceiling: dict[int, float] = {}
    for row in rows:
        key = (row["level"], row["transport"], row["mode"], row["op"])
        lines.setdefault(key, []).append((row["size_bytes"], row["gbps"]))
        if row["mode"] == "single":
            ceiling[row["size_bytes"]] = max(ceiling.get(row["size_bytes"], 0.0),
                                             row["memcpy_gbps"])
    colors = plt.get_cmap("tab20").colors
    for i, ((level, kind, mode, op), points) in enumerate(sorted(lines.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[i % len(colors)],
                marker="o" if op == "get" else "s", markersize=3,
                linestyle="-" if level == "client" else ":", label=f"{level} {kind} {op} {mode}")
    raw_write = {size: ops["put"] for size, ops in raw_nixl_by_size.items()}
    raw_read = {size: ops["get"] for size, ops in raw_nixl_by_size.items()}
    for name, values in (("memcpy (1 thread, same pattern)", ceiling),
                         ("loopback TCP", loopback_by_size), ("raw NIXL WRITE", raw_write),
                         ("raw NIXL READ", raw_read),
                         ("disk write", {s: d["put"] for s, d in disk_by_size.items()}),
                         ("disk read", {s: d["get"] for s, d in disk_by_size.items()})):
        if values:
            sizes = sorted(values)
            color = {"memcpy": "black", "loopback": "grey", "raw NIXL WRITE": "tab:red",
                     "raw NIXL READ": "tab:purple", "disk write": "tab:brown",
                     "disk read": "tab:olive"}
            ax.plot(sizes, [values[s] for s in sizes], linestyle="--",
                    color=next(c for k, c in color.items() if name.startswith(k)),
                    label=f"ceiling: {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("value size (bytes)")
    ax.set_ylabel("GB/s (1e9 bytes/s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
