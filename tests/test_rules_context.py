"""Patient context in the rules (issue 11): applicability (age, encounter class, unknown context, deceased) decided by
the engine from Patient / Encounter facts, the renal caution on every card that suggests Mg or K, the lab's own
reference range, card times in the display zone, and the four shadow rules on the shared Synthea bundles.

Everything goes through the real normaliser and the real engine; lifecycle effects through ``workers.steps``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir_builders import (
    ARRHYTHMIA,
    FUROSEMIDE,
    HYPOK,
    NOW,
    PATIENT,
    REFRACTORY,
    ago,
    condition,
    creatinine,
    decide,
    dialysis,
    ecg,
    egfr,
    encounter,
    facts_of,
    magnesium,
    med_statement,
    normalize,
    packaged_catalog,
    patient_resource,
    potassium,
    qtc,
    rxnorm,
    shared_data_dir,
)

from config.settings import Settings
from rules.catalog import Catalog
from rules.engine import evaluate, evaluate_rule
from rules.normalize import normalize_resources
from rules.site import SiteProfile
from workers.events import Event, events_from, tick
from workers.state.timeline import PatientWindow
from workers.steps import plan_patient

LOW_K_WITH_LOW_MG = "hypokalemia-with-low-magnesium-untreated"
SEVERE_MG = "severe-hypomagnesemia-untreated"
DIGOXIN = "digoxin-with-low-potassium-or-magnesium"
QTC_K = "prolonged-qtc-with-hypokalemia"
SHADOW = (LOW_K_WITH_LOW_MG, SEVERE_MG, DIGOXIN, QTC_K)
SETTINGS = Settings()


def _adult(**kw: Any) -> dict[str, Any]:
    return patient_resource(birth="1950-03-01", **kw)


def _configured(site: dict[str, Any] | None = None, zone: str = "UTC") -> Catalog:
    profile = SiteProfile.model_validate(site) if site else None
    return packaged_catalog().configure(site=profile, display_zone=zone)


def _decide(catalog: Catalog, rule_id: str, *resources: dict[str, Any], as_of: datetime = NOW):
    found = catalog.get(rule_id)
    assert found is not None
    return evaluate_rule(found, facts_of(*resources), as_of, PATIENT)


# --- applicability -----------------------------------------------------------------------------------------


def test_hypokalemia_applies_to_an_adult_inpatient_and_not_to_an_outpatient():
    k = potassium(3.3, at=ago(2))
    inpatient = decide(HYPOK, _adult(), encounter("IMP", start=ago(30)), k)
    assert inpatient.fires
    outpatient = decide(HYPOK, _adult(), encounter("AMB", start=ago(3)), k)
    assert outpatient.outcome == "not-fires" and not outpatient.resolves
    assert outpatient.explanation.startswith("Does not apply: the encounter in progress is Ambulatory (AMB)")
    assert "IMP, ACUTE, NONAC, EMER, OBSENC, SS" in outpatient.explanation


@pytest.mark.parametrize("klass", ["IMP", "ACUTE", "NONAC", "EMER", "OBSENC", "SS"])
def test_hypokalemia_hospital_classes(klass: str):
    assert decide(HYPOK, _adult(), encounter(klass, start=ago(30)), potassium(3.3, at=ago(2))).fires


@pytest.mark.parametrize("klass", ["AMB", "HH", "VR", "PRENC"])
def test_hypokalemia_not_in_other_settings(klass: str):
    assert not decide(HYPOK, _adult(), encounter(klass, start=ago(30)), potassium(3.3, at=ago(2))).fires


def test_a_discharged_patient_is_not_in_an_encounter_and_the_rule_does_not_apply():
    stay = encounter("IMP", start=ago(24 * 10), end=ago(24 * 5))
    decision = decide(HYPOK, _adult(), stay, potassium(3.2, at=ago(2)))
    assert decision.outcome == "not-fires"
    assert "no encounter in progress" in decision.explanation


def test_an_encounter_older_than_the_lookback_leaves_the_encounter_unknown():
    """A year-old stay does not tell where the patient is now: unknown, and the shipped policy applies."""
    old = encounter("IMP", start=ago(24 * 400), end=ago(24 * 390))
    decision = decide(HYPOK, _adult(), old, potassium(3.2, at=ago(2)))
    assert decision.fires and "Applied although encounter unknown" in decision.explanation


def test_a_feed_without_patient_or_encounter_keeps_working_and_says_so():
    decision = decide(HYPOK, potassium(3.2, at=ago(2)))
    assert decision.fires
    assert "Applied although age unknown (no Patient resource); encounter unknown" in decision.explanation


def test_unknown_context_policy_skip_per_site():
    site = {
        "name": "strict",
        "rules": {HYPOK: {"applicability": {"unknown_encounter": "skip", "unknown_age": "skip"}}},
    }
    catalog = _configured(site)
    no_encounter = _decide(catalog, HYPOK, _adult(), potassium(3.2, at=ago(2)))
    assert no_encounter.outcome == "not-fires"
    assert "encounter unknown" in no_encounter.explanation and "skips" in no_encounter.explanation
    no_birth_date = _decide(catalog, HYPOK, patient_resource(birth=None), encounter("IMP"), potassium(3.2, at=ago(2)))
    assert no_birth_date.outcome == "not-fires" and "age unknown (no birth date)" in no_birth_date.explanation
    known = _decide(catalog, HYPOK, _adult(), encounter("IMP"), potassium(3.2, at=ago(2)))
    assert known.fires


@pytest.mark.parametrize("rule_id", [HYPOK, REFRACTORY, ARRHYTHMIA, *SHADOW])
def test_every_rule_is_for_adults_only(rule_id: str):
    assert packaged_catalog().get(rule_id).applicability.min_age_years == 18  # type: ignore[union-attr]


def test_age_is_taken_at_the_evaluation_instant_and_the_birthday_is_a_due_time():
    """17 the day before the 18th birthday, 18 on it; the decision before says when it may change."""
    birthday = NOW + timedelta(days=1)
    born = birthday.replace(year=birthday.year - 18).date().isoformat()
    resources = [patient_resource(birth=born), encounter("IMP", start=ago(30)), potassium(3.1, at=ago(2))]
    before = decide(HYPOK, *resources)
    assert before.outcome == "not-fires" and "under 18 years" in before.explanation
    assert before.next_change == datetime(birthday.year, birthday.month, birthday.day, tzinfo=UTC)
    assert decide(HYPOK, *resources, as_of=before.next_change).fires  # the K is still in the 72 h window


def test_a_birth_year_alone_near_18_is_unknown_and_follows_the_policy():
    born_year = str(NOW.year - 18)  # 17 or 18 today: cannot tell
    resources = [patient_resource(birth=born_year), encounter("IMP"), potassium(3.1, at=ago(2))]
    decision = decide(HYPOK, *resources)
    assert decision.fires and "whether the patient is 18 yet" in decision.explanation
    strict = _configured({"name": "s", "rules": {HYPOK: {"applicability": {"unknown_age": "skip"}}}})
    assert _decide(strict, HYPOK, *resources).outcome == "not-fires"


def test_a_deceased_patient_gets_no_alert_from_the_time_of_death():
    died = ago(1)
    resources = [_adult(deceasedDateTime=died), encounter("IMP"), potassium(3.1, at=ago(3))]
    assert decide(HYPOK, *resources, as_of=NOW - timedelta(hours=2)).fires
    after = decide(HYPOK, *resources)
    assert after.outcome == "not-fires" and "deceased" in after.explanation


def test_explanations_never_name_the_age_or_the_patient():
    decision = decide(HYPOK, patient_resource(birth="2015-06-01", family="Secret", mrn="MRN-SECRET"), potassium(3.0))
    assert decision.outcome == "not-fires"
    for secret in ("Secret", "MRN-SECRET", "2015", " 8 y", " 8 years"):
        assert secret not in decision.explanation


def _plan(events: list[Event]) -> Any:
    window = PatientWindow(PATIENT, 1, None, None, {}, ["stored"] * len(events), {})
    rules = packaged_catalog().evaluated()
    return plan_patient(window, events, rules, tolerance_hours=24, expires=lambda e: e.expires(SETTINGS))


def _event(resource: dict[str, Any], received: datetime) -> Event:
    event = events_from(normalize(resource), received)
    assert event is not None
    return event


def _closes(plan: Any, rule_id: str) -> list[str]:
    return [step.closes[rule_id] for step in plan.steps if rule_id in step.closes]


def test_an_open_alert_closes_withdrawn_when_the_patient_moves_to_an_outpatient_encounter():
    stay_start = NOW - timedelta(hours=30)
    events = [
        _event(_adult(), stay_start),
        _event(encounter("IMP", start=ago(30), id="stay"), stay_start),
        _event(potassium(3.2, at=ago(4)), NOW - timedelta(hours=4)),
        _event(
            encounter("IMP", start=ago(30), end=ago(2), id="stay", meta={"versionId": "2"}), NOW - timedelta(hours=2)
        ),
        _event(encounter("AMB", start=ago(1), id="clinic"), NOW - timedelta(hours=1)),
    ]
    plan = _plan(events)
    fired = [s for s in plan.steps for d in s.decisions if d.rule_id == HYPOK and d.fires]
    assert fired, "fires while an inpatient"
    assert _closes(plan, HYPOK) == ["withdrawn"]  # the discharge (a data change) closed it


def test_an_encounter_end_known_in_advance_closes_the_alert_by_time_alone():
    events = [
        _event(_adult(), NOW - timedelta(hours=30)),
        _event(encounter("EMER", start=ago(6), end=ago(-2), status="in-progress", id="ed"), NOW - timedelta(hours=6)),
        _event(potassium(3.2, at=ago(4)), NOW - timedelta(hours=4)),
    ]
    plan = _plan([*events, tick(PATIENT, NOW + timedelta(hours=3))])
    assert _closes(plan, HYPOK) == ["expired"]
    closing = next(s for s in plan.steps if HYPOK in s.closes)
    assert closing.as_of == NOW + timedelta(hours=2)  # the end is a due time: evaluated exactly then


# --- renal caution -------------------------------------------------------------------------------------------


def _suggestion(decision: Any, suggestion_id: str) -> dict[str, Any]:
    return next(s for s in decision.card["suggestions"] if s["id"] == suggestion_id)


def _has_dose(suggestion: dict[str, Any]) -> bool:
    return any("doseAndRate" in d for a in suggestion["actions"] for d in a["resource"].get("dosageInstruction", []))


AF_WITH_LOW_MG = (ecg(at=ago(3)), magnesium(0.6, at=ago(4)))


@pytest.mark.parametrize(
    ("renal", "caution"),
    [
        ([egfr(25, at=ago(6))], True),
        ([egfr(15, comparator="<", at=ago(6))], True),
        ([egfr(45, at=ago(6)), dialysis(at=ago(30))], True),
        ([condition("Z99.2", "http://hl7.org/fhir/sid/icd-10-cm", onset="2020-01-01")], True),
        ([egfr(25, unit="mL/s", at=ago(6))], True),  # cannot be judged: impairment not ruled out
        ([egfr(60, at=ago(6))], False),
        ([egfr(60, comparator=">", at=ago(6))], False),
        ([egfr(20, at=ago(24 * 8))], False),  # older than the 7-day renal look-back
        ([], False),
    ],
)
def test_iv_magnesium_is_not_recommended_and_not_dosed_with_renal_impairment(renal: list, caution: bool):
    decision = decide(ARRHYTHMIA, *AF_WITH_LOW_MG, *renal)
    assert decision.fires
    offered = [s["id"] for s in decision.card["suggestions"]]
    if caution:
        assert offered == ["magnesium-sulfate-iv-renal-caution"]
        suggestion = _suggestion(decision, "magnesium-sulfate-iv-renal-caution")
        assert "isRecommended" not in suggestion and not _has_dose(suggestion)
        assert "Renal caution" in suggestion["actions"][0]["resource"]["note"][0]["text"]
        assert "**Renal caution:**" in decision.card["detail"]
    else:
        assert offered == ["magnesium-sulfate-2g-iv"]
        suggestion = _suggestion(decision, "magnesium-sulfate-2g-iv")
        assert suggestion["isRecommended"] is True and _has_dose(suggestion)
        assert "**Renal caution:**" not in decision.card["detail"]


def test_every_card_that_suggests_mg_or_k_shows_the_latest_egfr_and_creatinine_with_their_times():
    renal = [egfr(38, at=ago(30)), egfr(41, at=ago(8), id="egfr-new"), creatinine(1.6, at=ago(8), id="crea-new")]
    cases = {
        ARRHYTHMIA: [*AF_WITH_LOW_MG],
        REFRACTORY: [
            med_statement(FUROSEMIDE, start="2024-04-01"),
            potassium(3.2, at=ago(40)),
            potassium(3.3, at=ago(3)),
        ],
        LOW_K_WITH_LOW_MG: [potassium(3.2, at=ago(3)), magnesium(0.6, at=ago(3))],
        SEVERE_MG: [magnesium(0.4, at=ago(3))],
        DIGOXIN: [med_statement(rxnorm("3407", "digoxin"), start="2024-01-01"), potassium(3.2, at=ago(3))],
        QTC_K: [qtc(520, at=ago(3)), potassium(3.2, at=ago(3))],
        HYPOK: [potassium(3.2, at=ago(3))],
    }
    for rule_id, resources in cases.items():
        decision = decide(rule_id, *resources, *renal)
        assert decision.fires, rule_id
        detail = decision.card["detail"]
        assert "eGFR 41 mL/min/1.73 m² on 01 May 2024 04:00 UTC (Observation/egfr-new)" in detail, rule_id
        assert "creatinine 1.6 mg/dL (141.44 umol/L) on 01 May 2024 04:00 UTC (Observation/crea-new)" in detail


# --- the lab's reference range, per rule and per site ------------------------------------------------------


def _k_with_range(value: float, low: float, unit: str = "mmol/L") -> dict[str, Any]:
    return potassium(value, at=ago(2), referenceRange=[{"low": {"value": low, "unit": unit}, "high": {"value": 5.1}}])


def test_the_site_can_compare_with_the_labs_lower_limit_instead_of_the_threshold():
    site = {"name": "lab-ranges", "rules": {HYPOK: {"parameters": {"k_low": {"reference_low": True}}}}}
    lab = _configured(site)
    assert decide(HYPOK, _k_with_range(3.4, 3.3)).fires  # shipped: the rule's 3.5
    inside = _decide(lab, HYPOK, _k_with_range(3.4, 3.3))
    assert inside.outcome == "not-fires" and "3.3 mmol/L (the lab's lower reference limit)" in inside.explanation
    below = _decide(lab, HYPOK, _k_with_range(3.2, 3.3))
    assert below.fires and "below 3.3 mmol/L (the lab's lower reference limit)" in below.card["detail"]
    without_range = _decide(lab, HYPOK, potassium(3.4, at=ago(2)))
    assert without_range.fires and "below 3.5 mmol/L (rule threshold)" in without_range.card["detail"]
    assert inside.parameters["k_low"] == "3.5 mmol/L; the lab's lower reference limit when given"


def test_a_range_restricted_to_a_population_or_of_another_type_is_not_the_labs_general_limit():
    restricted = potassium(
        3.4, at=ago(2), referenceRange=[{"low": {"value": 3.0}, "appliesTo": [{"text": "neonates"}]}]
    )
    typed = potassium(
        3.4, at=ago(2), referenceRange=[{"low": {"value": 3.0}, "type": {"coding": [{"code": "treatment"}]}}]
    )
    for resource in (restricted, typed):
        fact = next(f for f in normalize(resource).facts if f.concept == "potassium")
        assert fact.reference_low is None


def test_a_mg_range_in_mg_dl_is_compared_in_mg_dl():
    site = {"name": "lab-ranges", "rules": {SEVERE_MG: {"parameters": {"mg_severe": {"reference_low": True}}}}}
    result = _decide(_configured(site), SEVERE_MG, magnesium(1.25, "mg/dL", at=ago(2), referenceRange=[
        {"low": {"value": 1.3, "unit": "mg/dL"}}]))  # fmt: skip
    assert result.fires and "below 1.3 mg/dL (the lab's lower reference limit)" in result.card["detail"]


# --- card times in the display zone ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "shown"),
    [
        ("2024-03-31T00:30:00Z", "31 Mar 2024 01:30 CET"),  # before the spring-forward change
        ("2024-03-31T01:30:00Z", "31 Mar 2024 03:30 CEST"),  # after it
        ("2024-10-27T00:30:00Z", "27 Oct 2024 02:30 CEST"),  # before the fall-back change
        ("2024-10-27T01:30:00Z", "27 Oct 2024 02:30 CET"),  # after it: same wall time, other zone
    ],
)
def test_card_times_are_local_on_both_sides_of_a_dst_change(at: str, shown: str):
    catalog = _configured(zone="Europe/Berlin")
    as_of = datetime.fromisoformat(at.replace("Z", "+00:00")) + timedelta(hours=1)
    decision = _decide(catalog, HYPOK, potassium(3.2, at=at, id="k-dst"), as_of=as_of)
    assert f"on {shown}" in decision.card["detail"]
    assert "UTC" not in decision.card["detail"]


def test_the_zone_is_configuration_the_shipped_rules_stay_utc():
    plain = decide(HYPOK, potassium(3.2, at="2024-03-31T01:30:00Z"), as_of=datetime(2024, 3, 31, 3, tzinfo=UTC))
    assert "on 31 Mar 2024 01:30 UTC" in plain.card["detail"]


# --- the four shadow rules ------------------------------------------------------------------------------------


def test_the_new_rules_ship_as_shadow_and_are_evaluated():
    catalog = packaged_catalog()
    assert all(catalog.get(r).status == "shadow" for r in SHADOW)  # type: ignore[union-attr]
    evaluated = {r.id for r in catalog.evaluated()}
    assert set(SHADOW) <= evaluated


def test_k_29_with_mg_11_and_kcl_started_fires_the_new_rules_where_the_active_ones_miss_it():
    """The issue's missed case: a measured (low) Mg, KCl started, no diuretic, no arrhythmia. None of the three active
    rules fires; the new one does (critical), and so does the severe-hypomagnesemia one (1.1 mg/dL < 1.2)."""
    resources = [
        magnesium(1.1, "mg/dL", at=ago(6)),
        potassium(2.9, at=ago(6)),
        med_statement(rxnorm("8591", "potassium chloride"), start=ago(5)),
    ]
    fired = {
        d.rule_id: d for d in evaluate(packaged_catalog().evaluated(), facts_of(*resources), NOW, PATIENT) if d.fires
    }
    assert set(fired) == {LOW_K_WITH_LOW_MG, SEVERE_MG}
    assert fired[LOW_K_WITH_LOW_MG].severity == "critical"


def _synthea_bundles() -> list[Any]:
    return [json.loads(p.read_text()) for p in sorted((shared_data_dir() / "synthea-r4").glob("*.json"))]


def test_no_rule_fires_on_the_shared_synthea_bundles_at_any_of_their_times():
    """Synthea never has K < 3.5 nor any Mg: every rule, the new ones included, stays silent at every event time;
    its Patients, Encounters and eGFR results are read as context."""
    rules = packaged_catalog().evaluated()
    seen_context = set()
    for bundle in _synthea_bundles():
        facts = [f for r in normalize_resources(bundle) for f in r.facts]
        seen_context |= {f.concept for f in facts if f.concept in ("patient", "encounter", "egfr")}
        times = sorted({f.start for f in facts if f.start is not None and f.kind in ("lab", "encounter")})
        patient = next(f.patient for f in facts if f.concept == "patient")
        for as_of in times[-40:]:
            decisions = evaluate(rules, facts, as_of, patient)
            assert not [d.rule_id for d in decisions if d.outcome != "not-fires"], (patient, as_of)
    assert seen_context == {"patient", "encounter", "egfr"}


def test_synthea_deceased_patients_are_not_alerted_after_death():
    patients = [
        e["resource"] for b in _synthea_bundles() for e in b["entry"] if e["resource"]["resourceType"] == "Patient"
    ]
    patient = next(p for p in patients if "deceasedDateTime" in p)
    bundle = next(
        b for b in _synthea_bundles() if any(e["resource"] is patient or e["resource"] == patient for e in b["entry"])
    )
    died = datetime.fromisoformat(patient["deceasedDateTime"]).astimezone(UTC)
    facts = [f for r in normalize_resources(bundle) for f in r.facts]
    low_k = facts_of(potassium(2.9, at=(died + timedelta(hours=1)).isoformat(), patient=patient["id"]))
    decision = evaluate_rule(packaged_catalog().get(HYPOK), [*facts, *low_k], died + timedelta(hours=2), patient["id"])
    assert decision.outcome == "not-fires" and "deceased" in decision.explanation


# --- every rule's applicability ---------------------------------------------------------------------------------

FIRING = {
    HYPOK: lambda: [potassium(3.2, at=ago(3))],
    REFRACTORY: lambda: [
        med_statement(FUROSEMIDE, start="2024-04-01"),
        potassium(3.2, at=ago(40)),
        potassium(3.3, at=ago(3)),
    ],
    ARRHYTHMIA: lambda: [ecg(at=ago(3)), magnesium(0.6, at=ago(4))],
    LOW_K_WITH_LOW_MG: lambda: [potassium(3.2, at=ago(3)), magnesium(0.6, at=ago(3))],
    SEVERE_MG: lambda: [magnesium(0.4, at=ago(3))],
    DIGOXIN: lambda: [med_statement(rxnorm("3407", "digoxin"), start="2024-01-01"), potassium(3.2, at=ago(3))],
    QTC_K: lambda: [qtc(520, at=ago(3)), potassium(3.2, at=ago(3))],
}
HOSPITAL_ONLY = {HYPOK, ARRHYTHMIA}


@pytest.mark.parametrize("rule_id", sorted(FIRING))
def test_each_rule_applies_by_age_encounter_class_and_unknown_context(rule_id: str):
    data = FIRING[rule_id]()
    assert decide(rule_id, *data).fires  # unknown age and encounter: the shipped policy applies
    assert decide(rule_id, _adult(), encounter("IMP", start=ago(50)), *data).fires
    child = patient_resource(birth=f"{NOW.year - 12}-01-01")
    assert decide(rule_id, child, encounter("IMP", start=ago(50)), *data).outcome == "not-fires"
    outpatient = decide(rule_id, _adult(), encounter("AMB", start=ago(5)), *data)
    assert outpatient.fires is (rule_id not in HOSPITAL_ONLY)
    dead = decide(rule_id, _adult(deceasedDateTime=ago(1)), *data)
    assert dead.outcome == "not-fires" and "deceased" in dead.explanation
