"""The engine interface the alert store builds on: ``Decision.next_change`` (when time alone could change a
decision), ``Decision.escalators`` (named escalating evidence) and decisions that never depend on the order
the facts are given in. Properties run on the packaged catalog with random timelines."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fhir_builders import (
    HYPOK,
    NOW,
    PATIENT,
    ago,
    decide,
    magnesium,
    med_statement,
    packaged_catalog,
    potassium,
    rxnorm,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rules.engine import Decision, evaluate, evaluate_rule
from rules.facts import EncounterInfo, Fact, PatientInfo
from rules.model import Rule
from rules.units import analyte_units, quantitative_concepts

TICK = timedelta(microseconds=1)
BASE = datetime(2024, 5, 1, tzinfo=UTC)


# --- a small rule to test engine features in isolation -------------------------------------------------


def make_rule(**changes: Any) -> Rule:
    """A minimal valid rule: fires when the latest K in 72 h is below 3.5; ``changes`` replace top-level keys."""
    data: dict[str, Any] = {
        "id": "engine-test-rule",
        "version": "1.0.0",
        "status": "shadow",
        "title": "Engine test rule",
        "description": "A rule used only by the engine tests.",
        "citations": [{"text": "ehr-alerts tests", "url": "https://example.org/tests"}],
        "parameters": {
            "k_low": {"value": 3.5, "unit": "mmol/L", "source": "test"},
            "k_very_low": {"value": 3.0, "unit": "mmol/L", "source": "test"},
            "window": {"hours": 72, "source": "test"},
        },
        "inputs": {"potassium": {"concept": "potassium", "select": "latest", "lookback": "window"}},
        "when": {"below": {"input": "potassium", "threshold": "k_low"}},
        "severity": [{"level": "warning"}],
        "resolve_when": {"at_least": {"input": "potassium", "threshold": "k_low"}},
        "card": {
            "summary": "Low potassium {{ potassium.reported }}",
            "detail": "Potassium {{ potassium.reported }}.",
            "source": {"label": "test", "url": "https://example.org/tests"},
        },
        "tests": [
            {
                "name": "fires",
                "now": "2024-05-01T12:00:00Z",
                "facts": [{"lab": "potassium", "value": 3.1, "unit": "mmol/L", "at": "2024-05-01T08:00:00Z"}],
                "expect": {"outcome": "fires"},
            }
        ],
    }
    data.update(changes)
    return Rule.model_validate(data)


def fact(concept: str, kind: str, start: datetime | None, end: datetime | None = None, **kw: Any) -> Fact:
    """A fact built directly (the normaliser has its own tests)."""
    rid = kw.pop("id", f"{concept}-{kind}-{start.isoformat() if start else 'none'}")
    return Fact(
        patient=kw.pop("patient", PATIENT),
        concept=concept,
        kind=kind,  # type: ignore[arg-type]
        resource_type=kw.pop("resource_type", "Observation" if kind in ("lab", "finding") else "MedicationStatement"),
        resource_id=rid,
        start=start,
        end=end if end is not None or kind not in ("lab", "finding") else start,
        **kw,
    )


def k(value: str, at: datetime, **kw: Any) -> Fact:
    """A potassium result in mmol/L."""
    return fact(
        "potassium", "lab", at, value=Decimal(value), unit="mmol/L", reported_value=value, reported_unit="mmol/L", **kw
    )


# --- escalation ----------------------------------------------------------------------------------------

ESCALATION = [
    {
        "id": "k-below-3",
        "label": "Potassium below 3.0 mmol/L",
        "when": {"below": {"input": "potassium", "threshold": "k_very_low"}},
    }
]


def test_escalators_list_the_named_evidence_that_holds_when_the_rule_fires():
    rule = make_rule(escalation=ESCALATION)
    severe = evaluate_rule(rule, [k("2.8", NOW - timedelta(hours=1))], NOW, PATIENT)
    assert severe.fires and severe.escalators == [{"id": "k-below-3", "label": "Potassium below 3.0 mmol/L"}]
    mild = evaluate_rule(rule, [k("3.2", NOW - timedelta(hours=1))], NOW, PATIENT)
    assert mild.fires and mild.escalators == []
    normal = evaluate_rule(rule, [k("4.0", NOW - timedelta(hours=1))], NOW, PATIENT)
    assert not normal.fires and normal.escalators == []
    dumped = severe.model_dump(mode="json")
    assert dumped["escalators"] == [{"id": "k-below-3", "label": "Potassium below 3.0 mmol/L"}]


def test_an_undecidable_escalation_does_not_escalate():
    rule = make_rule(escalation=ESCALATION)
    below_3_1 = k("3.1", NOW - timedelta(hours=1), comparator="<")  # below 3.5 for sure, below 3.0 unknown
    decision = evaluate_rule(rule, [below_3_1], NOW, PATIENT)
    assert decision.fires and decision.escalators == []


def test_escalation_is_validated_like_severity_tiers():
    with pytest.raises(ValidationError, match="unknown input 'qtc'"):
        make_rule(escalation=[{"id": "x-y", "label": "QTc", "when": {"present": "qtc"}}])
    with pytest.raises(ValidationError, match="unknown parameter"):
        make_rule(
            escalation=[{"id": "x-y", "label": "K low", "when": {"below": {"input": "potassium", "threshold": "nope"}}}]
        )
    with pytest.raises(ValidationError, match="ids must be unique"):
        make_rule(escalation=ESCALATION * 2)
    with pytest.raises(ValidationError, match="String should match pattern"):
        make_rule(escalation=[{**ESCALATION[0], "id": "Not A Slug"}])


def test_packaged_rules_declare_escalation_with_labels():
    for rule in packaged_catalog().rules:
        for escalator in rule.escalation:
            assert escalator.label and escalator.id


# --- next_change -----------------------------------------------------------------------------------------


def test_a_result_leaving_a_sliding_look_back_is_the_next_change():
    rule = make_rule()
    at = NOW - timedelta(hours=10)
    decision = evaluate_rule(rule, [k("3.1", at)], NOW, PATIENT)
    assert decision.fires and decision.next_change == at + timedelta(hours=72) + TICK
    assert evaluate_rule(rule, [k("3.1", at)], decision.next_change - TICK, PATIENT).fires
    assert not evaluate_rule(rule, [k("3.1", at)], decision.next_change, PATIENT).fires
    assert decision.model_dump(mode="json")["next_change"] == "2024-05-04T02:00:00.000001Z"


def test_a_result_dated_after_as_of_is_the_next_change_and_not_firing_decisions_have_one_too():
    rule = make_rule()
    later = NOW + timedelta(hours=5)
    decision = evaluate_rule(rule, [k("3.1", later)], NOW, PATIENT)
    assert decision.outcome == "not-fires" and decision.next_change == later
    assert evaluate_rule(rule, [k("3.1", later)], later, PATIENT).fires


def test_nothing_changes_by_time_alone_without_a_look_back():
    rule = make_rule(inputs={"potassium": {"concept": "potassium", "select": "latest"}})
    decision = evaluate_rule(rule, [k("3.1", NOW - timedelta(days=30))], NOW, PATIENT)
    assert decision.fires and decision.next_change is None
    assert evaluate_rule(rule, [], NOW, PATIENT).next_change is None


def test_an_active_medication_without_look_back_changes_when_it_ends():
    rule = make_rule(
        inputs={
            "potassium": {"concept": "potassium", "select": "latest", "lookback": "window"},
            "diuretic": {"concept": "loop-diuretic", "select": "active"},
        },
        when={"all": [{"below": {"input": "potassium", "threshold": "k_low"}}, {"present": "diuretic"}]},
    )
    ends = NOW + timedelta(hours=3)
    facts = [k("3.1", NOW - timedelta(hours=1)), fact("loop-diuretic", "medication", NOW - timedelta(days=3), ends)]
    decision = evaluate_rule(rule, facts, NOW, PATIENT)
    assert decision.fires and decision.next_change == ends + TICK
    assert evaluate_rule(rule, facts, ends, PATIENT).fires
    assert not evaluate_rule(rule, facts, ends + TICK, PATIENT).fires


def test_an_anchored_window_does_not_slide_and_the_anchor_decides():
    decision = decide(HYPOK, potassium(3.1, at=ago(2)), magnesium(0.8, at=ago(60)))
    assert decision.outcome == "not-fires"  # Mg 58 h before the K: measured
    assert decision.next_change == NOW - timedelta(hours=2) + timedelta(hours=72) + TICK  # when the K leaves


def test_the_catalog_rules_give_a_next_change_for_every_outcome():
    facts_now = decide(HYPOK, potassium(3.1, at=ago(2)))
    assert facts_now.fires and facts_now.next_change is not None and facts_now.next_change > NOW


# --- properties on random timelines -------------------------------------------------------------------------

_RULES = packaged_catalog().evaluated()
_CONCEPTS = sorted({c for r in _RULES for spec in r.inputs.values() for c in spec.concepts})
_LOOKBACKS = sorted({p.duration for r in _RULES for p in r.parameters.values() if p.hours is not None})
_VALUES = {
    "potassium": ("2.4", "4.6"),
    "magnesium": ("0.3", "1.1"),
    "qtc": ("380", "560"),
    "egfr": ("10", "90"),
    "creatinine": ("50", "400"),
}
_CLASSES = ["IMP", "EMER", "AMB", "OBSENC"]


def _context_facts(draw: st.DrawFn, hours: st.SearchStrategy[int]) -> list[Fact]:
    """Maybe a Patient (some turn 18, some die, inside the 12 days) and some encounters of random classes."""
    facts: list[Fact] = []
    if draw(st.booleans()):
        born = (BASE - timedelta(days=18 * 365 + 4) + timedelta(days=draw(st.integers(0, 12)))).date()
        born = draw(st.sampled_from([born, born.replace(year=1950)]))
        dies = draw(st.sampled_from([None, BASE + timedelta(hours=draw(hours))]))
        info = PatientInfo(birth_date=born.isoformat(), deceased=dies)
        facts.append(fact("patient", "patient", None, id="pt", resource_type="Patient", patient_info=info))
    for index in range(draw(st.integers(min_value=0, max_value=3))):
        start = BASE + timedelta(hours=draw(hours))
        end = draw(st.sampled_from([None, start + timedelta(hours=draw(st.integers(1, 120)))]))
        info = EncounterInfo(class_code=draw(st.sampled_from(_CLASSES)))
        facts.append(fact("encounter", "encounter", start, end, id=f"enc{index}", resource_type="Encounter",
                          encounter_info=info))  # fmt: skip
    return facts


@st.composite
def timelines(draw: st.DrawFn) -> tuple[list[Fact], datetime]:
    """A random timeline of the catalog's concepts over 12 days and an instant to evaluate at."""
    hours = st.integers(min_value=0, max_value=12 * 24)
    facts: list[Fact] = []
    for index in range(draw(st.integers(min_value=0, max_value=12))):
        concept = draw(st.sampled_from(_CONCEPTS))
        start = BASE + timedelta(hours=draw(hours), minutes=draw(st.sampled_from([0, 0, 30])))
        rid = f"r{index}"
        if concept in quantitative_concepts():
            low, high = _VALUES[concept]
            value = Decimal(draw(st.integers(int(Decimal(low) * 10), int(Decimal(high) * 10)))) / 10
            unit = analyte_units(concept).canonical
            facts.append(
                fact(
                    concept, "lab", start, id=rid, value=value, unit=unit, reported_value=str(value), reported_unit=unit
                )
            )
            continue
        kind = draw(st.sampled_from(["medication", "condition", "finding", "order"]))
        if kind in ("finding",):
            facts.append(fact(concept, kind, start, id=rid))
        elif kind == "order":
            facts.append(
                fact(concept, kind, draw(st.sampled_from([start, None])), id=rid, resource_type="ServiceRequest")
            )
        else:
            end = draw(st.sampled_from([None, start, start + timedelta(hours=draw(hours))]))
            facts.append(fact(concept, kind, draw(st.sampled_from([start, None])), end, id=rid))
    facts += _context_facts(draw, hours)
    as_of = BASE + timedelta(hours=draw(hours), minutes=draw(st.sampled_from([0, 15])))
    return facts, as_of


def signature(decision: Decision) -> tuple[Any, ...]:
    """What a decision says, apart from wording that names the evaluation instant."""
    evidence = sorted((e.input, e.reference) for e in decision.evidence)
    return decision.outcome, decision.severity, decision.resolves, decision.escalators, evidence


def _boundaries(facts: list[Fact], after: datetime, before: datetime | None) -> list[datetime]:
    """Every instant in (after, before) at which some window boundary of the catalog could fall, and its
    neighbours: fact times and ends, plus every look-back."""
    edges = {t for f in facts for t in (f.start, f.end) if t is not None}
    for f in facts:  # patient context: coming of age (midnight UTC of the birthday) and death
        if f.patient_info is not None and f.patient_info.birth_date:
            born = datetime.fromisoformat(f.patient_info.birth_date).replace(tzinfo=UTC)
            edges.add(born.replace(year=born.year + 18))
        if f.patient_info is not None and f.patient_info.deceased:
            edges.add(f.patient_info.deceased)
    spans = [timedelta(0), *_LOOKBACKS]
    points = {e + span + d for e in edges for span in spans for d in (-TICK, timedelta(0), TICK)}
    limit = before or after + timedelta(days=30)
    return sorted(t for t in points if after < t < limit)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines())
def test_no_decision_changes_before_its_next_change(case: tuple[list[Fact], datetime]):
    """next_change may be early (conservative), never late: between as_of and next_change every boundary
    instant gives the same decision."""
    facts, as_of = case
    for decision in evaluate(_RULES, facts, as_of, PATIENT):
        rule = next(r for r in _RULES if r.id == decision.rule_id)
        assert decision.next_change is None or decision.next_change > as_of
        for instant in _boundaries(facts, as_of, decision.next_change):
            later = evaluate_rule(rule, facts, instant, PATIENT)
            assert signature(later) == signature(decision), (rule.id, as_of, instant, decision.next_change)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines(), st.randoms(use_true_random=False))
def test_decisions_do_not_depend_on_the_order_of_the_facts(case: tuple[list[Fact], datetime], rng: random.Random):
    facts, as_of = case
    shuffled = list(facts)
    rng.shuffle(shuffled)
    first = [d.model_dump(mode="json") for d in evaluate(_RULES, facts, as_of, PATIENT)]
    second = [d.model_dump(mode="json") for d in evaluate(_RULES, shuffled, as_of, PATIENT)]
    assert first == second


def test_ties_at_one_instant_are_broken_by_the_source_not_the_input_order():
    """Two results at the same instant with the same value (one in meq/L): ``latest`` and the evidence must
    not depend on which one came first."""
    at = NOW - timedelta(hours=1)
    a = k("3.1", at, id="a")
    b = fact(
        "potassium", "lab", at, id="b", value=Decimal("3.1"), unit="mmol/L", reported_value="3.1", reported_unit="meq/L"
    )
    rule = make_rule()
    one = evaluate_rule(rule, [a, b], NOW, PATIENT).model_dump(mode="json")
    two = evaluate_rule(rule, [b, a], NOW, PATIENT).model_dump(mode="json")
    assert one == two


def test_a_medication_statement_ending_gives_a_next_change():
    decision = decide(
        "refractory-hypokalemia-on-diuretic",
        med_statement(rxnorm("4603", "furosemide"), start="2024-04-20", end=ago(-10)),
        potassium(3.2, at=ago(30)),
        potassium(3.3, at=ago(2)),
    )
    assert decision.next_change is not None and decision.next_change > NOW


# --- input windows: since, kind, started_in_window; conditional suggestions ---------------------------------


def _mg(value: str, at: datetime) -> Fact:
    return fact(
        "magnesium", "lab", at, id=f"mg-{value}", value=Decimal(value), unit="mmol/L", reported_value=value,
        reported_unit="mmol/L",
    )  # fmt: skip


SINCE_INPUTS = {
    "potassium": {"concept": "potassium", "select": "latest", "lookback": "window"},
    "magnesium": {"concept": "magnesium", "select": "latest", "lookback": "window"},
    "mg_therapy": {"concept": "magnesium-product", "select": "active", "since": "magnesium", "started_in_window": True},
}
NO_THERAPY_SINCE = {"all": [{"below": {"input": "potassium", "threshold": "k_low"}}, {"absent": "mg_therapy"}]}


def test_since_counts_from_the_chosen_fact_of_another_input():
    rule = make_rule(inputs=SINCE_INPUTS, when=NO_THERAPY_SINCE)
    mg_at = NOW - timedelta(hours=20)
    low_k = k("3.1", NOW - timedelta(hours=1))
    before = fact("magnesium-product", "medication", mg_at - timedelta(hours=5), None, id="before")
    after = fact("magnesium-product", "medication", mg_at + timedelta(hours=2), mg_at + timedelta(hours=2), id="after")
    assert evaluate_rule(rule, [low_k, _mg("0.6", mg_at), before], NOW, PATIENT).fires  # started before the result
    quiet = evaluate_rule(rule, [low_k, _mg("0.6", mg_at), after], NOW, PATIENT)
    assert quiet.outcome == "not-fires"
    assert [(e.input, e.resource_id) for e in quiet.evidence if e.input == "mg_therapy"] == [("mg_therapy", "after")]
    nothing_to_count_from = evaluate_rule(rule, [low_k, after], NOW, PATIENT)
    assert nothing_to_count_from.fires  # no Mg result: nothing is "since" it


def test_without_started_in_window_an_ongoing_therapy_counts_since():
    inputs = {**SINCE_INPUTS, "mg_therapy": {**SINCE_INPUTS["mg_therapy"], "started_in_window": False}}
    rule = make_rule(inputs=inputs, when=NO_THERAPY_SINCE)
    mg_at = NOW - timedelta(hours=20)
    ongoing = fact("magnesium-product", "medication", mg_at - timedelta(days=5), None, id="ongoing")
    assert not evaluate_rule(rule, [k("3.1", NOW - timedelta(hours=1)), _mg("0.6", mg_at), ongoing], NOW, PATIENT).fires


def test_kind_keeps_only_facts_of_that_kind():
    inputs = {
        "potassium": {"concept": "potassium", "select": "latest", "lookback": "window"},
        "ecg": {"concept": "arrhythmia", "kind": "finding", "select": "all", "lookback": "window"},
    }
    when = {"all": [{"below": {"input": "potassium", "threshold": "k_low"}}, {"present": "ecg"}]}
    rule = make_rule(inputs=inputs, when=when)
    low_k = k("3.1", NOW - timedelta(hours=1))
    diagnosis = fact("arrhythmia", "condition", NOW - timedelta(hours=3), None, resource_type="Condition")
    finding = fact("arrhythmia", "finding", NOW - timedelta(hours=3))
    assert not evaluate_rule(rule, [low_k, diagnosis], NOW, PATIENT).fires
    assert evaluate_rule(rule, [low_k, finding], NOW, PATIENT).fires


def test_started_in_window_keeps_interval_facts_that_began_inside_it_and_they_leave_when_their_start_does():
    inputs = {
        "potassium": {"concept": "potassium", "select": "latest", "lookback": "window"},
        "diagnosis": {"concept": "arrhythmia", "select": "active", "lookback": "window", "started_in_window": True},
    }
    when = {"all": [{"below": {"input": "potassium", "threshold": "k_low"}}, {"present": "diagnosis"}]}
    rule = make_rule(inputs=inputs, when=when)
    low_k = k("3.1", NOW - timedelta(hours=1))
    old = fact("arrhythmia", "condition", NOW - timedelta(days=400), None, resource_type="Condition", id="old")
    recent = fact("arrhythmia", "condition", NOW - timedelta(hours=10), None, resource_type="Condition", id="new")
    assert not evaluate_rule(rule, [low_k, old], NOW, PATIENT).fires
    decision = evaluate_rule(rule, [low_k, recent], NOW, PATIENT)
    assert decision.fires
    assert decision.next_change == NOW - timedelta(hours=10) + timedelta(hours=72) + TICK  # the diagnosis ages out


def test_window_options_are_validated():
    k_input = {"concept": "potassium", "select": "latest", "lookback": "window"}
    with pytest.raises(ValidationError, match="since replaces lookback"):
        make_rule(inputs={"potassium": k_input, "x": {**k_input, "since": "potassium"}})
    with pytest.raises(ValidationError, match="must be an input declared before"):
        make_rule(inputs={"x": {"concept": "magnesium", "select": "all", "since": "potassium"}, "potassium": k_input})
    with pytest.raises(ValidationError, match="started_in_window needs a window"):
        make_rule(
            inputs={"potassium": k_input, "x": {"concept": "arrhythmia", "select": "active", "started_in_window": True}}
        )
    with pytest.raises(ValidationError, match="kind"):
        make_rule(inputs={"potassium": {**k_input, "kind": "vital-sign"}})


def _suggestion(when: dict[str, Any] | None) -> dict[str, Any]:
    action = {"type": "create", "description": "Order a serum magnesium"}
    return {"id": "order-mg", "label": "Order Mg", **({"when": when} if when else {}), "actions": [action]}


def test_a_suggestion_is_offered_only_when_its_condition_holds():
    card = make_rule().card.model_dump(by_alias=True, exclude_none=True)
    card |= {"suggestions": [_suggestion({"below": {"input": "potassium", "threshold": "k_very_low"}})]}
    card["selection_behavior"] = "at-most-one"
    rule = make_rule(card=card)
    severe = evaluate_rule(rule, [k("2.8", NOW - timedelta(hours=1))], NOW, PATIENT)
    assert [s["id"] for s in severe.card["suggestions"]] == ["order-mg"] and severe.card["selectionBehavior"]
    mild = evaluate_rule(rule, [k("3.2", NOW - timedelta(hours=1))], NOW, PATIENT)
    assert "suggestions" not in mild.card and "selectionBehavior" not in mild.card
    with pytest.raises(ValidationError, match="unknown input"):
        make_rule(card={**card, "suggestions": [_suggestion({"present": "nope"})]})
