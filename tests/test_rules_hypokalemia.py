"""hypokalemia-without-magnesium: latest K < 3.5 mmol/L and no total Mg from 72 h before it up to now."""

from __future__ import annotations

import pytest
from fhir_builders import HYPOK, K_BLOOD, NOW, ago, decide, magnesium, potassium

from rules.normalize import NormalizeOptions


def test_fires_as_info_for_mild_hypokalemia():
    k = potassium(3.2, at=ago(4))
    decision = decide(HYPOK, k)
    assert decision.outcome == "fires"
    assert decision.severity == "info"
    assert decision.card is not None
    assert "3.2 mmol/L" in decision.card["summary"]
    assert f"Observation/{k['id']}" in decision.card["detail"]
    assert [e.reference for e in decision.evidence] == [f"Observation/{k['id']}"]


@pytest.mark.parametrize(("value", "severity"), [(2.9, "warning"), (3.0, "info"), (2.0, "warning")])
def test_severity_tiers(value: float, severity: str):
    decision = decide(HYPOK, potassium(value))
    assert decision.outcome == "fires"
    assert decision.severity == severity


def test_does_not_fire_for_normal_potassium_and_resolves():
    decision = decide(HYPOK, potassium(4.1))
    assert decision.outcome == "not-fires"
    assert decision.resolves is True
    assert decision.card is None


def test_does_not_fire_without_any_potassium():
    decision = decide(HYPOK, magnesium(0.8))
    assert decision.outcome == "not-fires"
    assert decision.resolves is True  # a Mg result resolves an open alert


def test_boundary_exactly_3_5_is_not_low():
    decision = decide(HYPOK, potassium(3.5))
    assert decision.outcome == "not-fires"
    assert decision.resolves is True


def test_boundary_3_4999_is_low():
    assert decide(HYPOK, potassium(3.4999)).outcome == "fires"


def test_boundary_3_5_written_with_trailing_zeros_is_not_low():
    assert decide(HYPOK, potassium("3.500")).outcome == "not-fires"


def test_synthea_blood_potassium_code_is_read():
    assert decide(HYPOK, potassium(3.1, loinc=K_BLOOD)).outcome == "fires"


@pytest.mark.parametrize(("unit", "ucum"), [("mmol/l", False), ("meq/l", False), ("mEq/L", True), ("MMOL/L", False)])
def test_unit_spellings(unit: str, ucum: bool):
    decision = decide(HYPOK, potassium(3.1, unit, ucum=ucum))
    assert decision.outcome == "fires"
    assert f"3.1 {unit}" in decision.card["summary"]


def test_potassium_in_mg_dl_is_converted():
    # 12 mg/dL / 3.91 = 3.07 mmol/L
    assert decide(HYPOK, potassium(12, "mg/dL", loinc="22760-3")).outcome == "fires"
    assert decide(HYPOK, potassium(15, "mg/dL", loinc="22760-3")).outcome == "not-fires"


def test_missing_unit_is_inferred_and_the_card_says_so():
    decision = decide(HYPOK, potassium(3.0, None))
    assert decision.outcome == "fires"
    assert "unit inferred" in decision.card["detail"]
    assert any("unit inferred" in n for e in decision.evidence for n in e.notes)


def test_unknown_unit_is_indeterminate():
    k = potassium(3.0, "mg")
    decision = decide(HYPOK, k)
    assert decision.outcome == "indeterminate"
    assert decision.card is None
    assert "unknown unit" in decision.explanation
    assert [e.resource_id for e in decision.evidence] == [k["id"]]


@pytest.mark.parametrize(
    ("comparator", "value", "outcome"),
    [
        ("<", 3.5, "fires"),  # true value is below 3.5
        ("<", 2.5, "fires"),
        ("<=", 3.5, "indeterminate"),  # could be exactly 3.5
        ("<=", 3.4, "fires"),
        (">", 3.0, "indeterminate"),  # could be 3.1 or 4.0
        (">=", 3.5, "not-fires"),
        (">", 3.5, "not-fires"),
    ],
)
def test_comparators(comparator: str, value: float, outcome: str):
    assert decide(HYPOK, potassium(value, comparator=comparator)).outcome == outcome


def test_comparator_below_warning_threshold_is_a_warning():
    decision = decide(HYPOK, potassium(2.5, comparator="<"))
    assert decision.severity == "warning"
    assert "<2.5 mmol/L" in decision.card["summary"]


def test_ge_3_5_resolves():
    assert decide(HYPOK, potassium(3.5, comparator=">=")).resolves is True


def test_magnesium_within_72h_before_the_potassium_suppresses():
    decision = decide(HYPOK, magnesium(0.8, at=ago(4 + 48)), potassium(3.1, at=ago(4)))
    assert decision.outcome == "not-fires"
    assert decision.resolves is True


def test_magnesium_exactly_72h_before_the_potassium_counts():
    assert decide(HYPOK, magnesium(0.8, at=ago(4 + 72)), potassium(3.1, at=ago(4))).outcome == "not-fires"


def test_magnesium_older_than_72h_before_the_potassium_does_not_count():
    assert decide(HYPOK, magnesium(0.8, at=ago(4 + 73)), potassium(3.1, at=ago(4))).outcome == "fires"


def test_magnesium_after_the_potassium_resolves():
    decision = decide(HYPOK, potassium(3.1, at=ago(4)), magnesium(1.9, "mg/dL", at=ago(1)))
    assert decision.outcome == "not-fires"
    assert decision.resolves is True


def test_magnesium_after_as_of_is_invisible():
    assert decide(HYPOK, potassium(3.1, at=ago(4)), magnesium(0.8, at=ago(-1))).outcome == "fires"


def test_entered_in_error_magnesium_does_not_count_as_measured():
    decision = decide(HYPOK, potassium(3.1), magnesium(0.8, status="entered-in-error"))
    assert decision.outcome == "fires"


def test_potassium_older_than_72h_does_not_fire():
    decision = decide(HYPOK, potassium(3.1, at=ago(73)))
    assert decision.outcome == "not-fires"
    assert decision.resolves is False


def test_latest_potassium_decides():
    assert decide(HYPOK, potassium(3.1, at=ago(10)), potassium(3.9, at=ago(4))).outcome == "not-fires"
    assert decide(HYPOK, potassium(3.9, at=ago(10)), potassium(3.1, at=ago(4))).outcome == "fires"


@pytest.mark.parametrize("status", ["corrected", "amended"])
def test_corrected_and_amended_results_count(status: str):
    assert decide(HYPOK, potassium(3.1, status=status)).outcome == "fires"


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_retracted_results_never_count(status: str):
    assert decide(HYPOK, potassium(3.1, status=status)).outcome == "not-fires"


def test_retracted_latest_result_falls_back_to_the_previous_one():
    decision = decide(HYPOK, potassium(3.1, at=ago(10)), potassium(4.5, at=ago(2), status="entered-in-error"))
    assert decision.outcome == "fires"


def test_newer_entered_in_error_version_stops_the_rule_firing():
    v1 = potassium(3.1, id="k1", version="1")
    assert decide(HYPOK, v1).outcome == "fires"
    v2 = potassium(3.1, id="k1", version="2", status="entered-in-error")
    assert decide(HYPOK, v1, v2).outcome == "not-fires"
    assert decide(HYPOK, v2, v1).outcome == "not-fires"


def test_corrected_version_replaces_the_original_value():
    v1 = potassium(3.1, id="k1", version="1")
    v2 = potassium(3.8, id="k1", version="2", status="corrected")
    assert decide(HYPOK, v1, v2).outcome == "not-fires"


def test_preliminary_excluded_by_default_included_on_request():
    k = potassium(3.1, status="preliminary")
    assert decide(HYPOK, k).outcome == "not-fires"
    assert decide(HYPOK, k, options=NormalizeOptions(include_preliminary=True)).outcome == "fires"


def test_duplicate_potassium_at_the_same_instant_uses_the_lowest():
    at = ago(4)
    for order in ((3.4, 3.6), (3.6, 3.4)):
        decision = decide(HYPOK, *(potassium(v, at=at) for v in order))
        assert decision.outcome == "fires", order
        assert "3.4 mmol/L" in decision.card["summary"]
        assert "2 results at that time" in decision.explanation


def test_potassium_after_as_of_is_ignored():
    decision = decide(HYPOK, potassium(4.0, at=ago(10)), potassium(3.0, at=ago(-2)))
    assert decision.outcome == "not-fires"
    decision = decide(HYPOK, potassium(4.0, at=ago(10)), potassium(3.0, at=ago(-2)), as_of=NOW.replace(hour=15))
    assert decision.outcome == "fires"


def test_another_patients_magnesium_does_not_suppress():
    decision = decide(HYPOK, potassium(3.1), magnesium(0.8, patient="someone-else"))
    assert decision.outcome == "fires"
    assert decision.patient == "p1"


def test_card_rounds_a_long_float_for_display():
    """README item 3: Synthea writes K as 3.700000781824548; parse exactly, round for display only."""
    decision = decide(HYPOK, potassium(3.4832272433592125, loinc=K_BLOOD))
    assert decision.outcome == "fires"
    summary = decision.card["summary"]
    assert "3.48" in summary
    assert "3.483227243359" not in summary, summary


def test_value_with_many_digits_gives_a_decision_not_an_exception():
    """FHIR decimals have arbitrary precision; a long value must not push the summary over 140 characters
    and make evaluate() raise (rules/cards.py render_card raises ValueError on a long summary)."""
    decision = decide(HYPOK, potassium("3." + "4" * 130))
    assert decision.outcome == "fires"
    assert len(decision.card["summary"]) < 140
