"""Real kvstore server processes for tests: ``ServerProcess`` lives in the package
(kvstore/_process.py) because the demo starts its cluster the same way."""

from __future__ import annotations

from pathlib import Path

from kvstore._process import ServerProcess, kvstore_executable

KVSTORE_BIN = Path(kvstore_executable())

__all__ = ["KVSTORE_BIN", "ServerProcess", "kvstore_executable"]
