"""The medication prefetch follows what the rules count (issue 10 item 12: an order counts for the time it was
active).

``refractory-hypokalemia-on-diuretic`` reads its diuretic and potassium inputs with ``select: active`` and a 72 h
look-back, and the normaliser counts a completed or stopped order / statement for the period it covered and an
administration at its time. So the prefetch asks for ongoing records (active, on-hold) whatever their age, and
for finished records and administrations within the rules' widest medication window: what the stream counts, a
CDS call counts too."""

from __future__ import annotations

import pytest
from cds_support import REFRACTORY, h, now, prefetch_for, queries
from fhir_builders import FUROSEMIDE, med_request, med_statement, potassium

from rules.engine import evaluate
from service.cds.orders import facts_from
from workers.pipeline import get_catalog


def _outcome(resources: list[dict], patient: str) -> str:
    rules = [r for r in get_catalog().evaluated() if r.id == REFRACTORY]
    decisions = evaluate(rules, facts_from(resources, patient, include_preliminary=False), now(), patient)
    return decisions[0].outcome


def _low_k(patient: str) -> list[dict]:
    return [potassium(3.2, at=h(40), patient=patient), potassium(3.3, at=h(4), patient=patient)]


def _prefetched(resources: list[dict], patient: str) -> list[dict]:
    values = [v for v in prefetch_for(resources, patient).values() if v is not None]  # the Patient read is null here
    return [e["resource"] for b in values for e in b["entry"]]


def _administration(patient: str, at: str) -> dict:
    return {
        "resourceType": "MedicationAdministration",
        "id": f"{patient}-dose",
        "status": "completed",
        "medicationCodeableConcept": FUROSEMIDE,
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": at,
    }


@pytest.mark.parametrize("status", ["stopped", "completed", "on-hold"])
@pytest.mark.parametrize("kind", ["statement", "request"])
def test_a_diuretic_stopped_inside_the_look_back_counts_and_is_prefetched(status: str, kind: str) -> None:
    patient = f"medwin-{kind}-{status}"
    if kind == "statement":
        med = med_statement(FUROSEMIDE, status=status, start=h(24 * 2), end=h(24), patient=patient)
    else:
        validity = {"validityPeriod": {"start": h(24 * 2), "end": h(24)}}
        med = med_request(FUROSEMIDE, status=status, authored=h(24 * 2), patient=patient, dispenseRequest=validity)
    resources = [med, *_low_k(patient)]
    assert _outcome(resources, patient) == "fires"
    assert med["id"] in {r["id"] for r in _prefetched(resources, patient)}
    assert _outcome(_prefetched(resources, patient), patient) == "fires"


def test_a_diuretic_administered_in_the_window_counts_and_is_prefetched() -> None:
    patient = "medwin-administration"
    resources = [_administration(patient, h(30)), *_low_k(patient)]
    assert _outcome(resources, patient) == "fires"
    assert _outcome(_prefetched(resources, patient), patient) == "fires"


def test_an_active_diuretic_whose_period_ended_inside_the_look_back_counts_and_is_prefetched() -> None:
    patient = "medwin-active-ended"
    med = med_statement(FUROSEMIDE, status="active", start=h(24 * 20), end=h(24), patient=patient)
    resources = [med, *_low_k(patient)]
    assert _outcome(resources, patient) == "fires"
    prefetched = prefetch_for(resources, patient)
    assert [e["resource"]["id"] for e in prefetched["medicationStatements"]["entry"]] == [med["id"]]
    assert _outcome(_prefetched(resources, patient), patient) == "fires"


def test_the_medication_searches() -> None:
    by_key = {q.key: q for q in queries()}
    for key in ("medicationStatements", "medicationRequests"):
        assert ("status", "active,on-hold") in by_key[key].params and by_key[key].window_hours is None
    for key, status in (
        ("medicationStatementsFinished", "completed,stopped"),
        ("medicationRequestsFinished", "completed,stopped"),
        ("medicationAdministrations", "completed,in-progress,stopped"),
    ):
        assert ("status", status) in by_key[key].params
        assert by_key[key].window_hours is not None and by_key[key].window_hours >= 72
