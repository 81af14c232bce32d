"""Start real kvstore server processes for tests and wait until they serve.

``ServerProcess`` runs ``kvstore <subcommand> ... --port 0``, reads the one
``listening on HOST:PORT`` line the server prints on stdout, and on close terminates it
(SIGTERM, then SIGKILL) and waits. stderr is kept in a file so a failing test can show it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_LISTENING_RE = re.compile(r"^listening on (\S+):(\d+)\s*$")
KVSTORE_BIN = Path(sys.executable).with_name("kvstore")


class ServerProcess:
    """One running ``kvstore`` server process. Use as a context manager or call ``close()``."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None,
                 start_timeout_s: float = 30.0):
        self.args = [str(KVSTORE_BIN), *args]
        self._stderr_file = tempfile.NamedTemporaryFile(prefix="kvstore-test-", suffix=".log",
                                                        delete=False)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                     stderr=self._stderr_file, env=full_env, text=True)
        self.host, self.port = self._wait_listening(start_timeout_s)
        self.address = f"{self.host}:{self.port}"
        # keep draining stdout so a chatty server never blocks on a full pipe
        self._stdout_lines: list[str] = []
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()

    def _wait_listening(self, timeout_s: float) -> tuple[str, int]:
        result: list[tuple[str, int]] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                match = _LISTENING_RE.match(line.strip())
                if match:
                    result.append((match.group(1), int(match.group(2))))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not result:
            self.close()
            raise RuntimeError(f"{' '.join(self.args)} did not print 'listening on' within "
                               f"{timeout_s}s; stderr:\n{self.stderr()}")
        return result[0]

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._stdout_lines.append(line)

    def stderr(self) -> str:
        return Path(self._stderr_file.name).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server (a crash, as far as its peers can tell) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._stderr_file.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
