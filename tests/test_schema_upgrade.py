"""Upgrades: data stored by this release (tests/fixtures/stored-v1-f1.json, written by make_stored_data.py)
must stay readable by later releases, and processing continues on top of it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from fhir_builders import magnesium

import workers.state.schema_upgrade as upgrade
from config.settings import Settings, get_settings
from rules.facts import FACT_SCHEMA_VERSION
from rules.normalize import NormalizeOptions, normalize_resource
from workers.events import events_from
from workers.pipeline import process_batch
from workers.state.store import ALERT_SCHEMA_VERSION, Store

FIXTURES = Path(__file__).parent / "fixtures"
V1 = json.loads((FIXTURES / "stored-v1-f1.json").read_text())


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store on a fakeredis holding exactly what the fixture recorded."""
    monkeypatch.setenv("EHR_ALERTS_KEY_PREFIX", V1["key_prefix"])
    get_settings.cache_clear()
    client = fakeredis.FakeRedis(decode_responses=True)
    for key, item in V1["keys"].items():
        kind, value = item["type"], item["value"]
        if kind == "hash":
            client.hset(key, mapping=value)
        elif kind == "zset":
            client.zadd(key, {member: score for member, score in value})
        elif kind == "set":
            client.sadd(key, *value)
        elif kind == "list":
            client.rpush(key, *value)
        else:
            client.set(key, value)
    yield Store(client, Settings(key_prefix=V1["key_prefix"]))
    monkeypatch.undo()
    get_settings.cache_clear()


def _patients() -> list[str]:
    return sorted(k.split("{p:")[1].split("}")[0] for k in V1["keys"] if k.endswith(":facts"))


def test_fixture_is_in_the_first_format():
    assert V1["alert_schema_version"] == 1 and V1["fact_schema_version"] == 1


def test_every_version_bump_has_an_upgrade_step():
    assert upgrade.missing_steps() == []
    assert V1["alert_schema_version"] <= ALERT_SCHEMA_VERSION and V1["fact_schema_version"] <= FACT_SCHEMA_VERSION


def test_current_release_reads_the_stored_timelines_and_alerts(store: Store):
    patients = _patients()
    assert len(patients) >= 10
    for patient in patients:
        facts = store.timeline(patient)
        assert facts and all(f.patient == patient and f.schema_version == FACT_SCHEMA_VERSION for f in facts)
    alerts = [a for p in patients for a in store.alerts_for_patient(p)]
    assert {a["status"] for a in alerts} >= {"active", "acknowledged", "resolved", "retracted"}
    assert all(a["schema_version"] == ALERT_SCHEMA_VERSION for a in alerts)
    acknowledged = next(a for a in alerts if a["status"] == "acknowledged")
    assert store.find_alert(acknowledged["id"]) == acknowledged
    assert acknowledged["history"][-1]["by"] == "user:fixture"
    page, _ = store.list_alerts(status="active", limit=50)
    assert page and all(a["status"] == "active" for a in page)


def test_processing_continues_on_stored_data(store: Store):
    """A magnesium result for a stored patient resolves the stored 'no magnesium' alert."""
    alert = next(
        a
        for p in _patients()
        for a in store.alerts_for_patient(p, open_only=True)
        if a["rule_id"] == "hypokalemia-without-magnesium" and a["status"] == "active"
    )
    patient = alert["patient"]
    clock = max(f.start for f in store.timeline(patient) if f.start)
    later = clock.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    event = events_from(
        normalize_resource(magnesium(0.85, patient=patient, at=later, id="mg-after-upgrade"), NormalizeOptions()),
        datetime.now(UTC),
    )
    assert event is not None
    counts = process_batch([event.model_dump(mode="json")], store)
    assert counts["alerts_resolved"] == 1
    assert store.get_alert(patient, alert["id"])["status"] == "resolved"


def _fact_payloads() -> list[dict[str, Any]]:
    values = [v for k, item in V1["keys"].items() if k.endswith(":facts") for v in item["value"].values()]
    return [fact for value in values for fact in json.loads(value.split("\t", 2)[2])]


def test_v1_facts_read_as_v2_without_patient_context(store: Store):
    """Fact schema 2 (patient context, encounter links, the lab's reference range): a v1 fact has none of them."""
    assert FACT_SCHEMA_VERSION == 2
    facts = [f for p in _patients() for f in store.timeline(p)]
    assert facts and all(f.schema_version == 2 for f in facts)
    assert all(f.encounter is None and f.reference_low is None and f.patient_info is None for f in facts)
    assert not {f.concept for f in facts} & {"patient", "encounter", "dialysis", "egfr", "creatinine"}


def test_a_newer_release_upgrades_the_stored_format(store: Store, monkeypatch: pytest.MonkeyPatch):
    """Simulate release N+1: formats bumped with a step each; the v1 fixture reads through every step."""
    later = FACT_SCHEMA_VERSION + 1

    def fact_step(record: dict[str, Any]) -> dict[str, Any]:
        record["notes"] = [*record.get("notes", []), f"upgraded from schema {FACT_SCHEMA_VERSION}"]
        return record

    def alert_1_to_2(record: dict[str, Any]) -> dict[str, Any]:
        record["origin"] = "stream"  # a field the new release would add
        return record

    monkeypatch.setattr(upgrade, "FACT_SCHEMA_VERSION", later)
    monkeypatch.setattr(upgrade, "alert_schema_version", lambda: 2)
    monkeypatch.setitem(upgrade._FACT_STEPS, FACT_SCHEMA_VERSION, fact_step)
    monkeypatch.setitem(upgrade._ALERT_STEPS, 1, alert_1_to_2)
    assert upgrade.missing_steps() == []
    facts = store.timeline(_patients()[0])
    assert facts and all(f.schema_version == later and f"upgraded from schema {FACT_SCHEMA_VERSION}" in f.notes
                         for f in facts)  # fmt: skip
    alerts = store.alerts_for_patient(_patients()[0])
    assert alerts and all(a["schema_version"] == 2 and a["origin"] == "stream" for a in alerts)


def test_a_forgotten_upgrade_step_is_reported(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(upgrade, "alert_schema_version", lambda: 2)
    assert upgrade.missing_steps() == ["alert 1->2"]
    with pytest.raises(RuntimeError, match="no upgrade step for alert schema_version 1 -> 2"):
        upgrade.upgrade_alert({"schema_version": 1})


def test_records_from_a_newer_release_are_refused():
    fact = {**_fact_payloads()[0], "schema_version": FACT_SCHEMA_VERSION + 1}
    with pytest.raises(upgrade.SchemaTooNewError, match="newer than this release"):
        upgrade.upgrade_fact(fact)
    with pytest.raises(ValueError, match="invalid schema_version"):
        upgrade.upgrade_alert({"schema_version": "one"})


def test_records_without_a_version_are_the_first_format():
    fact = {k: v for k, v in _fact_payloads()[0].items() if k != "schema_version"}
    new = ("encounter", "reference_low", "reference_low_reported", "patient_info", "encounter_info")
    assert upgrade.upgrade_fact(dict(fact)) == {**fact, **dict.fromkeys(new), "schema_version": 2}


def test_user_transitions_are_counted_once_per_idempotency_key(store: Store):
    """The alert-transition metric counts review actions too (``alerts_<kind>:<rule>`` counters)."""
    alert = next(a for p in _patients() for a in store.alerts_for_patient(p) if a["status"] == "active")
    at = datetime(2024, 3, 14, 9, 0, tzinfo=UTC)
    field = f"alerts_acknowledged:{alert['rule_id']}"
    before = store.counters().get(field, 0)
    store.transition(alert["id"], "acknowledge", "user:alice", at, idempotency_key="k-1")
    store.transition(alert["id"], "acknowledge", "user:alice", at.replace(minute=5), idempotency_key="k-1")  # repeat
    assert store.counters()[field] == before + 1
    store.transition(alert["id"], "resolve", "user:alice", at.replace(minute=10))
    assert store.counters()[f"alerts_resolved-by-user:{alert['rule_id']}"] >= 1


def test_the_fact_schema_2_fixture_reads_back_with_patient_context():
    """stored-v1-f2.json (this release, written by make_stored_data.py): Patient facts with their details, and the
    worklist's context index beside the timelines."""
    from workers.state.timeline import parse_facts

    v2 = json.loads((FIXTURES / "stored-v1-f2.json").read_text())
    assert v2["fact_schema_version"] == 2
    payloads = [v for k, item in v2["keys"].items() if k.endswith(":facts") for v in item["value"].values()]
    facts = [f for value in payloads for f in parse_facts(value.split("\t", 2)[2])]
    people = [f for f in facts if f.concept == "patient"]
    assert len(people) == 12 and all(f.patient_info and f.patient_info.birth_date for f in people)
    assert v2["keys"]["fx:context:patients"]["value"]["ex-alpha"].startswith(tuple("0123456789"))
