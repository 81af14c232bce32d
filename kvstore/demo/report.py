"""The demo's table: one column per request, one line per measurement of ``demo.run``."""

from __future__ import annotations

from typing import Any

from kvstore._units import format_size
from kvstore.demo.run import DemoConfig


def report(rows: list[dict[str, Any]], config: DemoConfig) -> str:
    """The demo's table: one column per request."""
    def prefix(row: dict[str, Any]) -> str:
        computed = row["num_tokens"] - row["prefix_hit_tokens"]
        return f"{row['prefix_hit_tokens']} / {computed}"

    def match(row: dict[str, Any]) -> str:
        same = row["num_equal"] == row["num_generated"]
        return f"{'yes' if same else 'no'} ({row['num_equal']}/{row['num_generated']})"

    def share_of_copy(row: dict[str, Any]) -> str:
        # NOTE: each side's ceiling is a memcpy of the bytes it moved, measured in its own
        # process (pd_worker.copy_gbps); issue 15 asks >= 0.5x
        shares = [row[f"{side}_gbps"] / row[f"{side}_copy_gbps"]
                  if row[f"{side}_copy_gbps"] else 0.0 for side in ("save", "load")]
        return f"{shares[0]:.3g} / {shares[1]:.3g}"  # 3 digits: tiny demos move KiB

    lines = [
        ("prompt tokens", lambda r: f"{r['num_tokens']}"),
        ("prefill: tokens loaded / computed", prefix),
        ("KV bytes raw", lambda r: format_size(r["raw_bytes"])),
        ("KV bytes on the wire", lambda r: format_size(r["wire_bytes"])),
        ("prefill time", lambda r: f"{r['prefill_s'] * 1e3:.0f} ms"),
        ("save time (prefill side)", lambda r: f"{r['save_s'] * 1e3:.1f} ms"),
        ("load time (decode side)", lambda r: f"{r['load_s'] * 1e3:.1f} ms"),
        ("decode: tokens loaded", lambda r: f"{r['loaded_tokens']}"),
        ("transfer GB/s (save / load)", lambda r: f"{r['save_gbps']:.2f} / {r['load_gbps']:.2f}"),
        ("x of a memcpy of the bytes (save / load)", share_of_copy),
        ("time to first token", lambda r: f"{r['ttft_s'] * 1e3:.0f} ms"),
        ("KV moving share of TTFT", lambda r: f"{100 * r['move_s'] / r['ttft_s']:.1f} %"),
        ("decode tokens/s", lambda r: f"{r['decode_tps']:.1f}"),
        ("tokens equal single-process", match),
    ]
    if config.quantize:
        lines += [
            ("first-step logit rel. error", lambda r: f"{r['logit_rel_error']:.2e}"),
            ("first-step logit max abs error", lambda r: f"{r['logit_max_abs_error']:.2e}"),
            ("token agreement (common prefix)",
             lambda r: f"{100 * r['num_equal'] / r['num_generated']:.1f} %"),
        ]
    width = max(len(label) for label, _ in lines)
    columns = [[fn(row) for row in rows] for _, fn in lines]
    col_width = max(14, *(len(cell) for cells in columns for cell in cells))
    header = f"{'':{width}}  " + "  ".join(f"{r['name']:>{col_width}}" for r in rows)
    out = [f"kvstore demo: quantize={config.quantize or 'none'}, block size {config.block_size}",
           header, "-" * len(header)]
    for (label, _), cells in zip(lines, columns):
        out.append(f"{label:{width}}  " + "  ".join(f"{c:>{col_width}}" for c in cells))
    return "\n".join(out)
