"""Readiness: Redis reachable, rule catalog loaded, workers seen recently (heartbeat in Redis)."""

from __future__ import annotations

from functools import cache
from typing import Any

import redis

from config.settings import get_settings
from workers.observability.heartbeat import workers_seen
from workers.state.connection import get_redis

#: Seconds a health or metrics probe waits for Redis (the main client has no timeout).
PROBE_TIMEOUT = 2.0


@cache
def probe_client() -> redis.Redis:
    """A Redis client with short timeouts for probes and scrapes (embedded mode: the in-process one)."""
    url = get_settings().redis_url
    if url is None:
        return get_redis()
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT
    )


def readiness(*, workers: bool = True) -> tuple[bool, dict[str, Any]]:
    """Run the checks (``workers=False``: leave out the heartbeat); returns (ready, body with ``status``,
    ``checks`` and ``reasons``)."""
    from workers.pipeline import get_catalog

    settings = get_settings()
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    client = probe_client()
    redis_ok = False
    try:
        client.ping()
        redis_ok = True
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = "unreachable"
        reasons.append(f"redis: unreachable ({type(exc).__name__})")
    try:
        checks["rules"] = len(get_catalog().rules)
        if not checks["rules"]:
            reasons.append("rules: the catalog is empty")
    except Exception as exc:  # a refused catalog: the reason names the file and the problem
        checks["rules"] = 0
        reasons.append(f"rules: catalog not loaded ({exc})")
    if not workers:
        pass
    elif settings.redis_url is None:
        checks["workers"] = "embedded (tasks run in process)"
    elif redis_ok:
        try:
            seen = workers_seen(client, settings.worker_heartbeat_max_age)
            checks["workers"] = len(seen)
            if not seen:
                reasons.append(f"workers: no worker heartbeat in the last {settings.worker_heartbeat_max_age:.0f} s")
        except redis.RedisError as exc:
            checks["workers"] = "unknown"
            reasons.append(f"workers: heartbeat unreadable ({type(exc).__name__})")
    else:
        checks["workers"] = "unknown"
        reasons.append("workers: unknown (redis unreachable)")
    body = {"status": "ready" if not reasons else "not-ready", "checks": checks, "reasons": reasons}
    return not reasons, body
