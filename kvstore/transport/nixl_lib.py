"""Loading NIXL (the optional ``kvstore[nixl]`` extra) and creating and releasing its agents.

Shared by the daemon (which registers its segments with an agent) and the client transport.
``load_nixl()`` imports NIXL's API module without importing torch: the ``nixl`` meta package
picks its CUDA flavour by asking torch (on a CPU-only torch it imports torch, ~1-6 s here),
so the flavour modules (``nixl_cu13``, ``nixl_cu12``) are tried directly first, the way the
meta package does when no CUDA stack is loaded.

``load_nixl`` also keeps UCX from loading its EFA module (``UCX_MODULES``): the cause of the
SIGSEGV at exit that issue 12 saw (see ``UCX_MODULES`` below).

Agents are created with a progress thread that sleeps while there is nothing to do
(``PROGRESS_POLL_TIMEOUT_US``): NIXL 1.5.1's Python API hard-codes a poll timeout of 0, which
makes that thread busy-poll a core for as long as the agent lives (~0.64 of a core seen on an
idle ``kvstore daemon --nixl``).

``release_agent`` is the one teardown order for an agent: transfer handles, then memory
registrations, then remote agents, then the agent itself. Every agent made by ``new_agent`` is
also released by an ``atexit`` hook (in that order), so that nothing NIXL or UCX owns is
destroyed by the interpreter's teardown in arbitrary order (see docs/ARCHITECTURE.md,
Transports: exit status).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
import threading
import uuid
from types import ModuleType
from typing import Any

from kvstore._errors import ConfigError

log = logging.getLogger("kvstore.nixl")

# NOTE: tried in this order; nixl_cu13 first as NIXL's own loader does when no CUDA is loaded
_FLAVOURS = ("nixl_cu13", "nixl_cu12")
_MISSING = "NIXL is not installed (pip install 'kvstore[nixl]', see requirements-nixl.txt)"

#: UCX modules loaded by default (``UCX_MODULES``; a value already in the environment wins):
#: all but UCX's AWS EFA module. NOTE: that module links the SYSTEM libibverbs and libnl
#: (it loads wherever the distribution's libibverbs1/ibverbs-providers are installed), beside
#: the copies bundled in the nixl wheel; at exit the system libnl-route's destructors then
#: call into the bundled copy and the process dies with SIGSEGV (139) after ``exit()``
#: (gdb: ``rtnl_tc_unregister`` in ``_dl_fini``). EFA users have NIXL's LIBFABRIC backend.
UCX_MODULES = "^efa"

#: How long the agent's progress thread waits in poll() on its UCX workers' event fds before
#: it progresses them anyway (NIXL's ``nixlAgentConfig.pthrDelay``, rounded up to whole ms by
#: NIXL). NOTE: NIXL's Python API sets 0, and poll(..., 0) returns at once: the thread then
#: spins. With a timeout the thread sleeps until UCX signals work (a peer's wire-up, an active
#: message, a TCP-emulated get), so the passive side (a daemon) costs no CPU while idle; the
#: periodic wake-up is NIXL's own guard against an fd that poll() misses. The initiator's
#: transfers do not wait on this thread: ``check_xfer_state`` progresses the worker itself.
PROGRESS_POLL_TIMEOUT_US = 10_000

_lock = threading.Lock()
_create_lock = threading.Lock()
_config_class: type | None = None
_module: ModuleType | None = None
_load_error: str | None = None
_live_agents: dict[int, "AgentHandle"] = {}


def load_nixl() -> ModuleType:
    """NIXL's ``_api`` module (``nixl_agent``, ``nixl_agent_config``, ...).

    Raises ConfigError with the reason when NIXL is not installed or fails to import.
    """
    global _module, _load_error
    with _lock:
        if _module is not None:
            return _module
        if _load_error is not None:
            raise ConfigError(_load_error)
        # NOTE: NIXL logs every agent and backend creation at INFO; keep that to warnings
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        # NOTE: read by UCX when NIXL's bindings load it (below), so set before the import
        os.environ.setdefault("UCX_MODULES", UCX_MODULES)
        names = ("nixl",) if "torch" in sys.modules else ()
        for name in names + _FLAVOURS:
            try:
                _module = importlib.import_module(f"{name}._api")
                return _module
            except ModuleNotFoundError as exc:
                if exc.name not in (name, f"{name}._api"):
                    _load_error = f"NIXL ({name}) cannot be imported: {exc}"
                    raise ConfigError(_load_error) from exc
            except (ImportError, OSError) as exc:
                _load_error = f"NIXL ({name}) cannot be imported: {exc}"
                raise ConfigError(_load_error) from exc
        _load_error = _MISSING
        raise ConfigError(_load_error)


def nixl_available() -> bool:
    """True if NIXL imports in this process (cached)."""
    try:
        load_nixl()
        return True
    except ConfigError:
        return False


class AgentHandle:
    """One NIXL agent with the UCX backend, and what was registered and loaded through it.

    Not thread-safe by itself: callers serialize their use of ``agent`` (NIXL agents are
    created with sync mode NONE). ``release()`` is idempotent and never raises.
    """

    def __init__(self, name: str):
        api = load_nixl()
        config = api.nixl_agent_config(enable_prog_thread=True, backends=["UCX"])
        try:
            self.agent = _create_agent(api, name, config)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            raise ConfigError(f"cannot create a NIXL agent: {exc}") from exc
        if "UCX" not in self.agent.backends:
            raise ConfigError("NIXL has no UCX backend here (its UCX plugin failed to load)")
        self.name = name
        self.registrations: list[Any] = []
        self.remote_names: set[str] = set()
        self.released = False
        with _lock:
            _live_agents[id(self)] = self

    def register(self, address: int, length: int, mem_type: str = "DRAM",
                 device_id: int = 0) -> Any:
        """Register [address, +length) with the UCX backend; the registration descriptor list.

        Raises ConfigError carrying NIXL's reason when the registration fails.
        """
        try:
            descs = self.agent.register_memory([(address, length, device_id, "")], mem_type)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            raise ConfigError(f"NIXL cannot register {length} bytes of {mem_type} at "
                              f"0x{address:x}: {exc}") from exc
        self.registrations.append(descs)
        return descs

    def register_many(self, ranges: list[tuple[int, int]], mem_type: str = "DRAM",
                      device_id: int = 0) -> Any:
        """Register every ``(address, length)`` of ``ranges`` in one NIXL call; one
        registration descriptor list for all (``deregister`` releases them together).
        NOTE: one call costs about a third of one call per range (16 x 1 MiB, measured
        2026-12-02: 90 vs 250 us for registration plus deregistration at a load of 11).
        Raises ConfigError carrying NIXL's reason when NIXL refuses them."""
        try:
            descs = self.agent.register_memory(
                [(address, length, device_id, "") for address, length in ranges], mem_type)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            raise ConfigError(f"NIXL cannot register {len(ranges)} ranges of {mem_type} "
                              f"({sum(length for _, length in ranges)} bytes): {exc}") from exc
        self.registrations.append(descs)
        return descs

    def deregister(self, descs: Any) -> None:
        """Release one registration made by ``register``. Never raises (logs instead)."""
        if descs in self.registrations:
            self.registrations.remove(descs)
            try:
                self.agent.deregister_memory(descs)
            except Exception as exc:  # noqa: BLE001 - teardown must go on
                log.warning("NIXL deregistration failed: %s", exc)

    def release(self) -> None:
        """Deregister everything, forget remote agents, destroy the agent. Idempotent."""
        with _lock:
            _live_agents.pop(id(self), None)
            if self.released:
                return
            self.released = True
        for descs in list(self.registrations):
            self.deregister(descs)
        for remote in list(self.remote_names):
            try:
                self.agent.remove_remote_agent(remote)
            except Exception as exc:  # noqa: BLE001 - teardown must go on
                log.warning("NIXL cannot forget agent %s: %s", remote, exc)
        self.remote_names.clear()
        # NOTE: dropping the Python agent destroys the C++ agent (its UCX workers and progress
        # thread) now, while the interpreter and the libraries it uses are still whole
        self.agent = None


def _create_agent(api: ModuleType, name: str, config: Any) -> Any:
    """``api.nixl_agent(name, config)`` with ``PROGRESS_POLL_TIMEOUT_US`` as its progress
    thread's poll timeout.

    NOTE: ``nixl_agent.__init__`` builds its ``nixlBind.nixlAgentConfig`` itself and sets
    ``pthrDelay = 0``; no argument reaches that field. For the length of the call the API
    module's ``nixlBind`` is a view of the bindings whose ``nixlAgentConfig`` keeps at least
    our timeout (every other name is the bindings' own), then the module is restored. A NIXL
    without that field gets a plain agent and a warning (its thread may busy-poll).
    """
    bind = getattr(api, "nixlBind", None)
    config_class = _delayed_config_class(bind)
    if config_class is None:
        log.warning("NIXL's bindings have no nixlAgentConfig.pthrDelay: the agent's progress "
                    "thread keeps NIXL's own poll timeout (it may busy-poll a core)")
        return api.nixl_agent(name, config)
    with _create_lock:
        api.nixlBind = _BindingsView(bind, config_class)
        try:
            return api.nixl_agent(name, config)
        finally:
            api.nixlBind = bind


def _delayed_config_class(bind: Any) -> type | None:
    """A ``nixlAgentConfig`` subclass whose ``pthrDelay`` is never set below
    ``PROGRESS_POLL_TIMEOUT_US``; None when the bindings lack the field."""
    global _config_class
    base = getattr(bind, "nixlAgentConfig", None)
    field = getattr(base, "pthrDelay", None) if base is not None else None
    if not isinstance(field, property):
        return None
    if _config_class is None:
        def set_delay(self: Any, delay_us: int) -> None:
            field.__set__(self, max(int(delay_us), PROGRESS_POLL_TIMEOUT_US))
        _config_class = type("DelayedAgentConfig", (base,),
                             {"pthrDelay": property(field.__get__, set_delay)})
    return _config_class


class _BindingsView:
    """NIXL's bindings module with another ``nixlAgentConfig`` (``_create_agent``)."""

    def __init__(self, bind: ModuleType, config_class: type):
        self._bind, self.nixlAgentConfig = bind, config_class

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bind, name)


def new_agent(role: str) -> AgentHandle:
    """An agent named ``kvstore-{role}-{pid}-{random}``: unique per process and per call, so a
    restarted daemon is a new agent to every client."""
    return AgentHandle(f"kvstore-{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@atexit.register
def _release_live_agents() -> None:
    with _lock:
        agents = list(_live_agents.values())
    for handle in agents:
        handle.release()
