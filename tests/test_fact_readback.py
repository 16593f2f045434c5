"""Facts read back from the store: the times carry ``datetime.timezone.utc`` (what the engine compares fast), never
pydantic's ``TzInfo`` (issue 15: ``evaluate`` took 4x as long on such facts)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timezone

from rules.facts import Fact, PatientInfo
from workers.events import Event
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


def test_facts_of_a_queued_event_carry_stdlib_zones_with_the_same_instants_and_offsets():
    """The events of a batch (validated from the queue's JSON) are replayed on top of the window: their facts'
    times are ``datetime.timezone`` too, and serialise exactly as before (stored values stay comparable)."""
    fact = Fact.model_validate(
        {**_fact().model_dump(mode="json"), "start": "2024-05-01T12:00:00+02:00", "updated": "2024-05-01T10:00:00Z"}
    )
    assert type(fact.start.tzinfo) is not timezone  # pydantic's TzInfo
    raw = {"patient": "p1", "resource": "Observation/k1", "facts": [fact.model_dump(mode="json")]}
    event = Event.model_validate(raw | {"event_time": "2024-05-01T10:00:00Z"})
    [queued] = event.facts
    assert queued.updated.tzinfo is UTC
    assert type(queued.start.tzinfo) is timezone and queued.start == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert queued.model_dump_json() == fact.model_dump_json()
