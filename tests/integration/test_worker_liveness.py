"""Worker liveness through a Redis outage: the heartbeat file stays fresh while the worker waits for Redis
(restarting every worker would not bring Redis back), and goes stale when the worker itself is stuck."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from test_audit import AofRedis
from test_operations import worker_alive


@pytest.mark.slow
def test_heartbeat_file_stays_fresh_through_a_redis_outage(stack, tmp_path):
    server = AofRedis(tmp_path)
    server.start()
    try:
        env = {
            **stack.env,
            "REDIS_URL": server.url,
            "EHR_ALERTS_WORKER_HEARTBEAT_INTERVAL": "1",
            "EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE": "4",
            "EHR_ALERTS_WORKER_HEARTBEAT_FILE": str(tmp_path / "worker.heartbeat"),
        }
        worker = stack.start_worker(**env)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        deadline = time.monotonic() + 60
        while not client.zcard(f"{stack.prefix}:workers:heartbeat"):
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.2)
        server.crash()
        outage_end = time.monotonic() + 12  # three times the max age
        while time.monotonic() < outage_end:
            result = worker_alive(env)
            assert result.returncode == 0, result.stderr
            time.sleep(1)
        server.start()  # the worker reconnects and beats in Redis again
        client.delete(f"{stack.prefix}:workers:heartbeat")
        deadline = time.monotonic() + 60
        while not client.zcard(f"{stack.prefix}:workers:heartbeat"):
            assert time.monotonic() < deadline, "no heartbeat after Redis came back"
            time.sleep(0.2)
        # a stuck worker (frozen, Redis up) stops touching the file: the probe fails as designed
        stack.freeze_worker(worker)
        time.sleep(5)
        assert worker_alive(env).returncode == 1
        os.killpg(worker.pid, signal.SIGCONT)
    finally:
        server.stop()
