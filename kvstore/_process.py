"""Start ``kvstore`` server processes and wait until they serve (the demo, ``kvstore bench``,
examples, tests).

``ServerProcess`` runs ``kvstore <subcommand> ...``, reads the one ``listening on HOST:PORT``
line the server prints on stdout before it serves, and keeps draining stdout afterwards so a
chatty server never blocks on a full pipe. stderr goes to a temporary log file whose text is
quoted when the server fails to start. ``close()`` terminates it (SIGTERM, then SIGKILL after
a grace period) and reaps it; ``kill()`` is a SIGKILL, a crash as far as its peers can tell.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from kvstore._errors import KVStoreError

_LISTENING_RE = re.compile(r"^listening on (\S+):(\d+)\s*$")


def kvstore_executable() -> str:
    """The ``kvstore`` console script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("kvstore")
    if beside.exists():
        return str(beside)
    found = shutil.which("kvstore")
    if found is None:
        raise KVStoreError("the `kvstore` console script is not installed (pip install -e .)")
    return found


class ServerProcess:
    """One running ``kvstore`` server process. Use as a context manager or call ``close()``.

    Raises KVStoreError (with the server's log) if no ``listening on`` line comes within
    ``start_timeout_s``; the process is then already stopped.
    """

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None,
                 start_timeout_s: float = 60.0):
        self.args = [kvstore_executable(), *args]
        self._stderr_file = tempfile.NamedTemporaryFile(prefix="kvstore-server-", suffix=".log",
                                                        delete=False)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                     stderr=self._stderr_file, env=full_env, text=True)
        self._closed_stderr: str | None = None
        self.host, self.port = self._wait_listening(start_timeout_s)
        self.address = f"{self.host}:{self.port}"
        self.stdout_lines: list[str] = []     # what it printed after the listening line
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _wait_listening(self, timeout_s: float) -> tuple[str, int]:
        found: list[tuple[str, int]] = []

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                match = _LISTENING_RE.match(line.strip())
                if match:
                    found.append((match.group(1), int(match.group(2))))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not found:
            self.close()
            raise KVStoreError(f"`{' '.join(self.args[1:])}` printed no 'listening on' line "
                               f"within {timeout_s:.0f}s; its log:\n{self.stderr()[-4000:]}")
        return found[0]

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.stdout_lines.append(line)

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far (its log); still there after close."""
        if self._closed_stderr is not None:
            return self._closed_stderr
        return Path(self._stderr_file.name).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server (a crash, as far as its peers can tell) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self, grace_s: float = 10.0) -> None:
        """Terminate (SIGTERM, then SIGKILL after ``grace_s``) and reap. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._closed_stderr is None:
            self._closed_stderr = self.stderr()
            self._stderr_file.close()
            Path(self._stderr_file.name).unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
