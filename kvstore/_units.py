"""Parsing of human sizes and durations, shared by every CLI flag and config field."""

from __future__ import annotations

import re

from kvstore._errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str | int) -> int:
    """Parse ``512MiB``, ``4GiB``, ``1.5GB``, ``4096`` (bytes) into a byte count.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB)
    powers of 1000; units are case-insensitive. Raises ConfigError for anything else,
    for negative sizes, and for fractional byte counts.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"size must be >= 0, got {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"invalid size {text!r}: expected e.g. 512MiB, 4GiB, 1.5GB or bytes")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ConfigError(f"invalid size unit {unit!r} in {text!r}")
    value = float(number) * multiplier
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str | float | int) -> float:
    """Parse ``10s``, ``250ms``, ``2m``, ``1.5`` (seconds) into seconds (float, >= 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _SIZE_RE.match(str(text))
        if not match or match.group(2).lower() not in _DURATION_UNITS:
            raise ConfigError(f"invalid duration {text!r}: expected e.g. 10s, 250ms, 2m")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if seconds < 0:
        raise ConfigError(f"duration must be >= 0, got {text!r}")
    return seconds


def format_size(num_bytes: float) -> str:
    """Render a byte count for humans: ``4.00 GiB``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
