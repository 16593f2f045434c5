"""Operations, end to end with the API and a Celery worker as real subprocesses on a real Redis:

- the PHI log scan: replay the example stream and real public data, call every route of the app (the
  route table below must cover ``app.routes``), then scan everything the processes wrote for patient ids,
  names, identifiers, values tied to patients and the bearer token; every line must be JSON;
- the metrics after that replay; readiness (ready, no worker heartbeat, Redis down) and worker liveness.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from auth_helpers import review_env, review_token

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
Stack = Any  # tests/integration/conftest.py: the API and workers of one test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STREAM = ROOT / "examples" / "stream" / "events.ndjson"
DATA = ROOT / "tests" / "data" / "shared"  # the vendored public FHIR data
SYNTHEA = [
    DATA / "synthea-r4" / "Cameron_Greenfelder_9b55212c-8024-4b8b-bc82-fa605435f63b.json",
    DATA / "synthea-r4" / "Alfreda_Wyman_3287b938-4670-47eb-91e5-e0ce3df71405.json",
]
EXAMPLES = [DATA / "fhir-r4-examples" / name for name in ("Observation-f001.json", "Condition-f201.json")]


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


#: A JWT-shaped bearer token sent with every request (as header and as the review session cookie).
TOKEN = ".".join(
    [
        _b64({"alg": "ES384", "typ": "JWT", "kid": "scan"}),
        _b64({"iss": "https://ehr.example.org", "sub": "scan-user", "aud": "ehr-alerts", "exp": 4102444800}),
        "c2lnbmF0dXJlLXRoYXQtbXVzdC1uZXZlci1iZS1sb2dnZWQtYW55d2hlcmU",
    ]
)
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
#: A valid review token (admin: may call every review route), so the review handlers really run.
REVIEW_TOKEN = review_token("scan-admin", ["admin"], name="Scan Admin")
REVIEW = {"Authorization": f"Bearer {REVIEW_TOKEN}"}
#: The FHIR access token an EHR hands over in a CDS Hooks call: must never be logged either.
FHIR_ACCESS_TOKEN = "fhir-access-token-that-must-never-be-logged-0123456789"
PREFETCH_KEYS = (
    "potassium",
    "magnesium",
    "qtc",
    "ecg",
    "conditions",
    "medicationStatements",
    "medicationRequests",
    "medicationStatementsFinished",
    "medicationRequestsFinished",
    "medicationAdministrations",
    "serviceRequests",
)


def _cds_call(c: Ctx, hook: str) -> dict[str, Any]:
    """A CDS Hooks call for the replayed patient, with their observations as prefetch."""
    mine = [r for r in _stream() if r.get("subject", {}).get("reference") == f"Patient/{c.patient}"]
    observations = [r for r in mine if r["resourceType"] == "Observation"]
    prefetch: dict[str, Any] = dict.fromkeys(PREFETCH_KEYS)
    prefetch["potassium"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in observations],
    }
    context: dict[str, Any] = {"userId": "Practitioner/scan", "patientId": c.patient}
    if hook != "patient-view":
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
    if hook == "order-select":
        context["selections"] = []
    return {
        "hook": hook,
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": "https://fhir.example.org/r4",
        "fhirAuthorization": {
            "access_token": FHIR_ACCESS_TOKEN,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service",
        },
        "context": context,
        "prefetch": prefetch,
    }


# --- what the test sends --------------------------------------------------------------------------------


def _stream() -> list[dict[str, Any]]:
    return [json.loads(line) for line in STREAM.read_text().splitlines() if line.strip()]


def _notification(subscription: str, numbers: list[int]) -> dict[str, Any]:
    status = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": subscription}},
            {"name": "type", "valueCode": "event-notification"},
            *[
                {"name": "notification-event", "part": [{"name": "event-number", "valueString": str(n)}]}
                for n in numbers
            ],
        ],
    }
    return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}]}


class Ctx:
    """Values known only after the replay (a patient with an alert, the alert id)."""

    patient = "ex-alpha"
    alert_id = "00000000-0000-0000-0000-000000000000"
    revision = 0


def _json(data: Any) -> dict[str, Any]:
    return {"content": json.dumps(data), "headers": {"Content-Type": "application/fhir+json"}}


def _first(resource_type: str) -> dict[str, Any]:
    return next(r for r in _stream() if r["resourceType"] == resource_type)


#: (method, route template) -> sample requests (path, httpx kwargs). Every route of the app must be here.
Sample = Callable[[Ctx], list[tuple[str, dict[str, Any]]]]
ROUTE_SAMPLES: dict[tuple[str, str], Sample] = {
    ("POST", "/fhir/$import"): lambda c: [
        ("/fhir/$import", {"content": STREAM.read_bytes(), "headers": {"Content-Type": "application/fhir+ndjson"}}),
        ("/fhir/$import", {"content": b'{"resourceType": "Observation", "id": ', "headers": {}}),  # 415
        (
            "/fhir/$import",
            {
                "content": b'{"resourceType":"Observation"\n{broken',
                "headers": {"Content-Type": "application/fhir+ndjson"},
            },
        ),
    ],
    ("POST", "/fhir"): lambda c: [
        *[("/fhir", _json(json.loads(p.read_text()))) for p in SYNTHEA],
        ("/fhir", _json(_notification("Subscription/ops-scan", [1, 2]))),
        ("/fhir", _json(_notification("Subscription/ops-scan", [5]))),  # a gap of 2
        ("/fhir", {"content": b"{not json", "headers": {"Content-Type": "application/fhir+json"}}),
        ("/fhir", _json({"resourceType": "Patient", "id": "ex-alpha"})),
    ],
    ("PUT", "/fhir/{resource_type}/{resource_id}"): lambda c: [
        (f"/fhir/Observation/{_first('Observation')['id']}", _json(_first("Observation"))),
        ("/fhir/Observation/wrong-id", _json(_first("Observation"))),
        ("/fhir/Patient/ex-alpha", _json(_first("Patient"))),
    ],
    ("DELETE", "/fhir/{resource_type}/{resource_id}"): lambda c: [
        (f"/fhir/Observation/{_first('Observation')['id']}", {})
    ],
    ("POST", "/fhir/{resource_type}"): lambda c: [
        *[(f"/fhir/{json.loads(p.read_text())['resourceType']}", _json(json.loads(p.read_text()))) for p in EXAMPLES],
        ("/fhir/Observation", _json({**_first("Observation"), "status": "bogus"})),
    ],
    ("GET", "/alerts"): lambda c: [("/alerts", {}), ("/alerts?status=active&limit=5", {}), ("/alerts?limit=0", {})],
    ("GET", "/patients/{patient_id}/alerts"): lambda c: [
        (f"/patients/{c.patient}/alerts", {}),
        (f"/patients/{c.patient}/alerts?open_only=false", {}),
    ],
    ("GET", "/patients/{patient_id}/alerts/{alert_id}"): lambda c: [
        (f"/patients/{c.patient}/alerts/{c.alert_id}", {}),
        (f"/patients/{c.patient}/alerts/not-an-alert", {}),
    ],
    ("GET", "/healthz"): lambda c: [("/healthz", {})],
    ("GET", "/readyz"): lambda c: [("/readyz", {}), ("/readyz?scope=api", {}), ("/readyz?scope=bogus", {})],
    ("GET", "/metrics"): lambda c: [("/metrics", {})],
    ("GET", "/api/review/alerts"): lambda c: [
        ("/api/review/alerts", {"headers": REVIEW}),
        (f"/api/review/alerts?rule=hypokalemia-without-magnesium&q=potassium&patient={c.patient}", {"headers": REVIEW}),
        ("/api/review/alerts?cursor=not-a-cursor", {"headers": REVIEW}),
    ],
    ("GET", "/api/review/alerts/{alert_id}"): lambda c: [
        (f"/api/review/alerts/{c.alert_id}", {"headers": REVIEW}),
        ("/api/review/alerts/not-an-alert", {"headers": REVIEW}),
    ],
    ("POST", "/api/review/alerts/{alert_id}/transitions"): lambda c: [
        (
            f"/api/review/alerts/{c.alert_id}/transitions",
            {"json": {"action": "acknowledge", "revision": c.revision, "comment": "seen"}, "headers": REVIEW},
        ),
        (f"/api/review/alerts/{c.alert_id}/transitions", {"json": {"action": "fly"}, "headers": REVIEW}),
    ],
    ("GET", "/api/review/analytics"): lambda c: [("/api/review/analytics", {"headers": REVIEW})],
    ("GET", "/api/review/audit"): lambda c: [
        ("/api/review/audit?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&format=csv", {"headers": REVIEW}),
        ("/api/review/audit?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&format=ndjson", {"headers": REVIEW}),
    ],
    ("GET", "/review"): lambda c: [
        ("/review", {"headers": REVIEW}),
        (f"/review?alert={c.alert_id}", {"headers": REVIEW}),
    ],
    ("GET", "/review/analytics"): lambda c: [("/review/analytics", {"headers": REVIEW})],
    ("GET", "/review/data-problems"): lambda c: [("/review/data-problems?status=all", {"headers": REVIEW})],
    ("POST", "/review/data-problems/{item_id}/{action}"): lambda c: [
        ("/review/data-problems/0123456789abcdef01234567/resolve", {"data": {"revision": "1"}, "headers": REVIEW}),
    ],
    ("POST", "/review/patients/{patient_id}/acknowledge"): lambda c: [
        (f"/review/patients/{c.patient}/acknowledge", {"data": {f"a:{c.alert_id}": "1"}, "headers": REVIEW}),
    ],
    ("GET", "/api/review/patients"): lambda c: [
        ("/api/review/patients", {"headers": REVIEW}),
        (f"/api/review/patients?patient={c.patient}&status=all", {"headers": REVIEW}),
    ],
    ("GET", "/api/review/updates"): lambda c: [("/api/review/updates?since=0", {"headers": REVIEW})],
    ("POST", "/api/review/patients/{patient_id}/acknowledge"): lambda c: [
        (
            f"/api/review/patients/{c.patient}/acknowledge",
            {"json": {"alerts": {c.alert_id: c.revision}, "comment": "seen"}, "headers": REVIEW},
        ),
    ],
    ("GET", "/api/review/data-problems"): lambda c: [("/api/review/data-problems?status=all", {"headers": REVIEW})],
    ("POST", "/api/review/data-problems/{item_id}/transitions"): lambda c: [
        (
            "/api/review/data-problems/0123456789abcdef01234567/transitions",
            {"json": {"action": "resolve", "revision": 1, "comment": "mapped"}, "headers": REVIEW},
        ),
    ],
    ("GET", "/review/login"): lambda c: [("/review/login", {})],
    ("POST", "/review/login"): lambda c: [
        ("/review/login", {"data": {"token": REVIEW_TOKEN}}),
        ("/review/login", {"data": {"token": "not a token"}}),
    ],
    ("POST", "/review/alerts/{alert_id}/{action}"): lambda c: [
        (f"/review/alerts/{c.alert_id}/resolve", {"data": {"revision": str(c.revision + 1)}, "headers": REVIEW}),
    ],
    ("POST", "/review/logout"): lambda c: [("/review/logout", {})],
    ("GET", "/cds-services"): lambda c: [("/cds-services", {})],
    ("POST", "/cds-services/{service_id}"): lambda c: [
        ("/cds-services/mg-k-patient-view", {"json": _cds_call(c, "patient-view")}),
        ("/cds-services/mg-k-order-sign", {"json": _cds_call(c, "order-sign")}),
        ("/cds-services/mg-k-order-select", {"json": {"hook": "order-select", "context": {}}}),  # 400
        ("/cds-services/no-such-service", {"json": _cds_call(c, "patient-view")}),  # 404
    ],
    ("POST", "/cds-services/{service_id}/feedback"): lambda c: [
        (
            "/cds-services/mg-k-patient-view/feedback",
            {
                "json": {
                    "feedback": [
                        {"card": c.alert_id, "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"}
                    ]
                }
            },
        ),
        (
            "/cds-services/mg-k-patient-view/feedback",
            {
                "json": {
                    "feedback": [
                        {"card": "unknown-card", "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z"}
                    ]
                }
            },
        ),
    ],
    ("GET", "/openapi.json"): lambda c: [("/openapi.json", {})],
    ("GET", "/docs"): lambda c: [("/docs", {})],
    ("GET", "/audit/AuditEvent"): lambda c: [
        (f"/audit/AuditEvent?patient={c.patient}", {"headers": REVIEW}),
        ("/audit/AuditEvent?from=2000-01-01T00:00:00Z", {"headers": REVIEW}),
    ],
}


def app_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route of the app (HEAD and OPTIONS aside)."""
    from service.app import app

    found: set[tuple[str, str]] = set()

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers nested
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
                continue
            for method in getattr(route, "methods", None) or ():
                if method not in ("HEAD", "OPTIONS"):
                    found.add((method, prefix + route.path))

    walk(app.routes, "")
    return found


def test_every_route_has_a_sample_request():
    """New routes cannot escape the PHI log scan: each needs an entry in ROUTE_SAMPLES."""
    missing = sorted(app_routes() - set(ROUTE_SAMPLES))
    assert not missing, f"add sample requests to ROUTE_SAMPLES for {missing}"


# --- what must not appear -------------------------------------------------------------------------------


def _walk(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict):
        if "resourceType" in data:
            yield data
        for value in data.values():
            yield from _walk(value)
    elif isinstance(data, list):
        for value in data:
            yield from _walk(value)


def phi_strings(resources: list[dict[str, Any]]) -> dict[str, str]:
    """Strings from the data that must never be logged -> what they are."""
    found: dict[str, str] = {}
    for resource in (r for top in resources for r in _walk(top)):
        kind = resource.get("resourceType")
        if kind == "Patient":
            found[str(resource.get("id"))] = "patient id"
            for name in resource.get("name") or []:
                for part in [*(name.get("given") or []), name.get("family"), name.get("text")]:
                    if isinstance(part, str) and len(part) >= 4:
                        found[part] = "name"
            for identifier in resource.get("identifier") or []:
                if isinstance(identifier.get("value"), str) and len(identifier["value"]) >= 4:
                    found[identifier["value"]] = "identifier"
            if resource.get("birthDate"):
                found[resource["birthDate"]] = "birth date"
            for address in resource.get("address") or []:
                for line in address.get("line") or []:
                    found[line] = "address"
        subject = resource.get("subject") or resource.get("patient") or {}
        if isinstance(subject, dict):
            reference = subject.get("reference") or ""
            if reference.startswith("Patient/"):
                found[reference.split("/", 1)[1]] = "patient id"
            elif reference.startswith("urn:uuid:"):
                found[reference[len("urn:uuid:") :]] = "patient id"
            if isinstance(subject.get("display"), str) and len(subject["display"]) >= 4:
                found[subject["display"]] = "name"
        quantity = resource.get("valueQuantity") or {}
        if kind == "Observation" and "value" in quantity:
            value = str(quantity["value"])
            found[f"{value} {quantity.get('unit')}"] = "value with unit"
            if len(value) >= 6:  # shorter numbers occur in timestamps and durations by chance
                found[value] = "value"
    found.pop("None", None)
    return found


def scan(texts: dict[str, str], forbidden: dict[str, str]) -> list[str]:
    """Every occurrence of a forbidden string, and every non-JSON line, as a message."""
    problems = []
    for name, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"{name}:{number}: not JSON: {line[:200]}")
            for needle, what in forbidden.items():
                if what == "value":  # a number, not part of a longer one (timestamps, durations)
                    hit = re.search(rf"(?<![\d.]){re.escape(needle)}(?![\d])", line) is not None
                else:
                    hit = needle in line
                if hit:
                    problems.append(f"{name}:{number}: {what} {needle!r} in {line[:300]}")
    return problems


# --- the stack ------------------------------------------------------------------------------------------


def _ops_env(stack: Stack, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **stack.env,
        "EHR_ALERTS_LOG_LEVEL": "DEBUG",
        "EHR_ALERTS_LOG_FORMAT": "json",
        "EHR_ALERTS_LOG_HASH_KEY": "test-hash-key-0123456789",
        "EHR_ALERTS_WORKER_HEARTBEAT_INTERVAL": "1",
        "EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE": "10",
        "EHR_ALERTS_WORKER_HEARTBEAT_FILE": str(tmp / "worker.heartbeat"),
        "EHR_ALERTS_CDS_AUTH_ENABLED": "false",
        "EHR_ALERTS_PROFILE": "dev",
        "COLUMNS": "200",
        **review_env(tmp),
        **extra,
    }


def start_api(stack: Stack, env: dict[str, str]) -> None:
    """``ehr-alerts serve`` as the container runs it."""
    port = free_port()
    stack.api = stack._spawn(
        [str(VENV_BIN / "ehr-alerts"), "serve", "--host", "127.0.0.1", "--port", str(port)], env, "api"
    )
    stack.base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert stack.api.poll() is None, f"API exited: {logs(stack.tmp)}"
        with contextlib.suppress(httpx.HTTPError):
            if stack.http.get(f"{stack.base_url}/healthz", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, f"API did not start: {logs(stack.tmp)}"
        time.sleep(0.1)


def start_worker(stack: Stack, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``ehr-alerts worker`` as the container runs it."""
    worker = stack._spawn([str(VENV_BIN / "ehr-alerts"), "worker", "-c", "1"], env, "worker")
    stack.workers.append(worker)
    return worker


def logs(tmp: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted(tmp.glob("*.log"))}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, seen = 0.0, False
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(4))
            seen = True
    assert seen, f"no sample {name}{labels}"
    return total


def worker_alive(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "ehr-alerts"), "worker-alive"], env=env, capture_output=True, text=True, timeout=60
    )


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_logs_hold_no_phi_and_metrics_count_the_replay(stack: Stack, tmp_path: Path):
    assert not sorted(app_routes() - set(ROUTE_SAMPLES)), "see test_every_route_has_a_sample_request"
    env = _ops_env(stack, tmp_path)
    assert worker_alive(env).returncode == 1  # no heartbeat file yet
    start_api(stack, env)
    start_worker(stack, env)
    wait_for(lambda: stack.http.get(f"{stack.base_url}/readyz").status_code == 200, 60, "readiness")
    assert worker_alive(env).returncode == 0

    ctx = Ctx()
    sent: list[dict[str, Any]] = _stream()
    statuses: dict[str, list[int]] = {}
    stack.http.cookies.set("ehr_alerts_session", TOKEN)

    def call(method: str, template: str) -> None:
        for path, kwargs in ROUTE_SAMPLES[(method, template)](ctx):
            headers = {**HEADERS, "X-Request-ID": f"scan-{len(statuses)}", **kwargs.pop("headers", {})}
            if template.startswith(("/fhir", "/alerts", "/patients")):  # feed routes: the stack's feed token
                headers["Authorization"] = f"Bearer {stack.feed_token}"
            response = stack.http.request(method, stack.base_url + path, headers=headers, **kwargs)
            assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"
            assert response.headers["x-request-id"] == headers["X-Request-ID"]
            statuses.setdefault(f"{method} {template}", []).append(response.status_code)

    ingestion = [k for k in ROUTE_SAMPLES if k[0] in ("POST", "PUT") and k[1].startswith("/fhir")]
    for method, template in ingestion:
        call(method, template)
    stack.drain()
    alerts = stack.http.get(f"{stack.base_url}/alerts", params={"status": "active"}).json()["alerts"]
    assert alerts, "the example stream opens alerts"
    ctx.patient, ctx.alert_id, ctx.revision = alerts[0]["patient"], alerts[0]["id"], alerts[0]["revision"]
    for method, template in sorted(set(ROUTE_SAMPLES) - set(ingestion)):
        call(method, template)
    assert 200 in statuses["GET /patients/{patient_id}/alerts/{alert_id}"]
    assert 404 in statuses["GET /patients/{patient_id}/alerts/{alert_id}"]
    assert statuses["GET /api/review/alerts/{alert_id}"] == [200, 404]
    assert statuses["POST /api/review/alerts/{alert_id}/transitions"] == [200, 400]
    assert 200 in statuses["GET /review"]
    assert statuses["POST /cds-services/{service_id}"] == [200, 200, 400, 404]
    assert statuses["POST /cds-services/{service_id}/feedback"][1] == 404

    sent += [json.loads(path.read_text()) for path in [*SYNTHEA, *EXAMPLES]]

    # metrics of what was just replayed
    text = stack.http.get(f"{stack.base_url}/metrics").text
    counters = stack.store.counters()
    assert metric(text, "ehr_alerts_events_received_total", resource_type="Observation", outcome="accepted") > 0
    assert metric(text, "ehr_alerts_events_received_total", outcome="rejected") >= 1
    assert metric(text, "ehr_alerts_worker_events_total", status="stored") == counters["events_stored"]
    assert metric(text, "ehr_alerts_worker_events_total", status="duplicate") == counters.get("events_duplicate", 0)
    assert metric(text, "ehr_alerts_rule_decisions_total", outcome="fires") == counters["decisions_fires"]
    assert metric(text, "ehr_alerts_rule_decisions_total", rule="hypokalemia-without-magnesium", outcome="fires") > 0
    assert metric(text, "ehr_alerts_rule_decisions_total", outcome="indeterminate") > 0
    assert metric(text, "ehr_alerts_alert_transitions_total", kind="opened") == counters["alerts_opened"]
    processed = sum(v for k, v in counters.items() if k in ("events_stored", "events_duplicate", "events_stale"))
    assert metric(text, "ehr_alerts_processing_latency_seconds_count") == processed
    assert metric(text, "ehr_alerts_processing_latency_seconds_bucket", le="+Inf") == processed
    assert metric(text, "ehr_alerts_queue_depth", queue="ehr-alerts") == 0
    assert metric(text, "ehr_alerts_subscription_event_gaps_total", subscription="Subscription/ops-scan") == 2
    assert metric(text, "ehr_alerts_workers_alive") >= 1
    assert metric(text, "ehr_alerts_http_request_duration_seconds_count", route="/patients/{patient_id}/alerts") == 2
    assert "ex-alpha" not in text  # no patient ids as labels

    stack.close()  # flush and end the processes, then scan everything they wrote
    texts = logs(tmp_path)
    assert any("ehr_alerts.http" in t for t in texts.values()), texts.keys()
    worker_text = "".join(t for n, t in texts.items() if n.startswith("worker"))
    assert '"task_id"' in worker_text, "worker logs carry the task id"
    forbidden = phi_strings(sent)
    assert forbidden.get("ex-alpha") == "patient id" and forbidden.get("Example Alpha") == "name"  # sanity
    forbidden |= {TOKEN: "bearer token", TOKEN.split(".")[2]: "token signature", "Bearer ey": "bearer token"}
    forbidden |= {REVIEW_TOKEN: "review token", REVIEW_TOKEN.split(".")[2]: "review token signature"}
    forbidden |= {FHIR_ACCESS_TOKEN: "FHIR access token"}
    forbidden |= {stack.feed_token: "feed token", stack.feed_token.split(".")[2]: "feed token signature"}
    problems = scan(texts, forbidden)
    assert not problems, "\n".join(problems[:40])


@pytest.mark.slow
def test_readiness_reasons_without_worker_then_ready(stack: Stack, tmp_path: Path):
    env = _ops_env(stack, tmp_path, EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE="3")
    start_api(stack, env)
    response = stack.http.get(f"{stack.base_url}/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not-ready"
    assert body["checks"]["redis"] == "ok" and body["checks"]["rules"] == 7
    assert body["reasons"] == ["workers: no worker heartbeat in the last 3 s"]
    api_only = stack.http.get(f"{stack.base_url}/readyz", params={"scope": "api"})
    assert api_only.status_code == 200 and "workers" not in api_only.json()["checks"]

    # a batch waits in the queue: depth and age of the oldest batch
    stack.post_ndjson(_stream()[:3])
    time.sleep(1.2)
    text = stack.http.get(f"{stack.base_url}/metrics").text
    assert metric(text, "ehr_alerts_queue_depth", queue="ehr-alerts") == 1
    assert metric(text, "ehr_alerts_queue_oldest_age_seconds", queue="ehr-alerts") >= 1.0

    worker = start_worker(stack, env)
    wait_for(lambda: stack.http.get(f"{stack.base_url}/readyz").status_code == 200, 60, "a worker heartbeat")
    assert stack.http.get(f"{stack.base_url}/readyz").json()["checks"]["workers"] == 1
    stack.drain()
    # a worker that stops cleanly is forgotten at once; readiness says so
    os.killpg(worker.pid, 15)
    worker.wait(30)
    stack.workers.remove(worker)
    wait_for(lambda: stack.http.get(f"{stack.base_url}/readyz").status_code == 503, 20, "not ready again")
    assert "workers: no worker heartbeat" in stack.http.get(f"{stack.base_url}/readyz").json()["reasons"][0]
    # the liveness file is stale once the worker is gone
    wait_for(lambda: worker_alive(env).returncode == 1, 20, "stale heartbeat file")
    assert "more than 3 s" in worker_alive(env).stderr


@pytest.mark.slow
def test_readiness_when_redis_is_down(stack: Stack, tmp_path: Path):
    env = _ops_env(stack, tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    start_api(stack, env)
    response = stack.http.get(f"{stack.base_url}/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["redis"] == "unreachable"
    assert body["reasons"][0].startswith("redis: unreachable (ConnectionError")
    assert "workers: unknown (redis unreachable)" in body["reasons"]
    assert stack.http.get(f"{stack.base_url}/healthz").status_code == 200  # alive, just not ready
    text = stack.http.get(f"{stack.base_url}/metrics").text
    assert metric(text, "ehr_alerts_redis_up") == 0
