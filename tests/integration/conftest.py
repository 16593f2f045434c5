"""Fixtures for the integration tests: a real Redis, the API and Celery workers as real subprocesses.

Redis: ``REDIS_URL`` if set; else Testcontainers when a Docker engine answers and the package is
installed; else a throw-away ``redis-server`` subprocess on a free port.

Isolation: every test module gets its own Redis database number (1..15) and every test FLUSHDBs it and
uses a unique key prefix ``test-<uuid>``. The Celery queue name is fixed ("ehr-alerts"), hence the
per-module database.

Settings are read once per process (``config.settings.get_settings`` is cached), so the API and the
workers run as subprocesses with the environment set. In this (pytest) process the tests read results
through ``workers.state.store.Store`` built directly on a ``redis.Redis`` client; because ``workers.state.keys``
takes the prefix from ``get_settings()``, the ``store`` fixture sets ``EHR_ALERTS_KEY_PREFIX`` (with
monkeypatch) and calls ``get_settings.cache_clear()`` before and after the test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from auth_helpers import TestIssuer

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
QUEUE = "ehr-alerts"
_db_numbers = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait_ping(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """Base URL of a real Redis server (database 0)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if _docker_answers():
        try:
            from testcontainers.redis import RedisContainer  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            with RedisContainer("redis:7-alpine") as container:
                host = container.get_container_host_ip()
                port = container.get_exposed_port(6379)
                url = f"redis://{host}:{port}/0"
                _wait_ping(url)
                yield url
            return
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no REDIS_URL, no Docker/testcontainers and no redis-server binary")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        _wait_ping(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def module_redis_url(redis_url: str) -> str:
    """The session server with a database number of this module's own (1..15)."""
    try:
        databases = int(redis.Redis.from_url(redis_url).config_get("databases")["databases"])
    except (redis.RedisError, KeyError, ValueError):
        databases = 16
    # more modules than databases: numbers are reused (modules run one after another, every test FLUSHDBs)
    n = 1 + (next(_db_numbers) - 1) % (databases - 1)
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{n}"))


@pytest.fixture
def redis_client(module_redis_url: str) -> Iterator[redis.Redis]:
    """Plain client on the module's database, flushed before the test."""
    client = redis.Redis.from_url(module_redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(redis_client: redis.Redis, module_redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A ``Store`` on the module database, reading keys under this test's prefix (see module docstring)."""
    from config.settings import Settings, get_settings
    from workers.state.store import Store

    monkeypatch.setenv("EHR_ALERTS_KEY_PREFIX", key_prefix)
    get_settings.cache_clear()
    yield Store(redis_client, Settings(redis_url=module_redis_url, key_prefix=key_prefix))
    monkeypatch.undo()
    get_settings.cache_clear()


#: Scopes of the stack's default feed token: write every resource type, read alerts.
FEED_SCOPES = "system/*.cud system/DetectedIssue.r"
#: Paths the stack's HTTP client sends the feed token to when a test gives no Authorization header.
FEED_PATHS = ("/fhir", "/alerts", "/patients/")


def feed_issuer_env(issuer: TestIssuer) -> dict[str, str]:
    """Environment that makes an app trust ``issuer`` for feed tokens."""
    return {"EHR_ALERTS_FEED_ISSUERS": json.dumps({issuer.issuer: str(issuer.jwks_path)})}


def feed_token(issuer: TestIssuer, scope: str = FEED_SCOPES, **claims: Any) -> str:
    """A feed access token from ``issuer`` (aud ehr-alerts, an hour long)."""
    return issuer.token("ehr-alerts", sub="test-feed", client_id="test-feed", scope=scope, lifetime=3600, **claims)


class Stack:
    """The API and Celery workers of one test, as subprocesses sharing one environment.

    Ingestion and alert reads need a feed token: the stack trusts its own feed issuer and its HTTP client
    adds ``Authorization: Bearer <feed token>`` to requests under :data:`FEED_PATHS` that carry none."""

    def __init__(self, url: str, prefix: str, client: redis.Redis, store: Any, tmp: Path) -> None:
        self.url, self.prefix, self.client, self.store, self.tmp = url, prefix, client, store, tmp
        self.feed = TestIssuer(tmp, name="feed")
        self.feed_token = feed_token(self.feed)
        self.env = {
            **os.environ,
            "REDIS_URL": url,
            "EHR_ALERTS_KEY_PREFIX": prefix,
            "EHR_ALERTS_VISIBILITY_TIMEOUT": "5",
            "EHR_ALERTS_REDELIVERY_TIMEOUT": "5",
            # Most tests replay historical data; today's wall clock would close their alerts by time alone.
            # Tests of time-based closing start workers with a short interval.
            "EHR_ALERTS_DUE_SWEEP_INTERVAL": "3600",
            "PYTHONUNBUFFERED": "1",
            **feed_issuer_env(self.feed),
        }
        self.api: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs = itertools.count()
        self.http = httpx.Client(timeout=60, event_hooks={"request": [self._feed_auth]})

    def _feed_auth(self, request: httpx.Request) -> None:
        if "authorization" not in request.headers and request.url.path.startswith(FEED_PATHS):
            request.headers["Authorization"] = f"Bearer {self.feed_token}"

    def _spawn(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}-{next(self._logs)}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_api(self, **extra_env: str) -> str:
        port = free_port()
        env = {**self.env, **extra_env}
        self.api = self._spawn(
            [
                str(VENV_BIN / "uvicorn"),
                "service.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env,
            "api",
        )
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if self.api.poll() is not None:
                raise RuntimeError(f"API exited with {self.api.returncode}; logs in {self.tmp}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return self.base_url
            if time.monotonic() > deadline:
                raise RuntimeError(f"API did not answer /healthz; logs in {self.tmp}")
            time.sleep(0.1)

    def start_worker(self, concurrency: int = 1, **extra_env: str) -> subprocess.Popen[bytes]:
        env = {**self.env, **extra_env}
        worker = self._spawn(
            [
                str(VENV_BIN / "celery"),
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                QUEUE,
                "-c",
                str(concurrency),
                "--pool",
                "prefork",
                "--loglevel",
                "warning",
                "-n",
                f"w{uuid.uuid4().hex[:8]}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env,
            "worker",
        )
        self.workers.append(worker)
        return worker

    def freeze_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGSTOP the worker's main process and pool children: sockets stay open, nothing is read."""
        os.killpg(worker.pid, signal.SIGSTOP)

    def kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker's main process and its pool children (its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        self.workers.remove(worker)

    # --- HTTP ------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, f"{self.base_url}{path}", **kwargs)
        assert response.status_code < 500, f"{method} {path} -> {response.status_code}: {response.text[:500]}"
        return response

    def post_ndjson(self, resources: list[dict[str, Any]] | str | bytes) -> httpx.Response:
        body = resources if isinstance(resources, str | bytes) else "\n".join(json.dumps(r) for r in resources)
        return self.request("POST", "/fhir/$import", content=body, headers={"Content-Type": "application/fhir+ndjson"})

    def post_json(self, path: str, data: Any, method: str = "POST") -> httpx.Response:
        return self.request(method, path, content=json.dumps(data), headers={"Content-Type": "application/fhir+json"})

    def open_alerts(self, patient: str) -> list[dict[str, Any]]:
        response = self.request("GET", f"/patients/{patient}/alerts")
        assert response.status_code == 200, response.text
        return response.json()["alerts"]

    # --- draining --------------------------------------------------------------------------------------

    def drain(self, timeout: float = 90, stable: float = 0.5) -> None:
        """Wait until every accepted batch is finished (inbox empty), the queue and the unacked hash are
        empty, and the counters stable for ``stable`` s."""
        from workers import inbox

        deadline = time.monotonic() + timeout
        last: Any = None
        since = time.monotonic()
        while time.monotonic() < deadline:
            idle = inbox.size(self.client) == 0 and self.client.llen(QUEUE) == 0 and self.client.hlen("unacked") == 0
            snapshot = (idle, self.store.counters())
            if snapshot != last:
                last, since = snapshot, time.monotonic()
            elif idle and time.monotonic() - since >= stable:
                return
            for worker in self.workers:
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {worker.returncode}; logs in {self.tmp}")
            time.sleep(0.05)
        raise TimeoutError(
            f"queue not drained in {timeout} s: inbox={inbox.size(self.client)} queue={self.client.llen(QUEUE)} "
            f"unacked={self.client.hlen('unacked')}"
            f"; logs in {self.tmp}"
        )

    def close(self) -> None:
        self.http.close()
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.workers.clear()


@pytest.fixture
def stack(
    module_redis_url: str, key_prefix: str, redis_client: redis.Redis, store: Any, tmp_path: Path
) -> Iterator[Stack]:
    """Start nothing yet: the test calls ``start_api`` / ``start_worker`` with the settings it needs."""
    s = Stack(module_redis_url, key_prefix, redis_client, store, tmp_path)
    try:
        yield s
    finally:
        s.close()


def issues(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    assert outcome.get("resourceType") == "OperationOutcome", outcome
    return outcome["issue"]


def python() -> str:
    return str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
