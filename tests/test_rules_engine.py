"""Engine-wide behaviour: explicit time, determinism, patients, evidence and the card shape."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir_builders import (
    AF_SNOMED,
    ARRHYTHMIA,
    FUROSEMIDE,
    HYPOK,
    NOW,
    REFRACTORY,
    ago,
    condition,
    decide,
    ecg_panel,
    facts_of,
    magnesium,
    med_request,
    med_statement,
    potassium,
    qtc,
    rule,
    rxnorm,
    walk,
)

from rules.catalog import Catalog
from rules.engine import evaluate

# --- catalog -----------------------------------------------------------------------------------------


SHADOW_RULES = {
    "hypokalemia-with-low-magnesium-untreated",
    "severe-hypomagnesemia-untreated",
    "digoxin-with-low-potassium-or-magnesium",
    "prolonged-qtc-with-hypokalemia",
}


def test_catalog_loads_the_three_active_rules_and_four_shadow_ones(catalog: Catalog):
    assert {r.id for r in catalog.rules} == {HYPOK, REFRACTORY, ARRHYTHMIA, *SHADOW_RULES}
    assert {r.id for r in catalog.rules if r.status == "active"} == {HYPOK, REFRACTORY, ARRHYTHMIA}
    assert {r.id for r in catalog.rules if r.status == "shadow"} == SHADOW_RULES
    assert {r.id for r in catalog.evaluated()} == {HYPOK, REFRACTORY, ARRHYTHMIA, *SHADOW_RULES}
    assert catalog.get("no-such-rule") is None


def test_every_embedded_rule_test_passed(catalog: Catalog):
    assert catalog.test_reports
    failed = [(r.rule_id, r.name, r.message) for r in catalog.test_reports if not r.passed]
    assert failed == []


# --- explicit time and determinism -------------------------------------------------------------------


def _scenario() -> list[dict[str, Any]]:
    return [
        med_statement(FUROSEMIDE, start="2024-04-20"),
        potassium(3.2, at=ago(30)),
        potassium(3.1, at=ago(2)),
        condition(AF_SNOMED),
        magnesium(0.6, at=ago(1)),
    ]


def test_same_facts_give_identical_decisions(catalog: Catalog):
    facts = facts_of(*_scenario())
    first = [d.model_dump() for d in evaluate(catalog.evaluated(), facts, NOW)]
    second = [d.model_dump() for d in evaluate(catalog.evaluated(), list(reversed(facts)), NOW)]
    assert first == second
    assert {d["outcome"] for d in first} == {"fires", "not-fires"}


def test_decisions_carry_rule_version_patient_and_as_of(catalog: Catalog):
    decisions = evaluate(catalog.evaluated(), facts_of(*_scenario()), NOW)
    assert len(decisions) == 7
    for decision in decisions:
        assert decision.patient == "p1"
        assert decision.as_of == "2024-05-01T12:00:00Z"
        assert decision.rule_version == rule(decision.rule_id).version
        assert decision.explanation


def test_fact_dated_after_as_of_is_ignored():
    future_mg = magnesium(0.8, at=ago(-0.5))
    assert decide(HYPOK, potassium(3.1), future_mg).outcome == "fires"
    assert decide(HYPOK, potassium(3.1), future_mg, as_of=NOW + timedelta(hours=1)).outcome == "not-fires"


def test_replay_at_an_earlier_instant_sees_only_earlier_facts():
    resources = [potassium(3.1, at=ago(10)), potassium(4.2, at=ago(1))]
    assert decide(HYPOK, *resources).outcome == "not-fires"
    assert decide(HYPOK, *resources, as_of=NOW - timedelta(hours=5)).outcome == "fires"


def test_naive_as_of_is_refused(catalog: Catalog):
    with pytest.raises(ValueError, match="timezone"):
        evaluate(catalog.evaluated(), facts_of(potassium(3.1)), datetime(2024, 5, 1, 12, 0))


def test_non_utc_as_of_is_the_same_instant(catalog: Catalog):
    from datetime import timezone

    plus2 = NOW.astimezone(timezone(timedelta(hours=2)))
    facts = facts_of(potassium(3.1, at=ago(71.5)))
    a = evaluate(catalog.evaluated(), facts, NOW)
    b = evaluate(catalog.evaluated(), facts, plus2)
    assert [d.outcome for d in a] == [d.outcome for d in b]
    assert [d.as_of for d in a] == [d.as_of for d in b]


def test_evaluate_covers_every_patient_or_only_the_one_asked_for(catalog: Catalog):
    facts = facts_of(potassium(3.1, patient="a"), potassium(4.1, patient="b"))
    decisions = evaluate(catalog.evaluated(), facts, NOW)
    assert {d.patient for d in decisions} == {"a", "b"}
    hypok = {d.patient: d.outcome for d in decisions if d.rule_id == HYPOK}
    assert hypok == {"a": "fires", "b": "not-fires"}
    only_b = evaluate(catalog.evaluated(), facts, NOW, patient="b")
    assert {d.patient for d in only_b} == {"b"}


def test_evaluate_with_no_facts_gives_no_decisions(catalog: Catalog):
    assert evaluate(catalog.evaluated(), [], NOW) == []


# --- evidence ----------------------------------------------------------------------------------------


def test_evidence_names_resource_value_unit_and_time():
    mg = magnesium(1.5, "mg/dL", at="2024-05-01T08:00:00Z", version="3")
    decision = decide(ARRHYTHMIA, condition(), mg)
    (evidence,) = [e for e in decision.evidence if e.input == "magnesium"]
    assert evidence.reference == f"Observation/{mg['id']}/_history/3"
    assert evidence.reported == "1.5 mg/dL"
    assert evidence.unit == "mmol/L"
    assert evidence.value == "0.62"
    assert evidence.time == "2024-05-01T08:00:00Z"


# --- card shape --------------------------------------------------------------------------------------

FIRING: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "hypok-info": lambda: [potassium(3.2)],
    "hypok-warning-inferred-unit": lambda: [potassium(2.8, None)],
    "refractory": lambda: [med_statement(FUROSEMIDE), potassium(3.2, at=ago(30)), potassium(3.3, at=ago(2))],
    "refractory-with-supplement-and-mg": lambda: [
        med_request(rxnorm("313988", "Furosemide 40 MG Oral Tablet")),
        med_statement(rxnorm("8591", "potassium chloride")),
        magnesium(0.6, at=ago(3)),
        potassium(3.2, at=ago(30)),
        potassium(3.3, at=ago(2)),
    ],
    "arrhythmia-condition": lambda: [condition(onset=ago(24)), magnesium(0.55)],
    "arrhythmia-qtc-panel": lambda: [ecg_panel(0.53, "s", at=ago(2)), magnesium(1.2, "meq/l", ucum=False)],
    "arrhythmia-qtc-comparator": lambda: [qtc(500, comparator=">", at=ago(2)), magnesium(1.0, "mg/dL", comparator="<")],
}


@pytest.fixture(params=sorted(FIRING))
def firing_card(request: pytest.FixtureRequest, catalog: Catalog) -> dict[str, Any]:
    decisions = evaluate(catalog.evaluated(), facts_of(*FIRING[request.param]()), NOW)
    fired = [d for d in decisions if d.fires]
    assert fired, f"scenario {request.param} should fire"
    assert all(d.card is not None and d.severity == d.card["indicator"] for d in fired)
    return fired[0].card  # type: ignore[return-value]


def test_card_summary_is_under_140_characters(firing_card: dict[str, Any]):
    assert 0 < len(firing_card["summary"]) < 140
    assert "{{" not in firing_card["summary"] and "{%" not in firing_card["summary"]


def test_card_indicator_and_source(firing_card: dict[str, Any]):
    assert firing_card["indicator"] in {"info", "warning", "critical"}
    assert firing_card["source"]["label"]
    assert firing_card["source"]["url"].startswith("https://")


def test_card_suggestion_resources_are_valid_fhir(firing_card: dict[str, Any]):
    assert firing_card["suggestions"]
    assert firing_card["selectionBehavior"] in {"at-most-one", "any"}
    for suggestion in firing_card["suggestions"]:
        assert suggestion["label"] and suggestion["actions"]
        for action in suggestion["actions"]:
            assert action["type"] in {"create", "update", "delete"}
            assert action["description"]
            resource = action.get("resource")
            if resource is not None:
                get_fhir_model_class(resource["resourceType"]).model_validate(resource)
                assert resource["subject"]["reference"] == "Patient/p1"


def test_card_override_reasons_have_display(firing_card: dict[str, Any]):
    assert firing_card["overrideReasons"]
    for reason in firing_card["overrideReasons"]:
        assert reason["system"] and reason["code"] and reason["display"]


def test_card_has_no_empty_values(firing_card: dict[str, Any]):
    empty = [path for path, value in walk(firing_card) if value is None or value in ("", [], {})]
    assert empty == []


def test_card_detail_has_no_unrendered_template(firing_card: dict[str, Any]):
    for _, value in walk(firing_card):
        if isinstance(value, str):
            assert "{{" not in value and "{%" not in value, value
            assert "None" not in value.split(), value
