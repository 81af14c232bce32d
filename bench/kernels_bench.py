"""Kernel benchmark (``make bench`` runs it): ``kvstore bench kernels`` writing
bench/out/kernels.json; the code lives in kvstore/bench/kernels.py.

    .venv/bin/python bench/kernels_bench.py [--rounds 5] [--device cpu|cuda|all]
                                            [--layout block_first|kv_first] [--num-layers 32]
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvstore.bench.kernels import command

OUT_PATH = Path(__file__).resolve().parent / "out" / "kernels.json"

if __name__ == "__main__":
    command.main(args=["--json", str(OUT_PATH), *sys.argv[1:]], prog_name="kernels_bench.py")
