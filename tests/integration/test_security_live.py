"""The security dependencies in a real server: uvicorn with two worker processes on real Redis. A jti used
once is refused by either worker (the replay store is shared), and is kept under the configured key prefix
for the token's lifetime."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from auth_helpers import TestIssuer

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_app(tmp_path, module_redis_url, redis_client, key_prefix):
    issuer = TestIssuer(tmp_path)
    port = _free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EHR_ALERTS_")}
    env = {
        **clean,
        **issuer.env(),
        "REDIS_URL": module_redis_url,
        "EHR_ALERTS_KEY_PREFIX": key_prefix,
        "PYTHONPATH": str(ROOT / "tests"),
    }
    log = open(tmp_path / "uvicorn.log", "wb")  # noqa: SIM115 - closed below
    args = [sys.executable, "-m", "uvicorn", "security_testapp:make_app", "--factory", "--workers", "2"]
    proc = subprocess.Popen(
        [*args, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/cds-services", timeout=2).status_code == 401:
                    break
            assert time.monotonic() < deadline, "app did not start"
            time.sleep(0.2)
        yield base, issuer, redis_client, key_prefix
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def test_replay_refused_across_workers_on_real_redis(live_app):
    base, issuer, redis_client, prefix = live_app
    url = f"{base}/cds-services/mg-k-patient-view"
    with httpx.Client(timeout=10) as http:
        for alg in ("ES384", "RS384"):
            token = issuer.token(url, alg=alg, lifetime=120)
            headers = {"Authorization": f"Bearer {token}"}
            assert http.post(url, headers=headers).status_code == 200
            # new connections, so the two uvicorn workers both get a chance to answer
            for _ in range(4):
                with httpx.Client(timeout=10) as fresh:
                    assert fresh.post(url, headers=headers).status_code == 401
        keys = redis_client.keys(f"{prefix}:jti:*")
        assert len(keys) == 2
        assert all(120 <= redis_client.ttl(k) <= 120 + 31 for k in keys)
        wrong_aud = issuer.headers(f"{base}/cds-services")
        assert http.post(url, headers=wrong_aud).status_code == 401
