"""The standalone daemon the data-plane tests talk to: a real ``kvstore daemon
--standalone`` process (no master) with one DRAM segment ``dram0``, shared by the modules
that send it raw frames (tests/test_daemon_dataplane.py, test_dataplane_framing.py,
test_tcp_single_reply.py)."""

from __future__ import annotations

import pytest

from servers import ServerProcess


def standalone_daemon_fixture(node_id: str, segment_bytes: int, token: str | None = None):
    """A module-scoped pytest fixture named ``daemon``: one standalone daemon process with
    ``segment_bytes`` of DRAM, registered as ``node_id``, requiring ``token`` in each
    connection's hello (None: no token), stopped after the module's last test. Assign it
    to a module-level name: ``daemon = standalone_daemon_fixture(...)``."""

    @pytest.fixture(scope="module", name="daemon")
    def daemon():
        args = ["daemon", "--standalone", "--dram", str(segment_bytes), "--node-id", node_id]
        if token is not None:
            args += ["--token", token]
        with ServerProcess(args) as server:
            yield server

    return daemon
