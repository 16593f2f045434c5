"""Never a 500 from input: every member of valid calls and feedback replaced by odd values, through the ASGI
app (embedded mode: in-process Redis). Each answer must be 200, 4xx or 412 with a JSON body."""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from cds_support import HYPOK, SERVICE, hook_request, prefetch_for, queries, scenario, signed_client, validate
from fastapi.testclient import TestClient
from fhir_builders import shared_data_dir

ODD_VALUES: list[Any] = [None, "", [], {}, 0, -1.5, True, "x" * 300, [None], {"resourceType": "Bundle", "entry": "x"}]


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every member path of a JSON value (lists: first element only, to keep the run short)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from paths(inner, (*prefix, key))
    elif isinstance(value, list) and value:
        yield (*prefix, 0)
        yield from paths(value[0], (*prefix, 0))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    out = copy.deepcopy(value)
    holder = out
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = new
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app in process, trusting a test issuer; every request carries a fresh JWT for its exact URL."""
    with signed_client(tmp_path_factory.mktemp("issuer")) as c:
        yield c


SEEN: Counter[int] = Counter()


def _check(response: Any, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    assert response.status_code != 401, "the test token was refused: the run would prove nothing"
    SEEN[response.status_code] += 1
    json.loads(response.text)


@pytest.mark.parametrize("hook", ["patient-view", "order-sign"])
def test_no_member_of_a_call_can_cause_a_5xx(client: TestClient, hook: str) -> None:
    patient = "robust1"
    resources = scenario(HYPOK, patient)[:1]
    body = hook_request(hook, patient, prefetch_for(resources, patient))
    body["prefetch"] = {k: v for k, v in body["prefetch"].items()}
    url = f"/cds-services/{SERVICE[hook]}"
    checked = 0
    for path in paths(body):
        for odd in ODD_VALUES:
            _check(client.post(url, json=replaced(body, path, odd)), f"{path}={odd!r}")
            checked += 1
    assert checked > 200
    assert SEEN[200] > 10 and SEEN[400] > 10, SEEN  # odd values in optional places are tolerated, required ones refused


def test_no_member_of_feedback_can_cause_a_5xx(client: TestClient) -> None:
    item = {
        "card": "b3c2a1d0-0000-4000-8000-000000000000",
        "outcome": "overridden",
        "overrideReason": {"reason": {"system": "s", "code": "c", "display": "d"}, "userComment": "u"},
        "acceptedSuggestions": [{"id": "x"}],
        "outcomeTimestamp": "2024-05-01T12:00:00Z",
    }
    body = {"feedback": [item]}
    url = f"/cds-services/{SERVICE['patient-view']}/feedback"
    for path in paths(body):
        for odd in ODD_VALUES:
            _check(client.post(url, json=replaced(body, path, odd)), f"{path}={odd!r}")


@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b"{", b"\xff\xfe", b'{"hook": "patient-view"}' * 2, b"1e999"])
def test_odd_bodies_are_4xx(client: TestClient, raw: bytes) -> None:
    for path in (f"/cds-services/{SERVICE['order-select']}", f"/cds-services/{SERVICE['order-select']}/feedback"):
        response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (raw, response.status_code)


def _by_key(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """Real resources put under the prefetch keys by type (as an EHR would answer the templates)."""
    keys = {
        "Observation": "potassium",
        "Condition": "conditions",
        "MedicationStatement": "medicationStatements",
        "MedicationRequest": "medicationRequests",
        "ServiceRequest": "serviceRequests",
    }
    prefetch: dict[str, Any] = {q.key: None for q in queries()}
    for key in set(keys.values()):
        found = [r for r in resources if keys.get(r.get("resourceType", "")) == key]
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in found]}
    return prefetch


def test_real_shared_data_through_patient_view(client: TestClient) -> None:
    """Synthea patients and the HL7 R4 examples as prefetch: 200, schema-valid, and no card from Synthea
    (its potassium never goes below 3.70 and its dates are years old)."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    calls = 0
    for path in sorted((root / "synthea-r4").glob("*.json")):
        bundle = json.loads(path.read_text())
        resources = [e["resource"] for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]
        patient = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        body = hook_request("patient-view", patient, _by_key(resources))
        response = client.post(f"/cds-services/{SERVICE['patient-view']}", json=body)
        assert response.status_code == 200, (path.name, response.text[:300])
        validate(response.json(), "ServiceResponse")
        assert response.json() == {"cards": []}, path.name
        calls += 1
    examples = [json.loads(p.read_text()) for p in sorted((root / "fhir-r4-examples").glob("*.json"))]
    body = hook_request("patient-view", "example", _by_key(examples))
    response = client.post(f"/cds-services/{SERVICE['patient-view']}", json=body)
    assert response.status_code == 200, response.text[:300]
    validate(response.json(), "ServiceResponse")
    assert calls >= 5
