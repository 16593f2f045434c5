"""End to end over HTTP: the example stream, single resources, Bundles, bad input and Subscriptions
notifications, through the real API and a real Celery worker on a real Redis."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from itest_builders import ARRHYTHMIA, HYPOK, REFRACTORY, T0, bundle, lab, magnesium, potassium

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stream" / "events.ndjson"


def _open(stack, patient: str) -> dict[str, str | None]:
    return {a["rule_id"]: a["severity"] for a in stack.open_alerts(patient)}


@pytest.mark.parametrize("batch_size", ["1", "200"])
def test_example_stream_end_to_end(stack, batch_size):
    stack.start_api(EHR_ALERTS_BATCH_SIZE=batch_size)
    stack.start_worker()
    response = stack.post_ndjson(EXAMPLE.read_bytes())
    assert response.status_code == 202, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "0 rejected" in outcome["issue"][0]["diagnostics"]
    stack.drain()

    assert _open(stack, "ex-alpha") == {HYPOK: "info"}
    assert _open(stack, "ex-bravo") == {HYPOK: "warning"}
    assert _open(stack, "ex-delta") == {HYPOK: "info", REFRACTORY: "warning"}
    assert _open(stack, "ex-echo") == {HYPOK: "info"}
    assert _open(stack, "ex-foxtrot") == {ARRHYTHMIA: "warning"}  # AF recorded this stay, Mg not below 0.5
    assert _open(stack, "ex-golf") == {ARRHYTHMIA: "critical"}
    for patient in ("ex-charlie", "ex-hotel", "ex-india", "ex-juliet", "ex-kilo", "ex-lima"):
        assert _open(stack, patient) == {}, patient
    # Transitions only an in-order stream of single events shows (one 40-event batch is evaluated once per
    # patient as of its latest event, so nothing opens): Charlie resolved, Hotel retracted, India resolved.
    every = {
        p: stack.request("GET", f"/patients/{p}/alerts", params={"open_only": False}).json()["alerts"]
        for p in ("ex-charlie", "ex-hotel", "ex-india")
    }
    if batch_size == "1":
        assert [(a["rule_id"], a["status"]) for a in every["ex-charlie"]] == [(HYPOK, "resolved")]
        assert [(a["rule_id"], a["status"]) for a in every["ex-hotel"]] == [(HYPOK, "retracted")]
        assert [(a["rule_id"], a["status"]) for a in every["ex-india"]] == [(HYPOK, "resolved")]
    else:
        assert all(a["status"] in ("resolved", "retracted") for alerts in every.values() for a in alerts)
    # Kilo: undecidable (mg% unit) is counted, never silently normal.
    counters = stack.store.counters()
    assert counters.get("decisions_indeterminate", 0) >= 1
    assert stack.store.dead_letters() == []
    # One alert per patient and rule that is open: the hospital-wide list agrees.
    listed = stack.request("GET", "/alerts", params={"status": "active", "limit": 500}).json()["alerts"]
    assert sorted((a["patient"], a["rule_id"]) for a in listed) == sorted(
        [
            ("ex-alpha", HYPOK),
            ("ex-bravo", HYPOK),
            ("ex-delta", HYPOK),
            ("ex-delta", REFRACTORY),
            ("ex-echo", HYPOK),
            ("ex-foxtrot", ARRHYTHMIA),
            ("ex-golf", ARRHYTHMIA),
        ]
    )


def test_put_single_resource_and_transaction_bundle(stack):
    stack.start_api()
    stack.start_worker()
    k = potassium("k-put-1", "put-1", 2.7, T0)
    response = stack.post_json("/fhir/Observation/k-put-1", k, method="PUT")
    assert response.status_code == 202, response.text
    tx = bundle(
        "transaction",
        [
            potassium("k-tx-1", "tx-1", 3.2, T0),
            potassium("k-tx-2", "tx-2", 3.3, T0),
            magnesium("mg-tx-2", "tx-2", 0.8, T0 + timedelta(hours=1)),
        ],
    )
    response = stack.post_json("/fhir", tx)
    assert response.status_code == 202, response.text
    assert "3 accepted" in response.json()["issue"][0]["diagnostics"]
    stack.drain()
    assert _open(stack, "put-1") == {HYPOK: "warning"}
    assert _open(stack, "tx-1") == {HYPOK: "info"}
    assert _open(stack, "tx-2") == {}
    # A PUT whose id does not match the URL is refused.
    response = stack.post_json("/fhir/Observation/other-id", k, method="PUT")
    assert response.status_code == 400
    assert "id" in json.dumps(response.json())


def test_deletes_retract_the_resource_and_its_alerts(stack):
    stack.start_api()
    stack.start_worker()
    for patient in ("del-1", "del-2"):
        response = stack.post_json(f"/fhir/Observation/k-{patient}", potassium(f"k-{patient}", patient, 3.1, T0), "PUT")
        assert response.status_code == 202, response.text
    stack.drain()
    assert _open(stack, "del-1") == _open(stack, "del-2") == {HYPOK: "info"}
    # A rest-hook style DELETE, and a DELETE entry in a transaction Bundle (with a conditional delete and an
    # unknown resource, which are reported, not applied).
    response = stack.post_json("/fhir/Observation/k-del-1", {}, method="DELETE")
    assert response.status_code == 202, response.text
    assert "k-del-1: deleted" in json.dumps(response.json())
    tx = bundle("transaction", [])
    tx["entry"] = [
        {"request": {"method": "DELETE", "url": "Observation/k-del-2"}},
        {"request": {"method": "DELETE", "url": "Observation?code=2823-3"}},
        {"request": {"method": "DELETE", "url": "Observation/never-seen"}},
    ]
    response = stack.post_json("/fhir", tx)
    assert response.status_code == 202, response.text
    issues = response.json()["issue"]
    assert "1 accepted, 2 ignored" in issues[0]["diagnostics"]
    assert any(i["severity"] == "warning" and i["expression"] == ["Bundle.entry[1].request"] for i in issues)
    stack.drain()
    for patient in ("del-1", "del-2"):
        assert _open(stack, patient) == {}
        [alert] = stack.request("GET", f"/patients/{patient}/alerts?open_only=false").json()["alerts"]
        assert alert["status"] == "retracted"
    # A repeated delete changes nothing.
    assert stack.post_json("/fhir/Observation/k-del-1", {}, method="DELETE").status_code == 202
    stack.drain()
    [alert] = stack.request("GET", "/patients/del-1/alerts?open_only=false").json()["alerts"]
    assert alert["status"] == "retracted"


def test_bad_input(stack):
    stack.start_api(EHR_ALERTS_MAX_BODY_BYTES="100000")
    stack.start_worker()
    fhir_json = {"Content-Type": "application/fhir+json"}

    # Malformed JSON.
    response = stack.request("POST", "/fhir", content=b'{"resourceType": "Bundle", ', headers=fhir_json)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "malformed JSON" in response.json()["issue"][0]["diagnostics"]
    response = stack.request("PUT", "/fhir/Observation/x1", content=b"{nope", headers=fhir_json)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"

    # Wrong resourceType for the URL.
    response = stack.post_json(
        "/fhir/Observation/k-wrong",
        {**potassium("k-wrong", "bad-1", 3.0, T0), "resourceType": "Condition"},
        method="PUT",
    )
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["resourceType"]
    response = stack.post_json("/fhir", potassium("k-nb", "bad-1", 3.0, T0))
    assert response.status_code == 400

    # A batch with one invalid entry (bad status code) and valid ones: 202, the issue names the field,
    # the valid entries are processed.
    invalid = potassium("k-invalid", "bad-2", 2.5, T0)
    invalid["status"] = "not-a-status"
    batch = bundle("batch", [potassium("k-ok-1", "bad-3", 3.2, T0), invalid, potassium("k-ok-2", "bad-4", 2.9, T0)])
    response = stack.post_json("/fhir", batch)
    assert response.status_code == 202, response.text
    entry_issues = [i for i in response.json()["issue"] if i["severity"] == "error"]
    assert entry_issues, response.text
    assert all("entry[1]" in e for i in entry_issues for e in i.get("expression", [])), entry_issues
    assert any("status" in e for i in entry_issues for e in i.get("expression", [])), entry_issues

    # Unknown unit: accepted with a warning, the decision indeterminate and counted.
    odd = lab("mg-odd", "bad-5", "19123-9", 1.5, "mg%", T0, ucum=False)
    response = stack.post_json("/fhir/Observation/mg-odd", odd, method="PUT")
    assert response.status_code == 202, response.text
    warnings = [i for i in response.json()["issue"] if i["severity"] == "warning"]
    assert warnings and any("indeterminate" in i["diagnostics"] for i in warnings), response.text
    before = stack.store.counters().get("decisions_indeterminate", 0)
    k_odd = lab("k-odd", "bad-6", "2823-3", 3.1, "furlongs", T0, ucum=False)
    response = stack.post_ndjson([k_odd])
    assert response.status_code == 202, response.text
    assert any(i["severity"] == "warning" for i in response.json()["issue"]), response.text

    # Body over the limit.
    big = b"\n".join([json.dumps(potassium(f"k-big-{i}", "big", 3.0, T0)).encode() for i in range(400)])
    assert len(big) > 100_000
    response = stack.post_ndjson(big)
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"
    response = stack.request(
        "POST", "/fhir", content=b'{"resourceType":"Bundle","entry":[' + b" " * 100_100 + b"]}", headers=fhir_json
    )
    assert response.status_code == 413

    # Wrong Content-Type.
    response = stack.request(
        "POST", "/fhir/$import", content=EXAMPLE.read_bytes()[:2000], headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    response = stack.request("POST", "/fhir", content=json.dumps(batch), headers={"Content-Type": "text/xml"})
    assert response.status_code == 415

    # Odd but not malicious input never gives a 5xx (asserted inside stack.request).
    for body in (
        b"[]",
        b"null",
        b'"x"',
        b'{"resourceType":"Bundle","entry":{}}',
        b'{"resourceType":"Bundle",'
        b'"entry":[null, 1, {"resource": null}, {"resource": {"resourceType": "Observation"}}]}',
    ):
        response = stack.request("POST", "/fhir", content=body, headers=fhir_json)
        assert response.status_code in (200, 202, 400, 422), (body, response.status_code, response.text)
    response = stack.request(
        "POST", "/fhir/$import", content=b"{bad\n\n[1]\nnull\n", headers={"Content-Type": "application/fhir+ndjson"}
    )
    assert response.status_code in (202, 400, 422)

    stack.drain()
    assert _open(stack, "bad-3") == {HYPOK: "info"}
    assert _open(stack, "bad-4") == {HYPOK: "warning"}
    assert _open(stack, "bad-2") == {}
    assert stack.store.counters().get("decisions_indeterminate", 0) > before
    assert _open(stack, "bad-6") == {}  # unknown K unit: not an alert, and not silently normal (counted)
    assert stack.store.dead_letters() == []


def _notification(subscription: str, kind: str, numbers: list[int], resources: list[dict]) -> dict:
    parameters = [
        {"name": "subscription", "valueReference": {"reference": subscription}},
        {"name": "topic", "valueCanonical": "http://example.org/topics/lab-results"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
    ]
    if numbers:
        parameters.append({"name": "events-since-subscription-start", "valueString": str(max(numbers))})
    for n in numbers:
        parameters.append(
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": str(n)},
                    {"name": "timestamp", "valueInstant": "2024-04-01T07:00:00Z"},
                ],
            }
        )
    status = {
        "resourceType": "Parameters",
        "id": f"status-{numbers}",
        "meta": {
            "profile": [
                "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
            ]
        },
        "parameter": parameters,
    }
    entries = [{"fullUrl": "urn:uuid:status", "resource": status}]
    entries += [
        {
            "fullUrl": f"http://ehr.example/fhir/Observation/{r['id']}",
            "resource": r,
            "request": {"method": "PUT", "url": f"Observation/{r['id']}"},
        }
        for r in resources
    ]
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2024-04-01T07:00:00Z", "entry": entries}


def test_subscription_notifications(stack):
    stack.start_api()
    stack.start_worker()
    sub = "Subscription/lab-k"
    response = stack.post_json("/fhir", _notification(sub, "handshake", [], []))
    assert response.status_code == 200, response.text

    response = stack.post_json(
        "/fhir", _notification(sub, "event-notification", [1], [potassium("k-sub-1", "sub-1", 3.2, T0)])
    )
    assert response.status_code == 202, response.text
    assert not any("gap" in i["diagnostics"] for i in response.json()["issue"])
    response = stack.post_json(
        "/fhir", _notification(sub, "event-notification", [2], [potassium("k-sub-2", "sub-2", 2.8, T0)])
    )
    assert response.status_code == 202
    assert not any("gap" in i["diagnostics"] for i in response.json()["issue"])
    # 3 and 4 were lost.
    response = stack.post_json(
        "/fhir", _notification(sub, "event-notification", [5], [potassium("k-sub-5", "sub-5", 3.1, T0)])
    )
    assert response.status_code == 202
    gaps = [i for i in response.json()["issue"] if "gap" in i["diagnostics"]]
    assert gaps and gaps[0]["severity"] == "warning", response.text
    response = stack.post_json("/fhir", _notification(sub, "heartbeat", [], []))
    assert response.status_code == 200

    stack.drain()
    assert _open(stack, "sub-1") == {HYPOK: "info"}
    assert _open(stack, "sub-2") == {HYPOK: "warning"}
    assert _open(stack, "sub-5") == {HYPOK: "info"}
