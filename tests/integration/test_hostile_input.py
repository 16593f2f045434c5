"""Hostile input against the real API process and a real Redis: each 500 and stall the security review found
is a 4xx / 503 with an OperationOutcome now, a refused request stores nothing, and a 10 MB Bundle being
ingested does not block /healthz."""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import httpx
import pytest
from auth_helpers import review_env, review_headers
from conftest import free_port
from itest_builders import T0, bundle, potassium

from workers import inbox

JSON = {"Content-Type": "application/fhir+json"}
NDJSON = {"Content-Type": "application/fhir+ndjson"}
DEEP = b"[" * 10_000 + b"]" * 10_000


def outcome(response: httpx.Response) -> list[dict[str, Any]]:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"]


def nothing_stored(stack) -> None:
    assert inbox.size(stack.client) == 0
    assert stack.client.llen("ehr-alerts") == 0


def notification(status: dict[str, Any], *entries: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{"resource": {"resourceType": "SubscriptionStatus", "status": "active", **status}}, *entries],
    }


def test_deep_nesting_and_long_numbers_are_400_and_later_lines_still_get_in(stack):
    stack.start_api()
    for path in ("/fhir", "/fhir/Observation"):
        response = stack.request("POST", path, content=DEEP, headers=JSON)
        assert response.status_code == 400
        assert "EHR_ALERTS_MAX_JSON_DEPTH" in outcome(response)[0]["diagnostics"]
    big = b'{"resourceType": "Observation", "id": "n1", "valueInteger": ' + b"7" * 5000 + b"}"
    response = stack.request("POST", "/fhir/Observation", content=big, headers=JSON)
    assert response.status_code == 400 and "EHR_ALERTS_MAX_NUMBER_CHARS" in outcome(response)[0]["diagnostics"]
    nothing_stored(stack)
    good = json.dumps(potassium("k-after-deep", "deep-1", 3.1, T0)).encode()
    response = stack.request("POST", "/fhir/$import", content=DEEP + b"\n" + big + b"\n" + good, headers=NDJSON)
    assert response.status_code == 202, response.text
    text = json.dumps(outcome(response))
    assert "1 accepted" in text and "2 rejected" in text and "EHR_ALERTS_MAX_JSON_DEPTH" in text


def test_malformed_subscription_notifications_never_500(stack):
    stack.start_api()
    k = {"resource": potassium("k-note", "note-1", 3.1, T0)}
    shapes = [
        {"resourceType": "Bundle", "type": "history", "entry": ["a string"]},
        {"resourceType": "Bundle", "type": "history", "entry": {"resource": {}}},
        notification({"notificationEvent": [1], "subscription": {"reference": "Subscription/s1"}}),
        notification({"notificationEvent": [{"eventNumber": 1}], "subscription": "Subscription/s1"}),
        notification({"notificationEvent": [{"eventNumber": 1}], "subscription": {"reference": {"x": 1}}}),
        notification({"notificationEvent": [{"eventNumber": "²"}], "subscription": {"reference": "Subscription/s1"}}),
        notification({"notificationEvent": [{"eventNumber": "9" * 5000}], "subscription": {"reference": "S/1"}}),
        notification({"notificationEvent": {"eventNumber": 1}, "subscription": {"reference": "Subscription/s1"}}),
        notification({"notificationEvent": [{"eventNumber": 2**62}], "subscription": {"reference": "S/big"}}),
        notification({"type": ["heartbeat"], "notificationEvent": "x", "subscription": 5}),
        notification({"type": "event-notification", "notificationEvent": [{"eventNumber": 1}]}, k),
    ]
    for shape in shapes:
        response = stack.post_json("/fhir", shape)
        assert response.status_code in (200, 202, 400, 422), response.text
        outcome(response)


def test_event_number_gaps_survive_a_bogus_huge_number(stack):
    stack.start_api()
    sub = {"reference": "Subscription/gaps"}

    def send(number: int) -> list[dict[str, Any]]:
        status = {"type": "event-notification", "subscription": sub, "notificationEvent": [{"eventNumber": number}]}
        return outcome(stack.post_json("/fhir", notification(status)))

    send(1)
    assert any("implausible" in i["diagnostics"] for i in send(10**15))
    assert any("gap" in i["diagnostics"] and "expected 2, got 5" in i["diagnostics"] for i in send(5))


def test_heartbeat_carrying_entries_processes_them(stack):
    stack.start_api()
    status = {"type": "heartbeat", "subscription": {"reference": "Subscription/hb"}}
    response = stack.post_json("/fhir", notification(status, {"resource": potassium("k-hb", "hb-1", 3.0, T0)}))
    assert response.status_code == 202, response.text
    text = json.dumps(outcome(response))
    assert "1 accepted" in text and "processed as events" in text
    assert inbox.size(stack.client) == 1


@pytest.mark.parametrize("reference", ["urn:uuid:" + "a" * 1_000_000, "urn:uuid:../../../etc/passwd", "urn:uuid:a|b"])
def test_bad_patient_references_are_rejected(stack, reference):
    stack.start_api()
    k = potassium("k-ref", "x", 3.1, T0)
    k["subject"] = {"reference": reference}
    response = stack.post_json("/fhir", bundle("batch", [k]))
    assert response.status_code in (413, 422), response.text
    nothing_stored(stack)


def test_cursor_out_of_range_and_unparsable_review_body(stack, tmp_path):
    stack.start_api(**review_env(tmp_path))
    response = stack.request("GET", "/alerts", params={"cursor": str(10**30)})
    assert response.status_code == 400 and outcome(response)[0]["expression"] == ["query.cursor"]
    headers = {**review_headers("pharm", ["pharmacist"]), "Content-Type": "application/json"}
    response = stack.request("POST", "/api/review/alerts/a-1/transitions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and outcome(response)[0]["severity"] == "error"


def test_too_many_entries_is_413_fast_and_small(stack):
    stack.start_api()
    deletes = [{"request": {"method": "DELETE", "url": f"Observation/o{i}"}} for i in range(100_000)]
    started = time.monotonic()
    response = stack.post_json("/fhir", {"resourceType": "Bundle", "type": "batch", "entry": deletes})
    assert response.status_code == 413 and "EHR_ALERTS_MAX_BUNDLE_ENTRIES" in response.text
    assert len(response.content) < 2000 and time.monotonic() - started < 10
    nothing_stored(stack)


def test_chunked_ndjson_over_the_limit_stores_nothing(stack):
    stack.start_api(EHR_ALERTS_MAX_BODY_BYTES=str(1024 * 1024))
    line = json.dumps(potassium("k-chunk", "chunk-1", 3.1, T0)).encode() + b"\n"

    def chunks():  # no Content-Length: sent chunked, about 2 MB in all
        for i in range(2 * 1024 * 1024 // len(line)):
            yield line.replace(b"k-chunk", b"k-chunk-%d" % i)

    response = stack.request("POST", "/fhir/$import", content=chunks(), headers=NDJSON)
    assert response.status_code == 413 and "EHR_ALERTS_MAX_BODY_BYTES" in outcome(response)[0]["diagnostics"]
    nothing_stored(stack)


def _big_bundle(target: int) -> bytes:
    note = [{"text": "x" * 420}]
    entries, size, i = [], 0, 0
    while size < target:
        k = potassium(f"k-big-{i}", f"big-{i % 500}", 3.1, T0)
        k["note"] = note
        entries.append(k)
        size += len(json.dumps(k)) + 20
        i += 1
    return json.dumps(bundle("batch", entries)).encode()


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


@pytest.mark.slow
def test_healthz_answers_while_a_10_mb_bundle_is_ingested(stack):
    stack.start_api()
    body = _big_bundle(9_200_000)  # about 10.1 MB with the Bundle wrapping
    assert 9_500_000 < len(body) <= 10 * 1024 * 1024
    health = httpx.Client(base_url=stack.base_url, timeout=30)

    def probe() -> float:
        started = time.perf_counter()
        assert health.get("/healthz").status_code == 200
        return time.perf_counter() - started

    idle = [probe() for _ in range(200)]
    result: dict[str, Any] = {}

    def post() -> None:
        result["response"] = stack.http.post(f"{stack.base_url}/fhir", content=body, headers=JSON, timeout=300)

    sender = threading.Thread(target=post)
    sender.start()
    busy: list[float] = []
    while sender.is_alive():
        busy.append(probe())
        time.sleep(0.01)
    sender.join()
    assert result["response"].status_code == 202, result["response"].text[:300]
    assert len(busy) >= 50, "the ingestion finished too fast to measure"
    idle_p99, busy_p99 = _p99(idle), _p99(busy)
    print(f"healthz p99 idle {idle_p99 * 1000:.1f} ms, while ingesting {busy_p99 * 1000:.1f} ms ({len(busy)} probes)")
    # 100 ms on a quiet machine; the bound is a ratio to idle measured here, generous for a shared machine
    assert busy_p99 < max(0.1, 50 * idle_p99)


@pytest.mark.slow
def test_redis_down_answers_503_with_retry_after_on_every_route(stack, tmp_path):
    from auth_helpers import TestIssuer
    from conftest import feed_token

    from service.security.inventory import ROUTES

    ehr = TestIssuer(tmp_path, name="ehr")
    stack.start_api(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", **review_env(tmp_path), **ehr.env())
    admin = review_headers("root", ["admin"])
    feed = {"Authorization": f"Bearer {feed_token(stack.feed)}"}
    values = {"resource_type": "Observation", "resource_id": "o1", "patient_id": "p1", "alert_id": "a1"}
    values |= {"service_id": "mg-k-patient-view", "action": "acknowledge", "item_id": "dp-1"}
    must_be_503 = ("/fhir", "/alerts", "/patients", "/api/review/alerts", "/cds-services", "/audit", "/readyz")
    for (method, template), _ in sorted(ROUTES.items()):
        path = template.format(**values)
        if template.startswith(("/fhir", "/alerts", "/patients")):
            headers = feed
        elif template.startswith("/cds-services"):
            headers = ehr.headers(f"{stack.base_url}{path}")
        else:
            headers = admin
        body = json.dumps(potassium("o1", "p1", 3.1, T0)) if template.startswith("/fhir") else "{}"
        if template == "/fhir":
            body = json.dumps(bundle("batch", [potassium("o1", "p1", 3.1, T0)]))
        if template.endswith("/transitions"):
            body = json.dumps({"action": "acknowledge", "revision": 1})
        if template == "/fhir/$import":
            headers = {**headers, **NDJSON}
        else:
            headers = {**headers, "Content-Type": "application/json"}
        response = stack.http.request(method, f"{stack.base_url}{path}", content=body, headers=headers)
        assert response.status_code != 500, f"{method} {path}: {response.text[:200]}"
        if path.startswith(must_be_503) and (method == "GET" or path.startswith(("/fhir", "/cds-services"))):
            assert response.status_code == 503, f"{method} {path}: {response.status_code} {response.text[:200]}"
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) > 0, f"{method} {path}"
            if path != "/readyz":  # readiness keeps its checks / reasons body
                outcome(response)
