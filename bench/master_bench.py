"""Master benchmark (``make bench`` runs it): ``kvstore bench master`` writing
bench/out/master_bench.json; the code lives in kvstore/bench/master.py.

    .venv/bin/python bench/master_bench.py [--quick] [--modes threads,aio] [--paths grpc,fast]
                                           [--seconds S]
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvstore.bench.master import command

OUT_PATH = Path(__file__).resolve().parent / "out" / "master_bench.json"

if __name__ == "__main__":
    command.main(args=["--json", str(OUT_PATH), *sys.argv[1:]], prog_name="master_bench.py")
