"""Worker heartbeats: a timestamp per worker in Redis (for the API's ``/readyz`` and the
``ehr_alerts_workers_alive`` gauge) and a file touched on each beat (for Kubernetes' liveness probe,
``ehr-alerts worker-alive``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from workers.observability.metrics import heartbeat_key

#: Heartbeats older than this are pruned from Redis (workers that went away).
_PRUNE_AFTER = 24 * 3600


def beat(client: redis.Redis, worker: str, heartbeat_file: Path | None, now: float | None = None) -> None:
    """Record that ``worker`` is alive now (Redis, then the file; the file even if Redis is down)."""
    now = time.time() if now is None else now
    try:
        if heartbeat_file is not None:
            touch(heartbeat_file, now)
    finally:
        pipe = client.pipeline(transaction=False)
        pipe.zadd(heartbeat_key(), {worker: now})
        pipe.zremrangebyscore(heartbeat_key(), "-inf", now - _PRUNE_AFTER)
        pipe.execute()


def touch(path: Path, now: float) -> None:
    """Create or update ``path`` with mtime ``now``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path, (now, now))


def forget(client: redis.Redis, worker: str) -> None:
    """Remove a worker that shuts down cleanly."""
    client.zrem(heartbeat_key(), worker)


def workers_seen(client: redis.Redis, max_age: float, now: float | None = None) -> list[str]:
    """Workers whose last heartbeat is at most ``max_age`` seconds old."""
    now = time.time() if now is None else now
    return list(client.zrangebyscore(heartbeat_key(), now - max_age, "+inf"))


def file_alive(path: Path | None, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """Whether the heartbeat file was touched within ``max_age`` seconds, and why not."""
    if path is None:
        return False, "no heartbeat file configured (EHR_ALERTS_WORKER_HEARTBEAT_FILE is empty)"
    now = time.time() if now is None else now
    try:
        age = now - path.stat().st_mtime
    except FileNotFoundError:
        return False, f"heartbeat file {path} does not exist (worker not started yet?)"
    if age > max_age:
        return False, f"last heartbeat {age:.0f} s ago (more than {max_age:.0f} s)"
    return True, f"last heartbeat {age:.1f} s ago"


class OutageGuard(threading.Thread):
    """Keeps the heartbeat file fresh while the worker waits for Redis.

    Celery's consumer blocks in its broker-reconnect loop while Redis is down, so the timer that beats stops
    too. Every ``interval`` this thread looks at the last beat of the main loop (``last_beat()``, monotonic):
    when it is older than two intervals *and* Redis does not answer a ping, the stall is the outage, not a
    hung worker, and the file is touched. With Redis up and the main loop silent, the file goes stale and the
    liveness probe restarts the worker, as designed.
    """

    def __init__(self, path: Path, interval: float, last_beat: Callable[[], float], ping: Callable[[], object]) -> None:
        super().__init__(name="ehr-alerts-outage-guard", daemon=True)
        self.path, self.interval, self.last_beat, self.ping = path, interval, last_beat, ping
        self.stopped = threading.Event()
        self.covered = 0  # beats written for an outage (tests and diagnostics)

    def run(self) -> None:
        """Check every interval until stopped."""
        while not self.stopped.wait(self.interval):
            if time.monotonic() - self.last_beat() > 2 * self.interval and not self._redis_up():
                touch(self.path, time.time())
                self.covered += 1

    def _redis_up(self) -> bool:
        try:
            self.ping()
        except Exception:  # any failure to reach Redis counts as the outage
            return False
        return True

    def stop(self) -> None:
        """End the thread."""
        self.stopped.set()
