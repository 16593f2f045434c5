"""MedicationAdministration (R4) through every ingestion path (PUT, Bundle, $import, DELETE) with a real API, a real
worker and a real Redis: a magnesium dose charted for a hypokalemic patient answers "no Mg measured or given",
and deleting the dose brings the alert back."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from itest_builders import HYPOK, T0, bundle, potassium

MGSO4 = {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6585"}], "text": "MgSO4"}


def administration(rid: str, patient: str, at: datetime, status: str = "completed") -> dict[str, Any]:
    """A magnesium sulfate dose given at ``at``."""
    return {
        "resourceType": "MedicationAdministration",
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": (at + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")},
        "status": status,
        "medicationCodeableConcept": MGSO4,
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": at.isoformat().replace("+00:00", "Z"),
    }


def _open(stack, patient: str) -> set[str]:
    return {a["rule_id"] for a in stack.open_alerts(patient)}


def test_administrations_through_put_bundle_import_and_delete(stack):
    stack.start_api()
    stack.start_worker()
    for patient in ("ma-put", "ma-bundle", "ma-import"):
        response = stack.post_json(f"/fhir/Observation/k-{patient}", potassium(f"k-{patient}", patient, 3.1, T0), "PUT")
        assert response.status_code == 202, response.text
    stack.drain()
    assert _open(stack, "ma-put") == _open(stack, "ma-bundle") == _open(stack, "ma-import") == {HYPOK}

    dose_at = T0 + timedelta(hours=1)
    response = stack.post_json("/fhir/MedicationAdministration/ma-1", administration("ma-1", "ma-put", dose_at), "PUT")
    assert response.status_code == 202, response.text
    assert "1 accepted" in response.json()["issue"][0]["diagnostics"]
    response = stack.post_json("/fhir", bundle("transaction", [administration("ma-2", "ma-bundle", dose_at)]))
    assert response.status_code == 202, response.text
    line = json.dumps(administration("ma-3", "ma-import", dose_at)).encode() + b"\n"
    response = stack.post_ndjson(line)
    assert response.status_code == 202, response.text
    stack.drain()
    for patient in ("ma-put", "ma-bundle", "ma-import"):
        assert _open(stack, patient) == set(), patient  # Mg given: the hypokalemia card is answered

    # A dose that was not given does not count; deleting the given one brings the alert back.
    not_given = administration("ma-4", "ma-put", dose_at, status="not-done")
    assert stack.post_json("/fhir/MedicationAdministration/ma-4", not_given, "PUT").status_code == 202
    response = stack.post_json("/fhir/MedicationAdministration/ma-1", {}, method="DELETE")
    assert response.status_code == 202, response.text
    assert "ma-1: deleted" in json.dumps(response.json())
    stack.drain()
    assert _open(stack, "ma-put") == {HYPOK}


def test_an_administration_with_an_invalid_status_is_refused_naming_the_field(stack):
    stack.start_api()
    bad = administration("ma-bad", "ma-bad", T0)
    bad["status"] = "given"
    response = stack.post_json("/fhir/MedicationAdministration/ma-bad", bad, "PUT")
    assert response.status_code in (400, 422), response.text
    assert "MedicationAdministration.status" in json.dumps(response.json())
