"""``KeyWatch``: a thread that follows one etcd key through etcd's watch stream
(``/v3/watch`` on the JSON gateway) and calls ``on_change`` on each change of it.

Why a wake-up, not a source of truth: callers (the standby's campaign loop, the leader
followers in ``carrier``) keep reading the key themselves; the watch only makes them look
at once instead of at their next poll, so the polls can be slow (a backstop) and a new
leader is seen within milliseconds of its election, not within a poll interval. A watch
that cannot be held (etcd down, a gateway without streaming) costs only that speed:
``healthy`` says whether one is open, and callers poll faster while it is not.

Mechanism: one HTTP/1.1 connection per stream; the create request names the revision to
start from (one after the last seen), so a stream opened again after an error or an idle
timeout misses no change; etcd answers one JSON object per line (chunked). An idle stream
is re-opened every ``IDLE_S`` (a dead peer that never resets the connection is noticed);
a failed one is retried after ``RETRY_S``. A compacted start revision (etcd answers
``compact_revision``) re-opens from the current revision and reports a change (the caller
reads the key again).

Error handling: never raises; failures are logged once per outage. ``close`` ends the
thread at once (the socket is shut down under the blocked read).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger("kvstore.ha")

#: An idle stream is opened again after this long (seconds).
IDLE_S = 10.0
#: Pause before a failed stream is opened again (seconds).
RETRY_S = 0.5


class KeyWatch:
    """Calls ``on_change()`` (from its thread) whenever ``key`` is written or deleted in the
    etcd at ``url`` (``http://HOST:PORT``), and once after each re-opened stream that may
    have missed changes. Start with ``start()``; ``close()`` stops it."""

    def __init__(self, url: str, key: bytes, on_change: Callable[[], None], *,
                 name: str = "kvstore-etcd-watch"):
        parts = urlsplit(url)
        self._host, self._port = parts.hostname, parts.port or 2379
        self._url = url
        self._key = key
        self._on_change = on_change
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._next_revision = 0          # 0: from now
        self.healthy = False             # a stream is open and answered its create request
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "KeyWatch":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conn = self._conn
        if conn is not None and conn.sock is not None:
            try:                # NOTE: wakes the blocked read; close() alone would not
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        logged = False
        while not self._closed.is_set():
            try:
                self._stream()
                logged = False
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                if self._closed.is_set():
                    break
                self.healthy = False
                if not logged:
                    log.info("etcd watch on %s at %s lost (%s); polling until it is back",
                             self._key.decode(errors="replace"), self._url, exc)
                    logged = True
                self._changed()        # NOTE: changes may have been missed: look again
                self._closed.wait(RETRY_S)
        self.healthy = False

    def _stream(self) -> None:
        """One watch stream until it ends (idle timeout: returns; error: raises)."""
        create = {"key": base64.b64encode(self._key).decode("ascii")}
        if self._next_revision:
            create["start_revision"] = str(self._next_revision)
        conn = http.client.HTTPConnection(self._host, self._port, timeout=IDLE_S)
        with self._lock:
            if self._closed.is_set():
                return
            self._conn = conn
        try:
            conn.request("POST", "/v3/watch", body=json.dumps({"create_request": create}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise http.client.HTTPException(f"HTTP {response.status}")
            while not self._closed.is_set():
                try:
                    line = response.readline()
                except socket.timeout:
                    return                        # idle: open a fresh stream
                if not line:
                    raise http.client.HTTPException("etcd closed the watch stream")
                self._handle(json.loads(line))
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    def _handle(self, message: dict) -> None:
        if "error" in message and "result" not in message:
            raise ValueError(f"etcd watch error: {message['error']}")
        result = message["result"]
        revision = int(result.get("header", {}).get("revision", 0))
        if result.get("compact_revision"):       # our start revision was compacted away
            self._next_revision = 0
            raise ValueError(f"watch start revision compacted ({result['compact_revision']})")
        if result.get("canceled"):
            raise ValueError(f"etcd canceled the watch: {result.get('cancel_reason', '')}")
        if result.get("created"):
            self.healthy = True
            if revision and not self._next_revision:
                self._next_revision = revision + 1
            self._changed()       # NOTE: a change just before the stream opened: look again
            return
        events = result.get("events", ())
        for event in events:
            self._next_revision = max(self._next_revision,
                                      int(event.get("kv", {}).get("mod_revision", 0)) + 1)
        if events:
            self._changed()

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:  # noqa: BLE001 - a callback's bug must not end the watch
            log.exception("etcd watch callback failed")
