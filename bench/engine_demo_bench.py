"""The PD demo's table at several prompt lengths (``python bench/demo_bench.py``).

Runs ``kvstore demo`` (its ``run_demo``: a real master and daemon, a prefill and a decode
process) once per prompt length, lossless, plus one INT8 run at 2,048 tokens, prints each
table and writes every row to bench/out/demo_bench.json. The figure to watch is the share of
time to first token spent moving KV (save + load), target < 10 % at 2,048 tokens.

Flags: ``--sizes 512,2048,8192`` (default), ``--no-int8``, ``--out PATH``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvstore.demo.report import report
from kvstore.demo.run import DemoConfig, run_demo

OUT = Path(__file__).resolve().parent / "out" / "demo_bench.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,2048,8192")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    runs = [DemoConfig(prompt_tokens=int(n), decode_tokens=args.decode_tokens)
            for n in args.sizes.split(",")]
    if not args.no_int8:
        runs.append(DemoConfig(prompt_tokens=2048, decode_tokens=args.decode_tokens,
                               quantize="int8"))
    results = []
    for config in runs:
        started = time.perf_counter()
        rows = run_demo(config, echo=lambda m: None)
        print(report(rows, config), f"\n(run took {time.perf_counter() - started:.0f} s)\n",
              flush=True)
        results.append({"config": config.__dict__, "rows": rows})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "runs": results}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
