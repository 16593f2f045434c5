"""arrhythmia-with-low-magnesium: latest Mg in 72 h < 0.70 mmol/L with arrhythmia evidence or QTc > 500 ms."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fhir_builders import (
    ARRHYTHMIA,
    ICD10CM,
    MG_MASS,
    MG_MOLES,
    MIMIC_ICD10,
    NOW,
    SNOMED,
    ago,
    condition,
    decide,
    ecg,
    ecg_panel,
    magnesium,
    qtc,
)

AF = condition(onset=ago(24))  # atrial fibrillation diagnosed yesterday (recent evidence), SNOMED 49436004


def test_fires_as_a_warning_with_a_recent_af_diagnosis():
    decision = decide(ARRHYTHMIA, AF, magnesium(0.55))
    assert decision.outcome == "fires"
    assert decision.severity == "warning"
    summary = decision.card["summary"]
    assert "0.55 mmol/L" in summary
    assert "arrhythmia" in summary
    assert {e.input for e in decision.evidence} == {"magnesium", "arrhythmia_diagnosis"}


def test_low_magnesium_without_arrhythmia_evidence_does_not_fire():
    decision = decide(ARRHYTHMIA, magnesium(0.5))
    assert decision.outcome == "not-fires"
    assert decision.resolves is False


def test_arrhythmia_without_magnesium_does_not_fire():
    assert decide(ARRHYTHMIA, AF).outcome == "not-fires"


# --- boundaries and units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "outcome"),
    [
        (0.70, "mmol/L", "not-fires"),
        (0.69, "mmol/L", "fires"),
        (0.6999, "mmol/L", "fires"),
        (1.7, "mg/dL", "not-fires"),  # compared in mg/dL: 1.7 / 2.431 = 0.6993 mmol/L must not flip
        (1.69, "mg/dL", "fires"),
        (1.4, "mEq/L", "not-fires"),  # divalent: 1.4 mEq/L = 0.70 mmol/L
        (1.39, "mEq/L", "fires"),
        (1.3, "meq/L", "fires"),
    ],
)
def test_magnesium_boundaries_in_each_unit(value: float, unit: str, outcome: str):
    decision = decide(ARRHYTHMIA, AF, magnesium(value, unit))
    assert decision.outcome == outcome
    if outcome == "not-fires":
        assert decision.resolves is True


def test_a_generic_ucum_converter_would_be_wrong_for_meq():
    # 1.0 mEq/L Mg = 0.5 mmol/L: low. Treating eq as mol would read 1.0 mmol/L: normal.
    assert decide(ARRHYTHMIA, AF, magnesium(1.0, "mEq/L")).outcome == "fires"


@pytest.mark.parametrize(
    ("value", "unit", "outcome"),
    [(0.6, "mmol/l", "fires"), (0.7, "mmol/l", "not-fires"), (1.2, "meq/l", "fires"), (1.4, "meq/l", "not-fires"),
     (1.5, "mg/dl", "fires"), (1.7, "mg/dl", "not-fires")],
)  # fmt: skip
def test_lower_case_unit_text_without_ucum_code(value: float, unit: str, outcome: str):
    assert decide(ARRHYTHMIA, AF, magnesium(value, unit, ucum=False)).outcome == outcome


def test_missing_unit_on_mass_loinc_is_inferred_as_mg_dl():
    decision = decide(ARRHYTHMIA, AF, magnesium(1.2, None, loinc=MG_MASS))
    assert decision.outcome == "fires"
    assert "1.2 mg/dL" in decision.card["detail"]


def test_missing_unit_inferred_at_the_boundary_compares_in_mg_dl():
    assert decide(ARRHYTHMIA, AF, magnesium(1.7, None, loinc=MG_MASS)).outcome == "not-fires"


def test_missing_unit_on_moles_loinc_is_inferred_as_mmol_l():
    assert decide(ARRHYTHMIA, AF, magnesium(0.6, None, loinc=MG_MOLES)).outcome == "fires"


@pytest.mark.parametrize("unit", ["mg/L", "g/dL", "umol/L"])
def test_unknown_magnesium_unit_is_indeterminate(unit: str):
    decision = decide(ARRHYTHMIA, AF, magnesium(0.5, unit))
    assert decision.outcome == "indeterminate"
    assert decision.card is None
    assert decision.resolves is False


# --- comparators -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("comparator", "value", "outcome"),
    [("<", 0.5, "fires"), ("<", 0.7, "fires"), ("<=", 0.7, "indeterminate"), (">", 0.5, "indeterminate"),
     (">", 0.8, "not-fires"), (">=", 0.7, "not-fires")],
)  # fmt: skip
def test_magnesium_comparators(comparator: str, value: float, outcome: str):
    assert decide(ARRHYTHMIA, AF, magnesium(value, comparator=comparator)).outcome == outcome


def test_comparator_is_shown_on_the_card():
    decision = decide(ARRHYTHMIA, AF, magnesium(1.0, "mg/dL", comparator="<"))
    assert "<1 mg/dL" in decision.card["summary"] or "<1.0 mg/dL" in decision.card["summary"]


# --- statuses and windows ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["corrected", "amended"])
def test_corrected_and_amended_magnesium_count(status: str):
    assert decide(ARRHYTHMIA, AF, magnesium(0.6, status=status)).outcome == "fires"


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "preliminary"])
def test_uncounted_magnesium_statuses(status: str):
    assert decide(ARRHYTHMIA, AF, magnesium(0.6, status=status)).outcome == "not-fires"


def test_magnesium_older_than_72h_does_not_count():
    assert decide(ARRHYTHMIA, AF, magnesium(0.5, at=ago(73))).outcome == "not-fires"


def test_newer_normal_magnesium_resolves():
    decision = decide(ARRHYTHMIA, AF, magnesium(0.5, at=ago(20)), magnesium(0.8, at=ago(2)))
    assert decision.outcome == "not-fires"
    assert decision.resolves is True


# --- arrhythmia evidence -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("af", "severity"),
    [
        (condition("49436004", SNOMED, onset=ago(30)), "warning"),
        (condition("I48.91", ICD10CM, onset=ago(30)), "warning"),
        (condition("I4891", MIMIC_ICD10, clinical=None, onset=None, recordedDate=ago(30)), "warning"),  # MIMIC
        (condition("71908006", SNOMED, onset=ago(30)), "critical"),  # ventricular fibrillation
        (condition("I4581", ICD10CM, onset=ago(30)), "critical"),  # long QT syndrome
    ],
    ids=["snomed-af", "icd10cm-I48.91", "mimic-I4891", "snomed-vf", "icd10-long-qt"],
)
def test_arrhythmia_condition_codes(af: dict, severity: str):
    decision = decide(ARRHYTHMIA, af, magnesium(0.6))
    assert (decision.outcome, decision.severity) == ("fires", severity)


def test_a_condition_with_no_dates_cannot_be_shown_to_be_recent():
    undated = condition("I4891", MIMIC_ICD10, clinical=None, onset=None)
    assert decide(ARRHYTHMIA, undated, magnesium(0.6)).outcome == "not-fires"


def test_a_diagnosis_older_than_the_7_day_window_is_not_evidence_and_ages_out_by_time():
    af = condition(onset=ago(24 * 6))
    decision = decide(ARRHYTHMIA, af, magnesium(0.6))
    assert decision.fires
    assert decision.next_change == NOW + timedelta(days=1, microseconds=1)  # the diagnosis leaves its 7 days first
    assert decide(ARRHYTHMIA, condition(onset=ago(24 * 7 + 1)), magnesium(0.6)).outcome == "not-fires"


def test_resolved_condition_does_not_count():
    resolved = condition(clinical="resolved", abatementDateTime="2023-06-01")
    assert decide(ARRHYTHMIA, resolved, magnesium(0.5)).outcome == "not-fires"


def test_condition_that_abated_before_the_window_does_not_count():
    abated = condition(clinical="active", abatementDateTime="2024-01-01")
    assert decide(ARRHYTHMIA, abated, magnesium(0.5)).outcome == "not-fires"


def test_refuted_condition_does_not_count():
    refuted = condition(
        verificationStatus={
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "refuted"}]
        }
    )
    assert decide(ARRHYTHMIA, refuted, magnesium(0.5)).outcome == "not-fires"


def test_ecg_observation_value_counts():
    decision = decide(ARRHYTHMIA, ecg(at=ago(3)), magnesium(0.5))
    assert decision.outcome == "fires"


def test_ecg_older_than_72h_does_not_count():
    assert decide(ARRHYTHMIA, ecg(at=ago(80)), magnesium(0.5)).outcome == "not-fires"


def test_entered_in_error_ecg_does_not_count():
    assert decide(ARRHYTHMIA, ecg(status="entered-in-error"), magnesium(0.5)).outcome == "not-fires"


# --- QTc ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "outcome"),
    [(520, "ms", "fires"), (0.52, "s", "fires"), (500, "ms", "not-fires"), (0.5, "s", "not-fires"),
     (501, "ms", "fires"), (520, "msec", "fires")],
)  # fmt: skip
def test_qtc_in_ms_and_s(value: float, unit: str, outcome: str):
    decision = decide(ARRHYTHMIA, qtc(value, unit, at=ago(3)), magnesium(0.45))
    assert decision.outcome == outcome
    if outcome == "fires":
        in_ms = value * 1000 if unit == "s" else value
        assert f"QTc {in_ms:g} ms" in decision.card["summary"]  # clinicians read QTc in ms
        assert decision.severity == "critical"


def test_qtc_from_an_ecg_panel_component():
    decision = decide(ARRHYTHMIA, ecg_panel(530, at=ago(3)), magnesium(0.6))
    assert decision.outcome == "fires"
    assert "QTc 530 ms" in decision.card["summary"]


def test_qtc_from_an_ecg_panel_component_in_seconds():
    assert decide(ARRHYTHMIA, ecg_panel(0.51, "s", at=ago(3)), magnesium(0.6)).outcome == "fires"


def test_qtc_without_unit_is_indeterminate():
    decision = decide(ARRHYTHMIA, qtc(520, None, at=ago(3)), magnesium(0.5))
    assert decision.outcome == "indeterminate"
    assert "missing unit" in decision.explanation


def test_qtc_without_unit_does_not_matter_when_a_condition_is_present():
    assert decide(ARRHYTHMIA, AF, qtc(520, None, at=ago(3)), magnesium(0.5)).outcome == "fires"


def test_qtc_older_than_72h_does_not_count():
    assert decide(ARRHYTHMIA, qtc(540, at=ago(80)), magnesium(0.5)).outcome == "not-fires"


def test_latest_qtc_decides():
    old_long, new_normal = qtc(540, at=ago(30)), qtc(440, at=ago(3))
    assert decide(ARRHYTHMIA, old_long, new_normal, magnesium(0.5)).outcome == "not-fires"


def test_qtc_comparator_above_500_is_long():
    assert decide(ARRHYTHMIA, qtc(500, comparator=">", at=ago(3)), magnesium(0.5)).outcome == "fires"
