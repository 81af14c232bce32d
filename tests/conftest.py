"""Shared fixtures. Real servers only: fixtures start `kvstore master`/`kvstore daemon` as
processes on 127.0.0.1 port 0 and read the `listening on HOST:PORT` line they print."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _scrub_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test inherits a KVSTORE_TOKEN from the environment it runs in."""
    monkeypatch.delenv("KVSTORE_TOKEN", raising=False)


@pytest.fixture
def etcd():
    """A real etcd on loopback (tests/etcd_server.py); skips where etcd is not installed."""
    from etcd_server import ETCD_BIN, SKIP_REASON, EtcdServer

    if ETCD_BIN is None:
        pytest.skip(SKIP_REASON)
    server = EtcdServer()
    try:
        yield server
    finally:
        server.close()


#: Two tenants, "alpha" and "beta", each with its token and no quota or namespace.
TWO_TENANTS_TOML = """
[[tenant]]
name = "alpha"
token = "alpha-secret"

[[tenant]]
name = "beta"
token = "beta-secret"
"""


@pytest.fixture(scope="session")
def two_tenants_file(tmp_path_factory):
    """A ``--tenants`` file of two tenants (``TWO_TENANTS_TOML``): its path."""
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(TWO_TENANTS_TOML)
    return path
