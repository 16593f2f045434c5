"""FHIR R4 resource builders for the integration tests (imported as a plain module: pytest puts this
directory on sys.path, the package-less "prepend" import mode)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LAB = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]
HYPOK = "hypokalemia-without-magnesium"
REFRACTORY = "refractory-hypokalemia-on-diuretic"
ARRHYTHMIA = "arrhythmia-with-low-magnesium"
T0 = datetime(2024, 4, 1, 6, 0, tzinfo=UTC)


def ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def lab(
    rid: str,
    patient: str,
    code: str,
    value: float,
    unit: str,
    effective: datetime,
    *,
    version: int = 1,
    status: str = "final",
    ucum: bool = True,
    updated: datetime | None = None,
) -> dict[str, Any]:
    issued = effective + timedelta(minutes=40)
    quantity: dict[str, Any] = {"value": value, "unit": unit}
    if ucum:
        quantity |= {"system": UCUM, "code": unit}
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": {"versionId": str(version), "lastUpdated": ts(updated or issued)},
        "status": status,
        "category": LAB,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": ts(effective),
        "issued": ts(issued),
        "valueQuantity": quantity,
    }


def potassium(rid: str, patient: str, value: float, effective: datetime, **kw: Any) -> dict[str, Any]:
    return lab(rid, patient, "2823-3", value, "mmol/L", effective, **kw)


def magnesium(rid: str, patient: str, value: float, effective: datetime, **kw: Any) -> dict[str, Any]:
    return lab(rid, patient, "2601-3", value, "mmol/L", effective, **kw)


def furosemide(rid: str, patient: str, since: str = "2023-01-01") -> dict[str, Any]:
    return {
        "resourceType": "MedicationStatement",
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": "2024-03-01T00:00:00Z"},
        "status": "active",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "4603", "display": "furosemide"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectivePeriod": {"start": since},
        "dateAsserted": "2024-03-01T00:00:00Z",
    }


def bundle(kind: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    entries = []
    for r in resources:
        entry: dict[str, Any] = {"fullUrl": f"urn:uuid:{r.get('resourceType')}-{r.get('id')}", "resource": r}
        if kind in ("transaction", "batch"):
            entry["request"] = {"method": "PUT", "url": f"{r.get('resourceType')}/{r.get('id')}"}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def alert_state(alerts: list[dict[str, Any]]) -> list[tuple[str, str, str | None, tuple[str, ...]]]:
    """Comparable open-alert state: rule, status, severity, evidence references."""
    return sorted(
        (
            a["rule_id"],
            a["status"],
            a.get("severity"),
            tuple(
                sorted(
                    f"{e['resource_type']}/{e['resource_id']}/_history/{e.get('version')}"
                    for e in a.get("evidence") or []
                )
            ),
        )
        for a in alerts
    )
