"""The asyncio Redis client of the API process (``redis.asyncio``), for Redis calls made on the event loop.

One client per event loop (an asyncio connection pool belongs to the loop that created it; tests start several
loops). Embedded mode (no ``REDIS_URL``) shares the in-process fakeredis server of
``workers.state.connection.get_redis``, so both clients see the same data.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import redis.asyncio

from config.settings import get_settings
from workers.state.connection import get_redis

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[int, Any]] = weakref.WeakKeyDictionary()


def _new_client() -> Any:
    url = get_settings().redis_url
    if url is None:
        import fakeredis  # embedded mode only

        sync = get_redis()
        connection = sync.connection_pool.get_connection()
        try:
            server = connection._server  # the FakeServer holding the embedded data
        finally:
            sync.connection_pool.release(connection)
        return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    return redis.asyncio.Redis.from_url(url, decode_responses=True, health_check_interval=30)


def get_async_redis() -> redis.asyncio.Redis:
    """The asyncio client of the running event loop (created on first use)."""
    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    sync_id = id(get_redis())  # a new process-wide client (settings changed in tests) -> a new async one too
    if found is None or found[0] != sync_id:
        found = _clients[loop] = (sync_id, _new_client())
    return found[1]


def reset_async_redis() -> None:
    """Forget the clients (tests that change the settings)."""
    _clients.clear()
