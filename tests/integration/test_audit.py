"""Access audit end to end: an ingest, a read, a transition and an export each record exactly one FHIR R4
AuditEvent with the right who / what / outcome; the events survive a Redis crash (AOF) and export as valid
FHIR R4 ndjson, by patient and time, to admins only."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from auth_helpers import REVIEW_ISSUER, review_env, review_headers
from conftest import free_port
from fhir.resources.R4B.auditevent import AuditEvent
from itest_builders import T0, potassium

PATIENT = "aud-1"


class AofRedis:
    """A redis-server of the test's own, with AOF on, that can be crashed (SIGKILL) and started again."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("needs the redis-server binary")
        args = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.1)

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def aof(tmp_path):
    server = AofRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def events(stack, **params: str) -> list[dict[str, Any]]:
    response = stack.request("GET", "/audit/AuditEvent", params=params, headers=review_headers("auditor", ["admin"]))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+ndjson")
    found = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    for event in found:
        AuditEvent.model_validate(event)  # valid FHIR R4 (R4B models)
    return found[:-1] if found and _is_export_of_audit(found[-1]) else found  # this export records itself


def _is_export_of_audit(event: dict[str, Any]) -> bool:
    return event["type"]["code"] == "110106" and event["agent"][0]["who"]["identifier"]["value"] == "auditor"


def new_since(stack, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen = {e["id"] for e in before}
    return [e for e in events(stack) if e["id"] not in seen and not _is_export_of_audit(e)]


def patients(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if e.get("role", {}).get("code") == "1"]


def who(event: dict[str, Any]) -> tuple[str, str]:
    identifier = event["agent"][0]["who"]["identifier"]
    return identifier["system"], identifier["value"]


@pytest.mark.slow
def test_each_access_records_one_audit_event_that_survives_a_redis_crash(stack, tmp_path, aof):
    env = {"REDIS_URL": aof.url, **review_env(tmp_path)}
    stack.start_api(**env)
    stack.start_worker(**env)
    client = redis.Redis.from_url(aof.url, decode_responses=True)

    # an ingest of a write
    before = events(stack)
    response = stack.post_json(f"/fhir/Observation/k-{PATIENT}", potassium(f"k-{PATIENT}", PATIENT, 2.9, T0), "PUT")
    assert response.status_code == 202, response.text
    [ingest] = new_since(stack, before)
    assert ingest["action"] == "U" and ingest["outcome"] == "0" and ingest["outcomeDesc"] == "HTTP 202"
    assert patients(ingest) == [f"Patient/{PATIENT}"]
    assert f"Observation/k-{PATIENT}" in [e["what"].get("reference") for e in ingest["entity"]]
    assert who(ingest) == (stack.feed.issuer, "test-feed")
    assert ingest["agent"][1]["who"]["identifier"]["value"] == "test-feed"  # the OAuth client
    deadline = time.monotonic() + 60
    while not client.zcard(f"{stack.prefix}:alerts:index"):
        assert time.monotonic() < deadline, "the worker raised no alert"
        time.sleep(0.1)

    # a read
    before = events(stack)
    alerts = stack.request("GET", f"/patients/{PATIENT}/alerts", headers=review_headers("viewer-1", ["viewer"]))
    assert alerts.status_code == 200 and alerts.json()["alerts"]
    [read] = new_since(stack, before)
    assert read["action"] == "E" and read["type"]["code"] == "110110" and read["outcome"] == "0"
    assert patients(read) == [f"Patient/{PATIENT}"] and who(read) == (REVIEW_ISSUER, "viewer-1")
    assert read["agent"][0]["type"]["coding"][0]["code"] == "humanuser"

    # a transition
    alert = alerts.json()["alerts"][0]
    before = events(stack)
    response = stack.request(
        "POST",
        f"/api/review/alerts/{alert['id']}/transitions",
        json={"action": "acknowledge", "revision": alert["revision"]},
        headers=review_headers("pharm-1", ["pharmacist"]),
    )
    assert response.status_code == 200, response.text
    [transition] = new_since(stack, before)
    assert transition["action"] == "U" and who(transition) == (REVIEW_ISSUER, "pharm-1")
    assert patients(transition) == [f"Patient/{PATIENT}"]
    assert f"DetectedIssue/{alert['id']}" in [e["what"].get("reference") for e in transition["entity"] if "what" in e]

    # an export
    before = events(stack)
    window = {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z", "format": "ndjson"}
    response = stack.request("GET", "/api/review/audit", params=window, headers=review_headers("adm-1", ["admin"]))
    assert response.status_code == 200
    [export] = new_since(stack, before)
    assert export["type"]["code"] == "110106" and who(export) == (REVIEW_ISSUER, "adm-1")
    query = next(e for e in export["entity"] if e.get("role", {}).get("code") == "24")
    assert "format=ndjson" in base64.b64decode(query["query"]).decode()

    # a refusal with a verified identity is recorded with its outcome
    before = events(stack)
    refused = stack.request(
        "POST",
        f"/api/review/alerts/{alert['id']}/transitions",
        json={"action": "acknowledge", "revision": alert["revision"]},
        headers=review_headers("viewer-1", ["viewer"]),
    )
    assert refused.status_code == 403
    [denied] = new_since(stack, before)
    assert denied["outcome"] == "4" and denied["outcomeDesc"] == "HTTP 403"

    # by patient and time; then a crash of Redis (SIGKILL, AOF everysec) loses none of them
    by_patient = events(stack, patient=PATIENT)
    assert {e["id"] for e in [ingest, read, transition, denied]} <= {e["id"] for e in by_patient}
    assert export["id"] not in {e["id"] for e in by_patient}
    assert events(stack, **{"from": "2100-01-01T00:00:00Z"}) == []
    everything = events(stack)
    time.sleep(1.5)  # one AOF fsync period
    aof.crash()
    aof.start()
    assert [e["id"] for e in events(stack)][: len(everything)] == [e["id"] for e in everything]
    assert {e["id"] for e in by_patient} <= {e["id"] for e in events(stack, patient=PATIENT)}


def test_audit_export_is_for_admins_only(stack, tmp_path):
    stack.start_api(**review_env(tmp_path))
    assert stack.request("GET", "/audit/AuditEvent").status_code == 401
    assert stack.request("GET", "/audit/AuditEvent", headers=review_headers("p", ["pharmacist"])).status_code == 403
    feed = {"Authorization": f"Bearer {stack.feed_token}"}
    assert stack.request("GET", "/audit/AuditEvent", headers=feed).status_code == 401
