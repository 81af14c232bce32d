"""kvstore.engine holds only what an engine imports: no engine module loads demo or benchmark
code, and TP resharding stands without the connector that calls it (no import circle)."""

from __future__ import annotations

import json
import subprocess
import sys

ENGINE_MODULES = ["keys", "results", "blocks", "tp", "connector", "hf_cache", "hf_connector",
                  "vllm", "sglang"]

_PROBE = """
import json, sys
import kvstore.engine.tp
tp_alone = sorted(m for m in sys.modules if m.startswith("kvstore.engine."))
for name in NAMES:
    __import__("kvstore.engine." + name)
import kvstore.engine
public = {name: getattr(kvstore.engine, name).__module__ for name in kvstore.engine.__all__
          if hasattr(getattr(kvstore.engine, name), "__module__")}
outside = sorted(m for m in sys.modules if m.startswith(("kvstore.demo", "kvstore.bench")))
print(json.dumps({"tp_alone": tp_alone, "outside": outside, "public": public}))
"""


def _probe() -> dict:
    code = _PROBE.replace("NAMES", repr(ENGINE_MODULES))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_engine_modules_load_no_demo_or_bench_code_and_tp_needs_no_connector() -> None:
    probe = _probe()
    assert probe["outside"] == []
    assert "kvstore.engine.connector" not in probe["tp_alone"]
    assert "kvstore.engine.results" in probe["tp_alone"]
    # every public name of kvstore.engine resolves, to a module inside kvstore.engine
    assert probe["public"]["LoadResult"] == probe["public"]["SaveResult"] == "kvstore.engine.results"
    assert probe["public"]["loadable_tokens"] == "kvstore.engine.keys"
    assert all(module.startswith("kvstore.engine.") for module in probe["public"].values())
