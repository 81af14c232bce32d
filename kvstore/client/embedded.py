"""``kvstore.local``: a master and one daemon inside this process, behind a normal KVStore.

The embedded servers are the same code as the ``kvstore master``/``kvstore daemon`` processes
(started with their ``run_in_thread``), bound to 127.0.0.1 on free ports; the store reaches
them through the same gRPC and transports as any client, so what works here works against a
real cluster. Closing the store stops the daemon, then the master.
"""

from __future__ import annotations

from typing import Any

from kvstore._errors import InvalidArgumentError
from kvstore._units import parse_size
from kvstore.client.config import make_config
from kvstore.client.store import KVStore

# The master runs in this process, so registration either works at once or never will.
EMBEDDED_REGISTER_TIMEOUT_S = 10.0


def local(dram: str | int = "1GiB", ssd: str | None = None, **options: Any) -> KVStore:
    """A KVStore over a master and a daemon with ``dram`` bytes of DRAM (and the optional SSD
    tier ``ssd``, "DIR:SIZE") running inside this process.

    ``options`` are those of ``kvstore.connect`` (token, transport, timeout_s, ...) but
    ``tls``: the embedded servers serve plain text on 127.0.0.1 only. Raises ConfigError for
    a bad size or SSD spec, InvalidArgumentError for ``tls``; the servers are stopped if
    startup fails.
    """
    if options.get("tls") is not None:
        raise InvalidArgumentError("kvstore.local serves plain text on 127.0.0.1 only: tls= "
                                   "is for kvstore.connect to a cluster started with "
                                   "--tls-cert")
    from kvstore.daemon.config import DaemonConfig, split_tier_spec
    from kvstore.daemon.server import run_in_thread as run_daemon
    from kvstore.master.config import MasterConfig
    from kvstore.master.server import run_in_thread as run_master

    token = options.pop("token", None)
    transport = options.pop("transport", "auto")
    config = make_config(token, transport, options)
    dram_bytes = parse_size(dram)
    ssd_dir, ssd_bytes = split_tier_spec(ssd, "ssd") if ssd is not None else (None, 0)
    master = run_master(MasterConfig(host="127.0.0.1", port=0, token=config.token))
    stops = [master.stop]
    try:
        daemon = run_daemon(DaemonConfig(
            master_addr=master.address, host="127.0.0.1", port=0, dram_bytes=dram_bytes,
            ssd_dir=ssd_dir, ssd_bytes=ssd_bytes, token=config.token,
            register_timeout_s=EMBEDDED_REGISTER_TIMEOUT_S))
        stops.append(daemon.stop)
        store = KVStore(master.address, config, on_close=stops)
    except BaseException:
        for stop in reversed(stops):
            stop()
        raise
    try:
        store._connect_master()  # the same readiness check in connect and local
    except BaseException:
        store.close()
        raise
    return store

