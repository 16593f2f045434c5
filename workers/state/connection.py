"""The Redis connection: the real server at REDIS_URL, or an in-process fakeredis (embedded mode)."""

from __future__ import annotations

from functools import cache

import redis

from config.settings import get_settings


@cache
def get_redis() -> redis.Redis:
    """Shared client for this process (decode_responses on)."""
    url = get_settings().redis_url
    if url is None:
        import fakeredis  # embedded mode only: same commands and Lua scripts, in process

        return fakeredis.FakeRedis(decode_responses=True)
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)
