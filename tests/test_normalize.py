"""FHIR -> facts: validation, units, comparators, statuses, versions and bundle walking."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fhir_builders import (
    AF_SNOMED,
    HYPOK,
    ICD10CM,
    K_BLOOD,
    MG_MASS,
    MIMIC_ICD10,
    SNOMED,
    ago,
    bundle,
    coding,
    concept,
    condition,
    decide,
    ecg,
    ecg_panel,
    magnesium,
    normalize,
    only_fact,
    potassium,
    qtc,
    quantity,
    subject,
)

from rules.facts import latest_versions
from rules.normalize import NormalizeOptions, normalize_resource, normalize_resources

# --- validation: invalid input gives field-level issues, never an exception ----------------------------


def _rejected(data: Any) -> Any:
    result = normalize_resource(data)
    assert result.outcome == "rejected", result
    assert result.facts == []
    assert result.issues, "a rejection must say why"
    assert all(issue.severity == "error" for issue in result.issues)
    assert result.reason
    return result


def _paths(result: Any) -> list[str]:
    return [issue.path for issue in result.issues]


def test_bad_status_code_is_rejected_naming_the_field():
    result = _rejected(potassium(3.2, status="bogus"))
    assert any("Observation.status" in p for p in _paths(result))
    assert "bogus" in result.reason


def test_bad_comparator_is_rejected_naming_the_field():
    result = _rejected(potassium(3.2, comparator="~"))
    assert any("valueQuantity.comparator" in p for p in _paths(result))


def test_bad_comparator_in_a_component_is_rejected():
    panel = ecg_panel(520)
    panel["component"][1]["valueQuantity"]["comparator"] = "approx"
    result = _rejected(panel)
    assert any("component[1].valueQuantity.comparator" in p for p in _paths(result))


@pytest.mark.parametrize("value", ["3.x", "", "three", True])
def test_malformed_decimal_is_rejected(value: Any):
    result = _rejected(potassium(value))
    assert any("valueQuantity.value" in p for p in _paths(result))


def test_unknown_field_is_rejected():
    result = _rejected(potassium(3.2, colour="red"))
    assert any(p.endswith("colour") for p in _paths(result))


def test_spec_placeholder_key_is_rejected():
    result = _rejected(potassium(3.2, **{"...": "<snipped for brevity>"}))
    assert any("..." in p for p in _paths(result))


def test_template_token_in_a_date_is_rejected():
    result = _rejected(potassium(3.2, at="{{context.encounterDate}}"))
    assert any("effectiveDateTime" in p for p in _paths(result))


def test_missing_subject_is_rejected():
    resource = potassium(3.2)
    del resource["subject"]
    result = _rejected(resource)
    assert _paths(result) == ["Observation.subject"]


def test_subject_that_is_not_a_patient_is_rejected():
    result = _rejected(potassium(3.2, subject={"reference": "Group/103"}))
    assert _paths(result) == ["Observation.subject"]


def test_default_patient_fills_a_missing_subject():
    resource = potassium(3.2)
    del resource["subject"]
    result = normalize_resource(resource, NormalizeOptions(default_patient="ctx-patient"))
    assert result.outcome == "accepted"
    assert result.facts[0].patient == "ctx-patient"


def test_missing_resource_type_is_rejected():
    resource = potassium(3.2)
    del resource["resourceType"]
    result = _rejected(resource)
    assert "resourceType" in result.issues[0].path


def test_missing_id_is_rejected():
    resource = potassium(3.2)
    del resource["id"]
    result = _rejected(resource)
    assert _paths(result) == ["Observation.id"]


def test_missing_required_code_is_rejected():
    resource = potassium(3.2)
    del resource["code"]
    result = _rejected(resource)
    assert "Observation.code" in _paths(result)


@pytest.mark.parametrize("data", [None, 42, "Observation", [potassium(3.2)], 3.5])
def test_non_object_input_is_rejected(data: Any):
    result = _rejected(data)
    assert "JSON object" in result.reason


def test_bad_medication_request_intent_is_rejected():
    resource = {
        "resourceType": "MedicationRequest",
        "id": "mr-bad",
        "status": "active",
        "intent": "wish",
        "medicationCodeableConcept": concept(coding("http://www.nlm.nih.gov/research/umls/rxnorm", "4603")),
        "subject": subject(),
    }
    result = _rejected(resource)
    assert "MedicationRequest.intent" in _paths(result)


def test_dstu2_medication_order_is_ignored_not_rejected():
    order = {
        "resourceType": "MedicationOrder",
        "id": "medrx002",
        "dateWritten": "2017-04-25",
        "status": "active",
        "patient": {"reference": "Patient/example"},
        "medicationCodeableConcept": concept(coding("http://www.nlm.nih.gov/research/umls/rxnorm", "4603")),
    }
    result = normalize_resource(order)
    assert result.outcome == "ignored"
    assert result.facts == []
    assert "MedicationOrder is not a type the rules read" in result.reason


def test_dstu2_wrapped_response_resource_entry_is_unwrapped():
    """README item 15/19: a prefetch value may be a pre-R4 ``{response, resource}`` wrapper; the
    resource inside is what must be judged (here: a DSTU2 MedicationOrder, ignored), not the wrapper."""
    wrapper = {
        "response": {"status": "200 OK"},
        "resource": {
            "resourceType": "MedicationOrder",
            "id": "medrx002",
            "dateWritten": "2017-04-25",
            "status": "active",
            "patient": {"reference": "Patient/example"},
        },
    }
    results = normalize_resources(wrapper)
    assert [(r.resource_type, r.outcome) for r in results] == [("MedicationOrder", "ignored")]


@pytest.mark.parametrize("status", [["final"], {"code": "final"}])
def test_status_of_the_wrong_json_type_is_rejected_not_raised(status: Any):
    """A JSON array/object where a code is expected must give an issue, not a TypeError
    (rules/normalize.py parse(): ``value not in allowed`` hashes the value)."""
    result = _rejected(potassium(3.2, status=status))
    assert any("Observation.status" in p for p in _paths(result))


def test_request_intent_of_the_wrong_json_type_is_rejected_not_raised():
    resource = {
        "resourceType": "MedicationRequest",
        "id": "mr-bad",
        "status": "active",
        "intent": ["order"],
        "medicationCodeableConcept": concept(coding("http://www.nlm.nih.gov/research/umls/rxnorm", "4603")),
        "subject": subject(),
    }
    result = _rejected(resource)
    assert any("MedicationRequest.intent" in p for p in _paths(result))


def test_absolute_patient_reference_is_read():
    fact = only_fact(potassium(3.2, subject={"reference": "http://ehr.example/fhir/Patient/p9"}))
    assert fact.patient == "p9"


@pytest.mark.parametrize(
    "data",
    [
        {"resourceType": "Bundle", "type": "collection", "entry": "x"},
        {"resourceType": "Bundle", "type": "collection", "entry": [None, 1, {"resource": None}, {"resource": "x"}]},
    ],
)
def test_malformed_bundle_entries_do_not_raise(data: Any):
    assert all(r.outcome != "accepted" for r in normalize_resources(data))


def test_validation_does_not_mutate_the_input():
    resource = potassium(3.2, comparator="~")
    before = copy.deepcopy(resource)
    normalize_resource(resource)
    assert resource == before


# --- units -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "ucum", "expected"),
    [
        ("mmol/L", True, "3.2"),
        ("mmol/l", False, "3.2"),
        ("meq/l", False, "3.2"),
        ("mEq/L", True, "3.2"),
        ("mmol/L", False, "3.2"),
    ],
)
def test_potassium_units(unit: str, ucum: bool, expected: str):
    fact = only_fact(potassium(3.2, unit, ucum=ucum))
    assert fact.concept == "potassium"
    assert fact.determinate
    assert fact.value == Decimal(expected)
    assert fact.unit == "mmol/L"


@pytest.mark.parametrize(
    ("value", "unit", "ucum", "mmol"),
    [
        (0.6, "mmol/L", True, Decimal("0.6")),
        (0.6, "mmol/l", False, Decimal("0.6")),
        (1.2, "mEq/L", True, Decimal("0.6")),  # divalent: 2 mEq = 1 mmol
        (1.2, "meq/l", False, Decimal("0.6")),
        (2.431, "mg/dL", True, Decimal("1.000")),  # 24.305 g/mol
        (2.431, "mg/dl", False, Decimal("1.000")),
    ],
)
def test_magnesium_units(value: float, unit: str, ucum: bool, mmol: Decimal):
    fact = only_fact(magnesium(value, unit, ucum=ucum))
    assert fact.unit == "mmol/L"
    assert fact.value is not None
    assert abs(fact.value - mmol) < Decimal("0.001"), fact.value
    assert fact.reported_unit == unit


@pytest.mark.parametrize(("value", "unit", "ms"), [(0.52, "s", Decimal("520")), (520, "ms", Decimal("520"))])
def test_qtc_units(value: float, unit: str, ms: Decimal):
    fact = only_fact(qtc(value, unit))
    assert fact.value == ms
    assert fact.unit == "ms"


def test_missing_unit_is_inferred_from_the_loinc_property_with_a_note():
    k = only_fact(potassium(3.1, None))
    assert k.value == Decimal("3.1")
    assert k.reported_unit == "mmol/L"
    assert any("unit inferred" in n for n in k.notes)
    mg = only_fact(magnesium(1.2, None, loinc=MG_MASS))
    assert mg.reported_unit == "mg/dL"
    assert mg.value is not None and abs(mg.value - Decimal("0.4936")) < Decimal("0.001")
    assert any("unit inferred" in n for n in mg.notes)


def test_missing_unit_is_indeterminate_when_the_loinc_code_does_not_fix_it():
    fact = only_fact(qtc(480, None))
    assert not fact.determinate
    assert fact.value is None
    assert "missing unit" in (fact.problem or "")


@pytest.mark.parametrize("unit", ["mg", "umol/L", "%", "mmol/x"])
def test_unknown_unit_is_indeterminate(unit: str):
    fact = only_fact(potassium(3.0, unit))
    assert not fact.determinate
    assert fact.value is None
    assert unit in (fact.problem or "")


def test_non_ucum_system_falls_back_to_the_unit_text():
    """Observation-f203 style: SNOMED code in valueQuantity.system; the `unit` text decides."""
    vq = quantity(3.3, "mmol/L", system=SNOMED, code="258813002", ucum=False)
    fact = only_fact(potassium(None, valuequantity=vq))
    assert fact.value == Decimal("3.3")
    vq = quantity(122, "umol/L", system=SNOMED, code="258814008", ucum=False)
    fact = only_fact(potassium(None, valuequantity=vq))
    assert not fact.determinate
    assert "umol/L" in (fact.problem or "")
    assert "258814008" not in (fact.problem or "")


def test_ucum_code_wins_over_unit_text():
    vq = quantity(1.2, "Milliequivalents per liter", code="meq/L")
    fact = only_fact(magnesium(None, valuequantity=vq))
    assert fact.value == Decimal("0.6")


def test_long_float_value_is_kept_exactly():
    fact = only_fact(potassium(3.700000781824548, loinc=K_BLOOD))
    assert str(fact.value).startswith("3.7000007818")
    assert fact.value > Decimal("3.7")


@pytest.mark.parametrize("value", [1e-22, 1000000000000000000, 1e245, -1e245, 0, 0.3, 16])
def test_implausible_values_are_data_errors_not_alerts(value: float):
    result = normalize_resource(potassium(value))
    assert result.outcome == "accepted"
    [fact] = result.facts
    assert fact.value is None
    assert fact.reported_value == str(Decimal(str(value)))
    assert "implausible value" in fact.problem


@pytest.mark.parametrize(("value", "unit"), [(1.0, "mmol/L"), (0.6, "mmol/L"), (14, "mmol/L"), (58, "mg/dL")])
def test_extreme_but_plausible_potassium_is_kept(value: float, unit: str):
    fact = only_fact(potassium(value, unit, loinc="22760-3" if unit == "mg/dL" else "2823-3"))
    assert fact.problem is None
    assert fact.value is not None


def test_magnesium_in_mg_dl_mislabelled_as_mmol_is_caught():
    fact = only_fact(magnesium(19.5, "mmol/L"))  # 19.5 mg/dL-ish number with the wrong unit
    assert fact.value is None
    assert "implausible" in fact.problem


def test_implausible_potassium_makes_the_rule_indeterminate_not_fire():
    decision = decide(HYPOK, potassium(1e-22, at=ago(2)))
    assert decision.outcome == "indeterminate"


def test_potassium_with_two_codings_is_read():
    fact = only_fact(potassium(3.2, extra_codings=[coding(SNOMED, "59573005", "Potassium measurement")]))
    assert fact.concept == "potassium"


def test_excluded_lab_code_says_why_it_is_ignored():
    result = normalize_resource(magnesium(0.5, loinc="73573-8"))  # ionized Mg
    assert result.outcome == "ignored"
    assert "ionized" in (result.reason or "")


def test_unrelated_observation_is_ignored():
    result = normalize_resource(potassium(6.3, loinc="15074-8"))  # glucose
    assert result.outcome == "ignored"
    assert result.facts == []


# --- comparators and value strings -------------------------------------------------------------------


@pytest.mark.parametrize("comparator", ["<", "<=", ">", ">="])
def test_comparator_is_kept_on_the_fact(comparator: str):
    fact = only_fact(magnesium(0.5, comparator=comparator))
    assert fact.comparator == comparator
    assert fact.value == Decimal("0.5")


def test_value_string_with_comparator_is_parsed():
    resource = magnesium(None, valueString="<0.5 mmol/L")
    fact = only_fact(resource)
    assert fact.comparator == "<"
    assert fact.value == Decimal("0.5")


def test_unparseable_value_string_is_indeterminate():
    fact = only_fact(potassium(None, valueString="haemolysed"))
    assert not fact.determinate
    assert "haemolysed" in (fact.problem or "")


def test_result_without_value_does_not_count():
    resource = potassium(None, dataAbsentReason=concept(text="specimen lost"))
    fact = only_fact(resource)
    assert fact.counts is False
    assert any("specimen lost" in n for n in fact.notes)


# --- status ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["final", "amended", "corrected"])
def test_reportable_statuses_count(status: str):
    fact = only_fact(potassium(3.2, status=status))
    assert fact.counts and not fact.retracted


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_retracted_statuses_never_count(status: str):
    fact = only_fact(potassium(3.2, status=status))
    assert fact.counts is False
    assert fact.retracted is True


@pytest.mark.parametrize("status", ["registered", "preliminary", "unknown"])
def test_non_final_statuses_do_not_count_by_default(status: str):
    fact = only_fact(potassium(3.2, status=status))
    assert fact.counts is False
    assert fact.retracted is False


def test_preliminary_counts_when_the_deployment_says_so():
    options = NormalizeOptions(include_preliminary=True)
    assert only_fact(potassium(3.2, status="preliminary"), options=options).counts is True
    assert only_fact(potassium(3.2, status="registered"), options=options).counts is False


def test_result_without_time_does_not_count():
    resource = potassium(3.2)
    del resource["effectiveDateTime"]
    fact = only_fact(resource)
    assert fact.counts is False
    assert "no effective time" in fact.notes


def test_time_is_normalised_to_utc():
    fact = only_fact(potassium(3.2, at="2024-05-01T10:00:00+02:00"))
    assert fact.start is not None
    assert fact.start.isoformat() == "2024-05-01T08:00:00+00:00"


# --- versions ----------------------------------------------------------------------------------------


def test_newer_entered_in_error_version_replaces_the_final_one():
    v1 = normalize(potassium(3.1, id="k1", version="1")).facts
    v2 = normalize(potassium(3.1, id="k1", version="2", status="entered-in-error")).facts
    kept = latest_versions([*v1, *v2])
    assert len(kept) == 1
    assert kept[0].version == "2"
    assert kept[0].retracted


def test_order_of_arrival_does_not_matter_for_numeric_versions():
    v1 = normalize(potassium(3.1, id="k1", version="1")).facts
    v2 = normalize(potassium(3.6, id="k1", version="2", status="corrected")).facts
    assert latest_versions([*v2, *v1]) == latest_versions([*v1, *v2]) == v2


def test_version_10_is_newer_than_version_9():
    v9 = normalize(potassium(3.1, id="k1", version="9")).facts
    v10 = normalize(potassium(3.6, id="k1", version="10")).facts
    assert latest_versions([*v10, *v9])[0].version == "10"


def test_unversioned_retraction_outranks_unversioned_peer():
    final = normalize(potassium(3.1, id="k1")).facts
    retraction = normalize(potassium(3.1, id="k1", status="entered-in-error")).facts
    assert latest_versions([*retraction, *final])[0].retracted


def test_last_updated_orders_versions_without_version_id():
    old = normalize(potassium(3.1, id="k1", meta={"lastUpdated": "2024-05-01T08:00:00Z"})).facts
    new = normalize(potassium(3.7, id="k1", meta={"lastUpdated": "2024-05-01T09:00:00Z"})).facts
    assert latest_versions([*new, *old])[0].value == Decimal("3.7")


def test_latest_versions_keeps_other_resources():
    a = normalize(potassium(3.1, id="a")).facts
    b = normalize(potassium(3.2, id="b")).facts
    assert len(latest_versions([*a, *b])) == 2


# --- ECG, QTc components and arrhythmia --------------------------------------------------------------


def test_ecg_panel_component_yields_qtc_with_a_note():
    fact = only_fact(ecg_panel(0.52, "s"), "qtc")
    assert fact.value == Decimal("520")
    assert any("component[1]" in n for n in fact.notes)


def test_ecg_rhythm_value_yields_an_arrhythmia_finding():
    fact = only_fact(ecg(AF_SNOMED))
    assert fact.concept == "arrhythmia"
    assert fact.kind == "finding"


@pytest.mark.parametrize(
    ("code", "system"),
    [(AF_SNOMED, SNOMED), ("I48.91", ICD10CM), ("I4891", MIMIC_ICD10), ("42731", "http://hl7.org/fhir/sid/icd-9-cm")],
)
def test_arrhythmia_condition_codes(code: str, system: str):
    fact = only_fact(condition(code, system))
    assert fact.concept == "arrhythmia"
    assert fact.kind == "condition"
    assert fact.counts


ICD9CM = "http://hl7.org/fhir/sid/icd-9-cm"


@pytest.mark.parametrize(
    ("code", "system", "high_risk"),
    [
        ("49436004", SNOMED, False),  # AF
        ("282825002", SNOMED, False),  # paroxysmal AF
        ("440059007", SNOMED, False),  # persistent AF
        ("440028005", SNOMED, False),  # permanent AF
        ("426749004", SNOMED, False),  # chronic AF
        ("698247007", SNOMED, False),  # cardiac arrhythmia (generic)
        ("111975006", SNOMED, False),  # prolonged QT interval: critical only through a measured QTc > 500
        ("31722008", SNOMED, True),  # torsades
        ("71908006", SNOMED, True),  # VF
        ("9651007", SNOMED, True),  # long QT syndrome
        ("I47.1", ICD10CM, False),  # SVT
        ("I47.10", ICD10CM, False),
        ("I47.0", ICD10CM, True),  # re-entry ventricular arrhythmia
        ("I47.21", ICD10CM, True),  # torsades (FY2023)
        ("I47.2", ICD10CM, True),  # VT
        ("I47.9", ICD10CM, False),
        ("I48.0", ICD10CM, False),
        ("I49.01", ICD10CM, True),  # VF
        ("I49.02", ICD10CM, True),  # ventricular flutter
        ("I49.3", ICD10CM, False),  # ventricular premature depolarization
        ("I49.9", ICD10CM, False),
        ("I45.81", ICD10CM, True),  # long QT syndrome
        ("427.0", ICD9CM, False),  # PSVT
        ("427.1", ICD9CM, True),  # paroxysmal VT
        ("427.31", ICD9CM, False),  # AF
        ("427.41", ICD9CM, True),  # VF
        ("427.69", ICD9CM, False),  # other premature beats
        ("427.89", ICD9CM, False),  # other specified dysrhythmias
        ("427.9", ICD9CM, False),
    ],
)
def test_arrhythmia_codes_and_their_tier(code: str, system: str, high_risk: bool):
    facts = normalize(condition(code, system)).facts
    assert {f.concept for f in facts} == ({"arrhythmia", "high-risk-arrhythmia"} if high_risk else {"arrhythmia"})
    assert all(f.kind == "condition" and f.counts for f in facts)


@pytest.mark.parametrize(("code", "system"), [("427.5", ICD9CM), ("I46.9", ICD10CM), ("I44.2", ICD10CM)])
def test_cardiac_arrest_and_heart_block_are_not_arrhythmia_evidence(code: str, system: str):
    assert normalize_resource(condition(code, system)).outcome == "ignored"


@pytest.mark.parametrize(("rhythm", "high_risk"), [("164889003", False), ("164890007", False), ("164896001", True)])
def test_ecg_findings_and_their_tier(rhythm: str, high_risk: bool):
    facts = normalize(ecg(rhythm)).facts
    assert {(f.concept, f.kind) for f in facts} == {("arrhythmia", "finding")} | (
        {("high-risk-arrhythmia", "finding")} if high_risk else set()
    )
    assert all(f.display for f in facts)  # the value set's display when the coding has none


def test_every_arrhythmia_code_has_a_source_and_a_verification_level():
    from rules.datafiles import load_valueset

    data = load_valueset("arrhythmia")
    for item in [*data["snomed"], *data["icd10_prefixes"], *data["icd9_prefixes"]]:
        assert item["verification"] in ("V", "S") and item["source"] and item["display"], item


def test_a_condition_counts_from_when_the_record_knew_it():
    fact = only_fact(condition(onset="2015-03-01", recordedDate="2024-04-30T10:00:00Z", category=[_ENCOUNTER_DX]))
    assert fact.start == datetime(2024, 4, 30, 10, tzinfo=UTC)
    assert any("onset 2015-03-01" in n for n in fact.notes) and "encounter diagnosis" in fact.notes
    recorded_first = only_fact(condition(onset="2024-04-30", recordedDate="2024-04-29"))
    assert recorded_first.start == datetime(2024, 4, 30, tzinfo=UTC)
    assert only_fact(condition(onset=None, recordedDate="2024-04-29")).start == datetime(2024, 4, 29, tzinfo=UTC)


def test_a_placeholder_abatement_is_read_as_not_abated():
    fact = only_fact(condition(abatementDateTime="9999-12-31"))
    assert fact.end is None and any("not abated" in n for n in fact.notes)


@pytest.mark.parametrize("when", ["9999-12-31T00:00:00Z", "9000-01-01"])
def test_an_observation_dated_with_a_placeholder_is_rejected_naming_the_field(when: str):
    result = normalize_resource(potassium(3.1, at=when))
    assert result.outcome == "rejected"
    assert result.issues[0].path == "Observation.effective[x]" and "placeholder" in result.issues[0].message


def test_a_time_at_the_end_of_the_calendar_with_a_negative_offset_does_not_overflow():
    result = normalize_resource(potassium(3.1, at="9999-12-31T23:59:59-05:00"))
    assert result.outcome == "rejected"


_ENCOUNTER_DX = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]
}


def test_non_arrhythmia_condition_is_ignored():
    assert normalize_resource(condition("38341003")).outcome == "ignored"  # hypertension
    assert normalize_resource(condition("I10", ICD10CM)).outcome == "ignored"


def test_icd10_code_under_a_snomed_system_is_not_matched():
    assert normalize_resource(condition("I4891", SNOMED)).outcome == "ignored"


def test_mimic_condition_without_status_or_dates_counts_with_notes():  # (the arrhythmia rule needs a date)
    fact = only_fact(condition("I4891", MIMIC_ICD10, clinical=None, onset=None))
    assert fact.counts
    assert fact.start is None
    assert any("no clinicalStatus" in n for n in fact.notes)


@pytest.mark.parametrize("clinical", ["resolved", "inactive", "remission"])
def test_inactive_condition_does_not_count(clinical: str):
    assert only_fact(condition(clinical=clinical)).counts is False


@pytest.mark.parametrize("verification", ["refuted", "entered-in-error", "differential"])
def test_unconfirmed_condition_does_not_count(verification: str):
    resource = condition(
        verificationStatus=concept(coding("http://terminology.hl7.org/CodeSystem/condition-ver-status", verification))
    )
    assert only_fact(resource).counts is False


# --- bundles -----------------------------------------------------------------------------------------


def test_nested_bundles_are_walked():
    inner1 = bundle(potassium(3.2, id="a"))
    inner2 = bundle(magnesium(0.6, id="b"), condition(id="c"))
    outer = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": inner1}, {"resource": inner2}],
    }
    results = normalize_resources(outer)
    assert sorted(r.resource_id for r in results) == ["a", "b", "c"]
    assert all(r.outcome == "accepted" for r in results)


def test_batch_response_searchsets_are_walked():
    searchset = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": potassium(3.2, id="k")}]}
    response = {
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": [{"resource": searchset, "response": {"status": "200 OK"}}],
    }
    assert [r.resource_id for r in normalize_resources(response)] == ["k"]


def test_operation_outcome_entry_is_ignored():
    searchset = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": potassium(3.2, id="k"), "search": {"mode": "match"}},
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "id": "warning",
                    "issue": [{"severity": "warning", "code": "incomplete"}],
                },
                "search": {"mode": "outcome"},
            },
        ],
    }
    outcomes = {r.resource_type: r.outcome for r in normalize_resources(searchset)}
    assert outcomes == {"Observation": "accepted", "OperationOutcome": "ignored"}


def test_a_bad_entry_does_not_stop_the_others():
    results = normalize_resources([potassium(3.2, status="bogus"), magnesium(0.6), "junk"])
    assert [r.outcome for r in results] == ["rejected", "accepted", "rejected"]


# --- units follow the code (issue 10 item 7) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "reason"),
    [
        (lambda: potassium(4.0, "mg/dL"), "LOINC 2823-3"),  # K in mg/dL under the molar serum code
        (lambda: potassium(4.0, "mg/dL", loinc="6298-4"), "LOINC 6298-4"),
        (lambda: magnesium(1.5, "mmol/L", loinc="19123-9"), "LOINC 19123-9"),  # Mg mmol/L under the mass code
        (lambda: magnesium(1.5, "meq/L", loinc="19123-9"), "LOINC 19123-9"),
        (lambda: magnesium(1.9, "mg/dL", loinc="2601-3"), "LOINC 2601-3"),
    ],
)
def test_a_unit_that_contradicts_the_loinc_property_is_indeterminate(resource, reason: str):
    fact = only_fact(resource())
    assert fact.value is None and not fact.determinate
    assert reason in fact.problem and "the unit or the code is wrong" in fact.problem


def test_units_that_agree_with_the_code_convert():
    assert only_fact(potassium(15.6, "mg/dL", loinc="22760-3")).value == Decimal("15.6") * Decimal("0.255754")
    assert only_fact(magnesium(1.5, "mg/dL", loinc="19123-9")).value is not None
    assert only_fact(magnesium(0.6, "mmol/L", loinc="2601-3")).value == Decimal("0.6")
    assert only_fact(qtc(0.52, "s")).value == Decimal("520.00")


def test_a_contradicting_unit_makes_the_rules_indeterminate_never_normal():
    from fhir_builders import ARRHYTHMIA, HYPOK, condition, decide

    assert decide(HYPOK, potassium(4.0, "mg/dL")).outcome == "indeterminate"
    mg = magnesium(1.5, "mmol/L", loinc="19123-9")
    assert decide(ARRHYTHMIA, condition(onset=None, recordedDate="2024-04-30"), mg).outcome == "indeterminate"


# --- patient context: Patient, Encounter, dialysis, renal labs, reference ranges, encounter links -------------


def _context_fact(resource: dict[str, Any]) -> Any:
    result = normalize(resource)
    assert result.outcome == "accepted", result.reason
    [fact] = result.facts
    return fact


def test_a_patient_gives_birth_date_gender_official_name_and_typed_mrns():
    from fhir_builders import patient_resource

    resource = patient_resource(
        "p9", "1944-07-09", gender="male", family="Doe", given="John",
        name=[{"use": "old", "family": "Former"}, {"use": "official", "family": "Doe", "given": ["John", "Q"]}],
        identifier=[
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-99-9999",
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]}},
            {"value": "MRN-77", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                       "code": "MR"}]}},
        ],
    )  # fmt: skip
    fact = _context_fact(resource)
    assert (fact.patient, fact.concept, fact.kind) == ("p9", "patient", "patient")
    info = fact.patient_info
    assert (info.birth_date, info.gender, info.name, info.mrns) == ("1944-07-09", "male", "DOE, John Q", ("MRN-77",))
    assert info.deceased is None


def test_an_untyped_identifier_is_the_mrn_only_when_none_is_typed_and_name_text_wins():
    resource = {"resourceType": "Patient", "id": "ex", "birthDate": "1958",
                "identifier": [{"system": "https://ehr.example/mrn", "value": "EX-1"}, {"value": "other"}],
                "name": [{"text": "Example  Alpha", "family": "Ignored"}]}  # fmt: skip
    info = _context_fact(resource).patient_info
    assert (info.birth_date, info.mrns, info.name) == ("1958", ("EX-1",), "Example Alpha")


def test_deceased_boolean_means_dead_from_when_the_record_says_so():
    resource = {
        "resourceType": "Patient",
        "id": "d",
        "deceasedBoolean": True,
        "meta": {"lastUpdated": "2024-02-01T00:00:00Z"},
    }
    assert _context_fact(resource).patient_info.deceased == datetime(2024, 2, 1, tzinfo=UTC)


def test_a_patient_without_id_is_rejected_naming_the_id():
    result = normalize_resource({"resourceType": "Patient", "birthDate": "1950-01-01"})
    assert result.outcome == "rejected" and result.issues[0].path == "Patient.id"


def test_an_invalid_gender_is_rejected_naming_the_field():
    result = normalize_resource({"resourceType": "Patient", "id": "g", "gender": "M"})
    assert result.outcome == "rejected" and result.issues[0].path == "Patient.gender"


def test_an_encounter_gives_class_status_period_ward_and_bed():
    from fhir_builders import encounter

    fact = _context_fact(encounter("IMP", start="2024-04-29T10:00:00Z", ward="Ward 5 North", bed="12", id="stay"))
    assert (fact.concept, fact.kind, fact.status, fact.counts) == ("encounter", "encounter", "in-progress", True)
    assert fact.start == datetime(2024, 4, 29, 10, tzinfo=UTC) and fact.end is None
    assert (fact.encounter_info.class_code, fact.encounter_info.ward, fact.encounter_info.bed) == (
        "IMP",
        "Ward 5 North",
        "12",
    )


@pytest.mark.parametrize(("status", "counts"), [("planned", False), ("cancelled", False), ("arrived", True),
                                                 ("onleave", True), ("entered-in-error", False)])  # fmt: skip
def test_encounter_statuses(status: str, counts: bool):
    from fhir_builders import encounter

    fact = _context_fact(encounter("EMER", start="2024-04-29T10:00:00Z", status=status))
    assert fact.counts is counts
    assert fact.retracted is (status == "entered-in-error")


def test_a_finished_encounter_without_an_end_ended_when_last_updated():
    from fhir_builders import encounter

    resource = encounter(
        "IMP", start="2024-04-20T10:00:00Z", status="finished", meta={"lastUpdated": "2024-04-25T09:00:00Z"}
    )
    fact = _context_fact(resource)
    assert fact.end == datetime(2024, 4, 25, 9, tzinfo=UTC) and "ended when last updated" in fact.notes[0]


def test_dialysis_from_a_procedure_and_from_icd_9_and_icd_10_conditions():
    from fhir_builders import dialysis

    proc = _context_fact(dialysis(at="2024-04-30T09:00:00Z"))
    assert (proc.concept, proc.kind, proc.start, proc.end) == ("dialysis", "procedure", proc.start, proc.start)
    not_done = _context_fact(dialysis(at="2024-04-30T09:00:00Z", status="not-done"))
    assert not not_done.counts
    for code, system in (("Z99.2", "http://hl7.org/fhir/sid/icd-10-cm"), ("V45.11", "http://hl7.org/fhir/sid/icd-9-cm"),
                         ("N186", "http://fhir.mimic.mit.edu/CodeSystem/diagnosis-icd10")):  # fmt: skip
        fact = _context_fact(condition(code, system))
        assert (fact.concept, fact.kind) == ("dialysis", "condition"), code
    assert normalize(condition("Z99.89", "http://hl7.org/fhir/sid/icd-10-cm")).outcome == "ignored"  # exact codes only


@pytest.mark.parametrize(
    ("loinc", "value", "unit", "canonical"),
    [
        ("98979-8", 25, "mL/min/{1.73_m2}", "25"),
        ("33914-3", 61, "mL/min", "61"),  # Synthea writes plain mL/min under the per-1.73 m2 code
        ("62238-1", 45, "mL/min/1.73m2", "45"),
        ("2160-0", 1.2, "mg/dL", "106.08"),
        ("14682-9", 110, "umol/L", "110"),
    ],
)
def test_renal_results_are_read_in_their_canonical_units(loinc: str, value: float, unit: str, canonical: str):
    from fhir_builders import observation

    [fact] = normalize(observation(loinc, value, unit, at="2024-05-01T06:00:00Z")).facts
    assert format(fact.value.normalize(), "f") == canonical


def test_reference_range_low_is_kept_in_the_results_unit_and_the_canonical_one():
    fact = only_fact(
        magnesium(1.5, "mg/dL", referenceRange=[{"low": {"value": 1.7, "unit": "mg/dL"}, "high": {"value": 2.4}}])
    )
    assert fact.reference_low_reported == Decimal("1.7") and round(fact.reference_low, 3) == Decimal("0.699")
    unitless = only_fact(potassium(3.4, referenceRange=[{"low": {"value": 3.3}}]))  # no unit: the result's unit
    assert unitless.reference_low == Decimal("3.3") == unitless.reference_low_reported
    other_unit = only_fact(magnesium(1.5, "mg/dL", referenceRange=[{"low": {"value": 0.7, "unit": "mmol/L"}}]))
    assert other_unit.reference_low == Decimal("0.7") and round(other_unit.reference_low_reported, 2) == Decimal("1.70")
    odd = only_fact(potassium(3.4, referenceRange=[{"low": {"value": 3.3, "unit": "furlongs"}}]))
    assert odd.reference_low is None  # a unit that cannot be converted: the rule's own threshold applies


def test_facts_link_to_their_encounter():
    linked = only_fact(potassium(3.4, encounter={"reference": "Encounter/stay-1"}))
    assert linked.encounter == "Encounter/stay-1"
    in_bundle = only_fact(potassium(3.4, encounter={"reference": "urn:uuid:4f1b"}))
    assert in_bundle.encounter == "Encounter/4f1b"
    assert only_fact(potassium(3.4)).encounter is None


def test_patient_context_reaches_the_stream_events_with_retention_and_window():
    """A Patient is kept and read for every evaluation; an Encounter while in progress, then for the retention."""
    import math

    from fhir_builders import encounter, patient_resource

    from config.settings import Settings
    from workers.events import FOREVER, events_from
    from workers.state.timeline import readable_until

    settings = Settings()
    received = datetime(2024, 5, 1, tzinfo=UTC)
    person = events_from(normalize(patient_resource()), received)
    assert person is not None and person.expires(settings) == FOREVER and readable_until(person.facts) == math.inf
    open_stay = events_from(normalize(encounter("IMP", start="2024-04-29T10:00:00Z")), received)
    assert open_stay.expires(settings) == FOREVER and readable_until(open_stay.facts) == math.inf
    ended = events_from(normalize(encounter("IMP", start="2024-04-20T10:00:00Z", end="2024-04-25T10:00:00Z")), received)
    assert ended.expires(settings) == datetime(2024, 4, 25, 10, tzinfo=UTC) + timedelta(
        hours=settings.retention_encounter_hours
    )
    assert readable_until(ended.facts) == math.inf  # read by every evaluation while it is kept
    assert ended.event_time == datetime(2024, 4, 25, 10, tzinfo=UTC)  # the discharge moves the patient's clock
