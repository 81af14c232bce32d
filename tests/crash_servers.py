"""Real master and daemon processes on loopback for the durability tests, where a master is
SIGKILLed and restarted on its port and rebuilds its tables from the daemons' inventories:
their argument lists, the wait for the restarted master's adoption of a key (whose failure
message quotes what the master did not adopt and why, and the daemon's registrations), and
a raw data-plane connection past the hello."""

from __future__ import annotations

import socket
import time

from servers import ServerProcess

import kvstore
from kvstore.transport import data_frames
from kvstore.transport.data_frames import Status


def master_process(*args: str, port: int = 0) -> ServerProcess:
    """A master on 127.0.0.1:``port`` (0: any free port) with ``args``."""
    return ServerProcess(["master", "--host", "127.0.0.1", "--port", str(port), *args])


def daemon_process(master: ServerProcess, *args: str) -> ServerProcess:
    """A daemon of ``master`` on 127.0.0.1, any free port, with ``args``."""
    return ServerProcess(["daemon", "--master", master.address, "--host", "127.0.0.1",
                          "--port", "0", *args])


def wait_adopted(master: ServerProcess, key: str, daemon: ServerProcess | None = None,
                 timeout_s: float = 30.0) -> None:
    """Poll with a fresh client until ``master`` (restarted) serves ``key``, adopted from a
    daemon's inventory; AssertionError past ``timeout_s``, quoting ``adoption_log``."""
    deadline = time.monotonic() + timeout_s
    with kvstore.connect(master.address, timeout_s=10) as store:
        while not store.exists(key):
            assert time.monotonic() < deadline, \
                f"{key} was not adopted after the restart; " + adoption_log(master, daemon)
            time.sleep(0.05)  # another process's registration: no clock of ours to advance


def adoption_log(master: ServerProcess, daemon: ServerProcess | None = None) -> str:
    """What ``master`` logged of the inventories it got (adopted, and each item it did not
    adopt with the reason) and what ``daemon`` logged of its registrations and commits."""
    def lines(server, *words):
        return [line for line in server.stderr().splitlines()
                if any(word in line for word in words)][-8:]
    text = f"master: {lines(master, 'adopted', 'refused')}"
    if daemon is not None:
        text += f"; daemon: {lines(daemon, 'registered', 'ring', 'refused', 'COMMIT')}"
    return text


def data_plane(address: str) -> socket.socket:
    """A TCP connection to the data plane at ``address`` past a token-less hello."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(data_frames.encode_hello(None))
    status, _, msg_len, _, _ = data_frames.REPLY.unpack(
        data_frames.recv_exact(sock, data_frames.REPLY.size))
    data_frames.recv_exact(sock, msg_len)
    assert status == Status.OK
    return sock
