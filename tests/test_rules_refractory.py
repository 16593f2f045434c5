"""refractory-hypokalemia-on-diuretic: >= 2 low K >= 24 h apart in 72 h, latest still low, a diuretic in the window,
and Mg can still explain it (not measured, or low with no Mg therapy since)."""

from __future__ import annotations

from typing import Any

import pytest
from fhir_builders import (
    FUROSEMIDE,
    NOW,
    REFRACTORY,
    SNOMED,
    ago,
    bundle,
    coding,
    concept,
    decide,
    magnesium,
    med_request,
    med_statement,
    potassium,
    rule,
    rxnorm,
)

from rules.engine import evaluate_rule
from rules.normalize import normalize_resources


def two_low_k(gap_hours: float = 30, latest_ago: float = 2, values: tuple[float, float] = (3.2, 3.3)) -> list:
    """Two low potassium results ``gap_hours`` apart, the newer ``latest_ago`` hours before NOW."""
    return [
        potassium(values[0], at=ago(latest_ago + gap_hours)),
        potassium(values[1], at=ago(latest_ago)),
    ]


def on(medication: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return med_statement(medication, start=kw.pop("start", "2024-04-20"), **kw)


def test_fires_on_furosemide_with_two_low_results_30h_apart():
    decision = decide(REFRACTORY, on(FUROSEMIDE), *two_low_k())
    assert decision.outcome == "fires"
    assert decision.severity == "warning"
    detail = decision.card["detail"]
    assert "No potassium replacement documented" in detail
    assert "Magnesium not measured" in detail
    assert "3.3 mmol/L" in decision.card["summary"]
    inputs = {e.input for e in decision.evidence}
    assert {"low_potassium", "latest_potassium", "diuretic"} <= inputs


def test_does_not_fire_without_a_diuretic():
    decision = decide(REFRACTORY, *two_low_k())
    assert decision.outcome == "not-fires"
    assert decision.resolves is False  # resolves only when potassium is back at or above 3.5


def test_two_low_results_under_24h_apart_are_not_refractory():
    decision = decide(REFRACTORY, on(FUROSEMIDE), *two_low_k(gap_hours=18))
    assert decision.outcome == "not-fires"
    assert decision.resolves is False


def test_two_low_results_exactly_24h_apart_are_refractory():
    assert decide(REFRACTORY, on(FUROSEMIDE), *two_low_k(gap_hours=24)).outcome == "fires"


def test_three_close_results_spanning_24h_count():
    ks = [potassium(3.2, at=ago(40)), potassium(3.1, at=ago(28)), potassium(3.0, at=ago(10))]
    assert decide(REFRACTORY, on(FUROSEMIDE), *ks).outcome == "fires"


def test_latest_potassium_normal_does_not_fire_and_resolves():
    ks = [*two_low_k(latest_ago=10), potassium(3.8, at=ago(1))]
    decision = decide(REFRACTORY, on(FUROSEMIDE), *ks)
    assert decision.outcome == "not-fires"
    assert decision.resolves is True


def test_low_results_outside_the_72h_window_do_not_count():
    decision = decide(REFRACTORY, on(FUROSEMIDE), potassium(3.0, at=ago(80)), potassium(3.1, at=ago(2)))
    assert decision.outcome == "not-fires"


def test_potassium_at_3_5_is_not_low():
    assert decide(REFRACTORY, on(FUROSEMIDE), *two_low_k(values=(3.5, 3.2))).outcome == "not-fires"


@pytest.mark.parametrize(
    ("code", "display"),
    [
        ("313988", "Furosemide 40 MG Oral Tablet"),
        ("1719286", "10 ML Furosemide 10 MG/ML Injection"),
        ("310798", "Hydrochlorothiazide 25 MG Oral Tablet"),
        ("316049", "Hydrochlorothiazide 25 MG"),
    ],
)
def test_synthea_product_level_requests_count(code: str, display: str):
    request = med_request(rxnorm(code, display), authored="2024-01-05")
    decision = decide(REFRACTORY, request, *two_low_k())
    assert decision.outcome == "fires"
    assert display in decision.card["detail"]


def test_contained_medication_reference_counts():
    medication = {
        "resourceType": "Medication",
        "id": "med0316",
        "code": concept(coding(SNOMED, "317935006", "Chlorthalidone 50mg tablet (product)")),
    }
    request = med_request(None, contained=[medication], medicationReference={"reference": "#med0316"})
    assert decide(REFRACTORY, request, *two_low_k()).outcome == "fires"


def test_bundle_urn_uuid_medication_reference_counts():
    url = "urn:uuid:7e9d1f1a-6f47-4c0e-9a53-3b1f0f7f2a10"
    medication = {"resourceType": "Medication", "id": "m1", "code": rxnorm("310798")}
    request = med_request(None, medicationReference={"reference": url})
    resources = [medication, request, *two_low_k()]
    data = bundle(*resources, full_urls=[url, *(f"urn:uuid:x-{i}" for i in range(len(resources) - 1))])
    facts = [f for r in normalize_resources(data) for f in r.facts]
    decision = evaluate_rule(rule(REFRACTORY), facts, NOW, "p1")
    assert decision.outcome == "fires"


def test_combination_product_counts_as_diuretic_and_supplement():
    combo = on(rxnorm("608054", "Furosemide / Potassium Chloride"))
    decision = decide(REFRACTORY, combo, *two_low_k())
    assert decision.outcome == "fires"
    assert "Despite potassium replacement documented" in decision.card["detail"]


def test_potassium_supplement_is_reported():
    decision = decide(REFRACTORY, on(FUROSEMIDE), on(rxnorm("8591", "potassium chloride")), *two_low_k())
    assert "Despite potassium replacement documented" in decision.card["detail"]


def test_penicillin_v_potassium_is_not_reported_as_supplementation():
    pen = med_request(concept(text="Penicillin V Potassium 500 MG Oral Tablet"), authored="2024-04-29")
    decision = decide(REFRACTORY, on(FUROSEMIDE), pen, *two_low_k())
    assert decision.outcome == "fires"
    assert "No potassium replacement documented" in decision.card["detail"]


def test_free_text_lasix_counts():
    decision = decide(REFRACTORY, on(concept(text="Lasix 40 mg")), *two_low_k())
    assert decision.outcome == "fires"
    assert any("matched by free text" in n for e in decision.evidence if e.input == "diuretic" for n in e.notes)


def test_a_low_magnesium_is_shown_on_the_card():
    decision = decide(REFRACTORY, on(FUROSEMIDE), magnesium(0.6, at=ago(5)), *two_low_k())
    assert decision.outcome == "fires"
    assert "**Magnesium low:** 0.6 mmol/L" in decision.card["detail"]


@pytest.mark.parametrize(("value", "unit"), [(0.75, "mmol/L"), (2.1, "mg/dL"), (1.7, "mg/dL"), (1.5, "meq/L")])
def test_a_normal_magnesium_in_the_window_keeps_it_silent(value: float, unit: str):
    decision = decide(REFRACTORY, on(FUROSEMIDE), magnesium(value, unit, at=ago(40)), *two_low_k())
    assert decision.outcome == "not-fires"
    assert "is not below" in decision.explanation


def test_a_normal_magnesium_from_before_the_window_does_not_count():
    decision = decide(REFRACTORY, on(FUROSEMIDE), magnesium(0.8, at=ago(2 + 72 + 1)), *two_low_k())
    assert decision.outcome == "fires" and "Magnesium not measured" in decision.card["detail"]


def test_a_stopped_diuretic_before_the_window_does_not_count():
    stopped = on(FUROSEMIDE, status="stopped", start="2024-03-01", end="2024-04-01")
    decision = decide(REFRACTORY, stopped, *two_low_k())
    assert decision.outcome == "not-fires"
    assert decision.resolves is False


def test_a_diuretic_stopped_yesterday_was_active_in_the_window_and_counts():
    stopped = on(FUROSEMIDE, status="stopped", start="2024-03-01", end=ago(24))
    assert decide(REFRACTORY, stopped, *two_low_k()).outcome == "fires"


def test_daily_completed_orders_keep_the_rule_firing_between_orders():
    """Issue 10 item 12: a completed order counts for the time it was active, so the gap between daily orders
    does not make the alert resolve and reopen."""
    orders = [
        med_request(FUROSEMIDE, status="completed", authored=ago(50), meta={"lastUpdated": ago(49)}),
        med_request(FUROSEMIDE, status="completed", authored=ago(26), meta={"lastUpdated": ago(25)}),
    ]
    assert decide(REFRACTORY, *orders, *two_low_k()).outcome == "fires"


def test_potassium_given_in_the_window_whatever_its_status_now():
    given = [
        med_request(rxnorm("8591", "KCl 20 mEq"), status="completed", authored=ago(40), id="kcl-order"),
        {
            "resourceType": "MedicationAdministration",
            "id": "kcl-dose",
            "status": "completed",
            "medicationCodeableConcept": rxnorm("8591", "KCl 20 mEq"),
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": ago(20),
        },
    ]
    detail = decide(REFRACTORY, on(FUROSEMIDE), *given, *two_low_k()).card["detail"]
    assert "Despite potassium replacement documented" in detail
    assert "MedicationRequest/kcl-order" in detail and "MedicationAdministration/kcl-dose" in detail


def test_the_card_never_advises_holding_or_delaying_potassium():
    for extra in ([], [magnesium(0.6, at=ago(5))], [magnesium(0.4, at=ago(5)), on(rxnorm("8591", "KCl"))]):
        card = decide(REFRACTORY, on(FUROSEMIDE), *extra, *two_low_k()).card
        text = (card["summary"] + " " + card["detail"]).lower()
        assert "hold" not in text and "delay" not in text and "before more k" not in text
        assert "continue" in text or "alongside" in text


def test_active_diuretic_whose_period_ended_before_the_window_does_not_count():
    ended = on(FUROSEMIDE, start="2024-03-01", end="2024-04-01")
    assert decide(REFRACTORY, ended, *two_low_k()).outcome == "not-fires"


def test_diuretic_ending_inside_the_window_still_counts_but_not_as_current():
    ended = on(FUROSEMIDE, start="2024-03-01", end=ago(10))
    decision = decide(REFRACTORY, ended, *two_low_k())
    assert decision.outcome == "fires"


def test_diuretic_starting_after_as_of_does_not_count():
    future = on(FUROSEMIDE, start=ago(-24))
    assert decide(REFRACTORY, future, *two_low_k()).outcome == "not-fires"


def test_request_validity_period_ended_before_the_window_does_not_count():
    request = med_request(FUROSEMIDE, dispenseRequest={"validityPeriod": {"start": "2024-01-01", "end": "2024-02-01"}})
    assert decide(REFRACTORY, request, *two_low_k()).outcome == "not-fires"


@pytest.mark.parametrize("intent", ["proposal", "plan"])
def test_request_that_is_only_a_proposal_does_not_count(intent: str):
    assert decide(REFRACTORY, med_request(FUROSEMIDE, intent=intent), *two_low_k()).outcome == "not-fires"


def test_entered_in_error_statement_does_not_count():
    assert decide(REFRACTORY, on(FUROSEMIDE, status="entered-in-error"), *two_low_k()).outcome == "not-fires"


def test_newer_entered_in_error_version_of_the_diuretic_stops_the_rule():
    v1 = on(FUROSEMIDE, id="ms-furo", version="1")
    v2 = on(FUROSEMIDE, id="ms-furo", version="2", status="entered-in-error")
    assert decide(REFRACTORY, v1, *two_low_k()).outcome == "fires"
    assert decide(REFRACTORY, v1, v2, *two_low_k()).outcome == "not-fires"


def test_unknown_unit_on_an_earlier_low_potassium_is_indeterminate():
    ks = [potassium(3.0, "mmol/x", at=ago(32)), potassium(3.1, at=ago(2))]
    decision = decide(REFRACTORY, on(FUROSEMIDE), *ks)
    assert decision.outcome == "indeterminate"
    assert decision.card is None


def test_unknown_unit_on_the_latest_potassium_is_indeterminate():
    ks = [potassium(3.0, at=ago(32)), potassium(3.1, "mg", at=ago(2))]
    assert decide(REFRACTORY, on(FUROSEMIDE), *ks).outcome == "indeterminate"


def test_lower_case_units_without_ucum():
    ks = [potassium(3.0, "mmol/l", ucum=False, at=ago(32)), potassium(3.1, "meq/l", ucum=False, at=ago(2))]
    assert decide(REFRACTORY, on(FUROSEMIDE), *ks).outcome == "fires"
