"""Shared fixtures. Real servers only: fixtures start `kvstore master`/`kvstore daemon` as
processes on 127.0.0.1 port 0 and read the `listening on HOST:PORT` line they print."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _scrub_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits a KVSTORE_TOKEN from the environment it runs in."""
    monkeypatch.delenv("KVSTORE_TOKEN", raising=False)
