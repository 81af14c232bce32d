"""What the benchmarks that compare kvstore trees side by side share: the flags, the rounds
(each round runs the script's ``--child`` once in every interpreter given, one after the
other, so the trees see the same load), the "median (min-max)" cells and the JSON file.

A driver adds its flags with ``add_flags``, runs ``run_rounds`` and prints its own table with
``spread``; ``write_json`` writes ``{"runs": ..., "loadavg": ...}``, the keys every such
benchmark wrote before this module existed.

Errors: a child that exits non-zero ends the driver (SystemExit with the end of its stderr);
its last stdout line must be the JSON object of its figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def add_flags(parser: argparse.ArgumentParser, json_default: str) -> None:
    """``--child`` (hidden: one run in this interpreter), ``--python`` (repeatable: an
    interpreter whose kvstore to measure; default this one), ``--rounds`` and ``--json``."""
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--python", action="append", default=None,
                        help="an interpreter whose kvstore to measure (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=json_default)


def tree_name(python: str) -> str:
    """The checkout an interpreter belongs to (``/work/base2/.venv/bin/python``: base2)."""
    return Path(python).absolute().parent.parent.parent.name


def p50_s(fn, count: int) -> float:
    """The median, in seconds, of ``count`` timed calls ``fn(0)`` .. ``fn(count - 1)``."""
    samples = []
    for i in range(count):
        started = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def load_average() -> list[str]:
    """The 1-, 5- and 15-minute load averages, as /proc/loadavg has them."""
    return Path("/proc/loadavg").read_text().split()[:3]


def run_rounds(script: str, pythons: list[str], rounds: int, child_args: list[str],
               ) -> tuple[dict[str, list[dict]], list[list[str]]]:
    """``rounds`` rounds of ``python script --child *child_args`` for each interpreter in
    turn: its runs' figures per interpreter, and the load average before each run."""
    runs: dict[str, list[dict]] = {python: [] for python in pythons}
    loads = []
    for _ in range(rounds):
        for python in pythons:
            loads.append(load_average())
            done = subprocess.run([python, script, "--child", *child_args],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{python}: the child failed:\n{done.stderr[-3000:]}")
            runs[python].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs, loads


def spread(values, width: int, digits: int) -> str:
    """``median (min-max)`` of ``values``: the median ``width`` wide, all with ``digits``
    decimals."""
    ordered = sorted(values)
    return (f"{statistics.median(ordered):{width}.{digits}f} "
            f"({ordered[0]:.{digits}f}-{ordered[-1]:.{digits}f})")


def write_json(path: str, runs: dict, loads: list) -> None:
    """Write the runs and the load averages to ``path`` (its folder made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"runs": runs, "loadavg": loads}, indent=1))
