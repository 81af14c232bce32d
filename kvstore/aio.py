"""asyncio variant of the client: ``await kvstore.aio.connect(...)`` / ``kvstore.aio.local(...)``
return an ``AsyncKVStore`` whose methods are the KVStore methods as coroutines.

Design choice: each coroutine runs the synchronous KVStore method on a small thread pool owned
by the store, so the event loop never blocks. NOTE: a native grpc.aio path would only save the
hop to a thread for the master RPC; the transfers themselves are memcpy (shm) or blocking
socket I/O (tcp) that release the GIL either way, and one implementation of the put/get flows
(rather than a sync and an async copy of each) keeps their guarantees in one place. Calls from
many coroutines run concurrently, up to ``max_workers`` at a time (the sync store is
thread-safe). Cancelling a coroutine does not stop its call, which finishes by its deadline.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from kvstore._errors import ClosedError

__all__ = ["AsyncKVStore", "connect", "local"]

DEFAULT_MAX_WORKERS = 4

# KVStore methods exposed as coroutines, one per name.
_ASYNC_METHODS = (
    "put", "batch_put", "get", "batch_get", "get_into", "batch_get_into", "exists",
    "batch_exists", "remove", "remove_prefix", "pin", "unpin", "match_prefix", "stats",
    "register_memory",
)


def _coroutine(name: str) -> Callable[..., Any]:
    from kvstore.client.store import KVStore

    sync_method = getattr(KVStore, name)

    @functools.wraps(sync_method)
    async def method(self: "AsyncKVStore", *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(getattr(self.sync, name), *args, **kwargs)
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        except RuntimeError as exc:  # the executor was shut down by close()
            raise ClosedError("this AsyncKVStore is closed") from exc
        return await future

    return method


class AsyncKVStore:
    """A KVStore for asyncio code: same methods, same guarantees and errors, as coroutines.

    ``sync`` is the underlying KVStore. Close with ``await store.close()`` or
    ``async with``; the caller's buffers passed to ``get_into``/``put`` must stay alive until
    the coroutine returns.
    """

    def __init__(self, store: Any, *, max_workers: int = DEFAULT_MAX_WORKERS):
        self.sync = store
        self._executor = ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="kvstore-aio")

    for _name in _ASYNC_METHODS:
        locals()[_name] = _coroutine(_name)
    del _name

    async def close(self) -> None:
        """Close the store (waiting for calls in flight), then its threads. Idempotent."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._executor.shutdown, True)
        await loop.run_in_executor(None, self.sync.close)

    @property
    def closed(self) -> bool:
        return self.sync.closed

    async def __aenter__(self) -> "AsyncKVStore":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<kvstore.aio.AsyncKVStore {self.sync!r}>"


async def connect(address: str, token: str | None = None, transport: str = "auto",
                  **options: Any) -> AsyncKVStore:
    """``kvstore.connect`` for asyncio (same arguments and errors)."""
    from kvstore.client import connect as sync_connect

    store = await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(sync_connect, address, token, transport, **options))
    return AsyncKVStore(store)


async def local(dram: str | int = "1GiB", ssd: str | None = None,
                **options: Any) -> AsyncKVStore:
    """``kvstore.local`` for asyncio (same arguments and errors)."""
    from kvstore.client import local as sync_local

    store = await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(sync_local, dram, ssd, **options))
    return AsyncKVStore(store)
