"""Checking the bytes ``kvstore bench`` read back: all of them (``--verify``) or a sample.

A benchmark that reports a fast but wrong path is worse than none, so every case compares
what it read with what it wrote before its figures are kept; a mismatch raises
click.ClickException naming the case and the first differing offset, which aborts the run.
"""

from __future__ import annotations

import click

#: the sample: this many windows of SAMPLE_WINDOW_BYTES, evenly spread, plus the last window
SAMPLE_WINDOWS = 64
SAMPLE_WINDOW_BYTES = 64


def sample_offsets(num_bytes: int) -> list[int]:
    """Start offsets of the sampled windows of a value of ``num_bytes`` (the first and the
    last window always among them)."""
    if num_bytes <= SAMPLE_WINDOWS * SAMPLE_WINDOW_BYTES:
        return [0]  # small enough: one window covering everything (see check_bytes)
    step = (num_bytes - SAMPLE_WINDOW_BYTES) // SAMPLE_WINDOWS
    return sorted({i * step for i in range(SAMPLE_WINDOWS)} | {num_bytes - SAMPLE_WINDOW_BYTES})


def check_bytes(expected, actual, *, verify_all: bool, what: str) -> None:
    """Compare ``actual`` with ``expected`` (uint8 numpy arrays of one length): every byte
    when ``verify_all``, else the sampled windows (all bytes of a value of 4 KiB or less).
    Raises click.ClickException on a length or byte mismatch."""
    import numpy as np

    if expected.nbytes != actual.nbytes:
        raise click.ClickException(f"{what}: read {actual.nbytes} bytes, wrote {expected.nbytes}")
    if verify_all or expected.nbytes <= SAMPLE_WINDOWS * SAMPLE_WINDOW_BYTES:
        differ = np.flatnonzero(expected != actual)
        if differ.size:
            raise click.ClickException(
                f"{what}: bytes read differ from bytes written: {differ.size} of "
                f"{expected.nbytes} bytes, the first at offset {int(differ[0])}")
        return
    for offset in sample_offsets(expected.nbytes):
        window = slice(offset, offset + SAMPLE_WINDOW_BYTES)
        differ = np.flatnonzero(expected[window] != actual[window])
        if differ.size:
            raise click.ClickException(
                f"{what}: bytes read differ from bytes written at offset "
                f"{offset + int(differ[0])} (sampled check; --verify checks every byte)")
