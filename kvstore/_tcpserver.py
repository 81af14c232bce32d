"""A TCP server with one accept thread and one thread per connection, shared by the daemon's
data plane and the master's fast metadata path.

NOTE: for CPython this beats asyncio for both bulk bytes and small request/reply: blocking
``recv_into``/``sendmsg`` release the GIL for the whole copy, and a blocked thread costs no
event-loop wake-ups per chunk (measured in bench/transfer_bench.py and bench/master_bench.py).

Resource handling: ``bind_and_listen`` binds exactly the given host before it returns (so the
address is known and connections queue), then accepts in a thread; ``stop`` closes the
listener, shuts every open connection down and joins the threads. At most
``max_connections`` connections are served at once; beyond that new ones are closed at once.
Each connection's socket is closed by this class when ``handle_connection`` returns or raises.

Error handling: an exception escaping ``handle_connection`` is logged and ends only that
connection; the server keeps serving every other client.

TLS (``ssl_context`` given): each connection's thread peeks at its first byte (within
``handshake_timeout_s``); a plain-text client (not a TLS handshake record) is sent
``plaintext_refusal()`` in plain text and closed; any other connection does the server-side
handshake, and one that fails (wrong CA, no client certificate under mutual TLS, garbage) is
logged and closed. ``handle_connection`` then sees the TLS socket, as if it were the plain one.
"""

from __future__ import annotations

import abc
import logging
import socket
import ssl
import threading

from kvstore._tls import TLS_HANDSHAKE_BYTE


class ThreadedTcpServer(abc.ABC):
    """Subclasses implement ``handle_connection``; ``name`` labels threads and log lines."""

    def __init__(self, *, host: str, port: int, max_connections: int, name: str,
                 log: logging.Logger, ssl_context: ssl.SSLContext | None = None,
                 handshake_timeout_s: float = 10.0):
        self._ssl_context = ssl_context
        self._handshake_timeout_s = handshake_timeout_s
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._name = name
        self._log = log
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn_to_thread: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()

    @abc.abstractmethod
    def handle_connection(self, conn: socket.socket, peer: tuple) -> None:
        """Serve one connection until it ends. Runs in the connection's own thread."""

    def on_accept(self) -> None:
        """Called in the accept thread for every connection taken on (stats hook)."""

    def plaintext_refusal(self) -> bytes:
        """What a plain-text client of a TLS server is sent before the close: the
        protocol's error frame saying TLS is required."""
        return b""

    def _secure(self, conn: socket.socket, peer: tuple) -> socket.socket | None:
        """The connection after the server-side TLS handshake; None when refused."""
        conn.settimeout(self._handshake_timeout_s)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
            if not first:
                return None     # closed before a byte came
            if first[0] != TLS_HANDSHAKE_BYTE:
                self._log.warning("%s: refusing %s: plain text on a TLS port", self._name, peer)
                conn.sendall(self.plaintext_refusal())
                return None
            return self._ssl_context.wrap_socket(conn, server_side=True)
        except ssl.SSLError as exc:
            self._log.warning("%s: TLS handshake with %s failed: %s", self._name, peer,
                              getattr(exc, "reason", None) or exc)
        except OSError as exc:
            self._log.debug("%s: %s left before the TLS handshake ended: %s", self._name,
                            peer, exc)
        return None

    def bind_and_listen(self) -> tuple[str, int]:
        """Bind exactly (host, port), listen and start accepting; return (host, port) bound.

        Raises OSError (port in use, host not local) with the listener closed.
        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        # NOTE: SO_REUSEADDR lets a restarted server rebind its port past TIME_WAIT; on Linux
        # it still refuses a port another socket listens on (no silent sharing).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self._host, self._port))
            listener.listen(512)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"{self._name}-accept")
        self._accept_thread.start()
        return host, port

    def stop(self) -> None:
        """Stop accepting, disconnect every client, join the threads. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._lock:
            connections = dict(self._conn_to_thread)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in connections.values():
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None and not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                self._log.exception("%s: accept failed", self._name)
                continue
            with self._lock:
                if len(self._conn_to_thread) >= self._max_connections:
                    self._log.warning("%s: refusing %s: %d connections open", self._name, peer,
                                      self._max_connections)
                    conn.close()
                    continue
                thread = threading.Thread(target=self._run_connection, args=(conn, peer),
                                          daemon=True, name=f"{self._name}-{peer[1]}")
                self._conn_to_thread[conn] = thread
            self.on_accept()
            thread.start()

    def _run_connection(self, conn: socket.socket, peer: tuple) -> None:
        served = conn
        try:
            if self._ssl_context is not None:
                served = self._secure(conn, peer)
                if served is None:
                    return
                with self._lock:   # stop() must shut down the socket now in use
                    self._conn_to_thread[served] = self._conn_to_thread.pop(conn)
            self.handle_connection(served, peer)
        except Exception:  # noqa: BLE001 - one connection's bug must not end the server
            self._log.exception("%s: connection from %s failed", self._name, peer)
        finally:
            with self._lock:
                self._conn_to_thread.pop(conn, None)
                self._conn_to_thread.pop(served, None)
            served.close()
            conn.close()
