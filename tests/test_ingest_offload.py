"""Issue 15: every ingestion endpoint does its CPU work (JSON parsing, fhir.resources validation, normalisation)
and its Redis calls on a thread of the bounded ``ingest`` lane (``service/offload.py``), never on the event
loop. Each step is wrapped to record where it ran: no running event loop in that thread, and the request
holding a place in the ingest lane. In process (embedded Redis, eager Celery not needed: events stay queued)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from auth_helpers import TestIssuer
from fastapi.testclient import TestClient
from fhir_builders import potassium
from security_testapp import configure, settings_reset

import service.ingest as ingest
import service.ingest_http as ingest_http
from service.offload import get_lane, reset_lanes

SCOPE = "system/Observation.cud system/Patient.cu"


@pytest.fixture
def env(tmp_path, monkeypatch):
    feed = TestIssuer(tmp_path, name="feed")
    with settings_reset():
        configure(
            monkeypatch,
            {
                "EHR_ALERTS_FEED_ISSUERS": json.dumps({feed.issuer: str(feed.jwks_path)}),
                "EHR_ALERTS_PROFILE": "production",
            },
        )
        reset_lanes()
        yield feed
        reset_lanes()


@pytest.fixture
def seen(monkeypatch) -> Iterator[list[tuple[str, bool, int]]]:
    """(step, ran on an event loop thread, ingest requests in flight) for every wrapped step."""
    calls: list[tuple[str, bool, int]] = []

    def wrap(owner: Any, name: str) -> None:
        real: Callable[..., Any] = getattr(owner, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            calls.append((name, on_loop, get_lane("ingest").in_flight))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)

    for name in ("parse_bundle", "parse_json", "line_problem", "record_event_numbers"):
        wrap(ingest_http, name)  # JSON parsing of bodies and lines; the Subscription event numbers in Redis
    wrap(ingest, "normalize_resource")  # fhir.resources validation and normalisation
    wrap(ingest.Enqueuer, "flush")  # the inbox and resource index writes in Redis
    wrap(ingest.Enqueuer, "patient_of")  # a delete's look-up in Redis
    yield calls


def _headers(feed: TestIssuer, media: str = "application/fhir+json") -> dict[str, str]:
    token = feed.token("ehr-alerts", sub="lab", client_id="lab", scope=SCOPE)
    return {"Authorization": f"Bearer {token}", "Content-Type": media}


def _notification(resource: dict[str, Any]) -> dict[str, Any]:
    status = {
        "resourceType": "Parameters",
        "id": "status-1",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": "1"},
            {"name": "notification-event", "part": [{"name": "event-number", "valueString": "1"}]},
        ],
    }
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {"fullUrl": "urn:uuid:status", "resource": status},
            {"resource": resource, "request": {"method": "PUT", "url": f"Observation/{resource['id']}"}},
        ],
    }


def _requests() -> list[tuple[str, str, str, Any, set[str]]]:
    k1, k2, k3 = potassium(3.1), potassium(3.0), potassium(2.9)
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": k2, "request": {"method": "PUT", "url": f"Observation/{k2['id']}"}}],
    }
    ndjson = "\n".join(json.dumps(potassium(3.2 + i / 10)) for i in range(3))
    return [
        ("PUT", f"/fhir/Observation/{k1['id']}", "application/fhir+json", k1, {"parse_json", "normalize_resource"}),
        ("POST", "/fhir/Observation", "application/fhir+json", potassium(3.3), {"parse_json", "normalize_resource"}),
        ("POST", "/fhir", "application/fhir+json", transaction, {"parse_bundle", "normalize_resource"}),
        ("POST", "/fhir", "application/fhir+json", _notification(k3), {"record_event_numbers", "normalize_resource"}),
        ("POST", "/fhir/$import", "application/fhir+ndjson", ndjson, {"line_problem", "normalize_resource"}),
        ("DELETE", f"/fhir/Observation/{k1['id']}", "", None, {"patient_of"}),
    ]


@pytest.mark.parametrize("index", range(6), ids=["put", "post", "transaction", "notification", "import", "delete"])
def test_ingestion_work_runs_on_the_ingest_lane_never_on_the_event_loop(env, seen, index) -> None:
    from service.app import app

    with TestClient(app) as http:
        if index == 5:  # a delete needs the resource received first
            first = _requests()[0]
            assert http.put(first[1], json=first[3], headers=_headers(env)).status_code == 202
            seen.clear()
        method, path, media, body, expected = _requests()[index]
        content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
        response = http.request(method, path, content=content, headers=_headers(env, media or "application/fhir+json"))
    assert response.status_code in (200, 202), response.text
    steps = {name for name, _, _ in seen}
    assert expected | {"flush"} <= steps, steps
    on_loop = [name for name, loop, _ in seen if loop]
    assert on_loop == [], f"ran on the event loop: {on_loop}"
    outside = [name for name, _, in_flight in seen if in_flight < 1]
    assert outside == [], f"ran outside the ingest lane: {outside}"
