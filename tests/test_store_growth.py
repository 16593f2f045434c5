"""Facts read back from the store: the times carry ``datetime.timezone.utc`` (what the engine compares fast), never
pydantic's ``TzInfo`` (issue 15: ``evaluate`` took 4x as long on such facts)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from rules.facts import Fact, PatientInfo
from workers.state.timeline import parse_facts


def _fact(**kw) -> Fact:
    base = dict(patient="p1", concept="potassium", kind="lab", resource_type="Observation", resource_id="k1")
    return Fact(**(base | kw))


def test_facts_read_back_carry_timezone_utc_not_pydantic_tzinfo():
    at = datetime(2024, 5, 1, 10, tzinfo=UTC)
    facts = [
        _fact(start=at, end=at, updated=at),
        _fact(
            concept="patient",
            kind="patient",
            resource_type="Patient",
            resource_id="p1",
            updated=at,
            patient_info=PatientInfo(deceased=at),
        ),
    ]
    payload = json.dumps([f.model_dump(mode="json") for f in facts])
    # what pydantic alone gives (the bug this guards against): validating the stored JSON yields TzInfo
    assert Fact.model_validate(json.loads(payload)[0]).start.tzinfo is not UTC
    lab, patient = parse_facts(payload)
    for moment in (lab.start, lab.end, lab.updated, patient.updated, patient.patient_info.deceased):
        assert moment == at
        assert moment.tzinfo is UTC
