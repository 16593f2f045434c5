"""Medication classification: codes at every level, references, combinations and free-text traps."""

from __future__ import annotations

from typing import Any

import pytest
from fhir_builders import (
    RXNORM,
    SNOMED,
    bundle,
    coding,
    concept,
    med_request,
    med_statement,
    normalize,
    rxnorm,
)

from rules.codes import Coding
from rules.medications import classify
from rules.normalize import normalize_resources

ATC = "http://www.whocc.no/atc"
NDC = "http://hl7.org/fhir/sid/ndc"


def classes_of(resource: dict[str, Any]) -> set[str]:
    """Medication classes (fact concepts) of one resource."""
    return {f.concept for f in normalize(resource).facts}


def text_only(text: str) -> dict[str, Any]:
    return concept(text=text)


# --- codes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "display", "expected"),
    [
        ("4603", "furosemide", "loop-diuretic"),  # ingredient
        ("313988", "Furosemide 40 MG Oral Tablet", "loop-diuretic"),  # Synthea SCD
        ("1719286", "10 ML Furosemide 10 MG/ML Injection", "loop-diuretic"),  # Synthea injection
        ("310798", "Hydrochlorothiazide 25 MG Oral Tablet", "thiazide-diuretic"),  # Synthea SCD
        ("316049", "Hydrochlorothiazide 25 MG", "thiazide-diuretic"),  # Synthea SCDC
        ("1808", "bumetanide", "loop-diuretic"),
        ("2409", "chlorthalidone", "thiazide-diuretic"),
        ("8591", "potassium chloride", "potassium-supplement"),
        ("6585", "magnesium sulfate", "magnesium-product"),
    ],
)
def test_rxnorm_codes(code: str, display: str, expected: str):
    assert classes_of(med_request(rxnorm(code, display))) == {expected}


@pytest.mark.parametrize(
    ("code", "expected"),
    [("C03CA01", "loop-diuretic"), ("C03CA04", "loop-diuretic"), ("C03AA03", "thiazide-diuretic"),
     ("C03BA11", "thiazide-diuretic"), ("A12BA01", "potassium-supplement"), ("A12CC02", "magnesium-product")],
)  # fmt: skip
def test_atc_codes(code: str, expected: str):
    assert classes_of(med_statement(concept(coding(ATC, code)))) == {expected}


def test_magnesium_laxative_atc_is_not_a_magnesium_product():
    assert classes_of(med_statement(concept(coding(ATC, "A06AD04")))) == set()


def test_coded_match_is_not_marked_as_free_text():
    (fact,) = normalize(med_request(rxnorm("313988"))).facts
    assert not any("free text" in n for n in fact.notes)


def test_unknown_code_falls_back_to_the_display_text():
    medication = concept(coding(RXNORM, "999999999", "Furosemide 20 MG Oral Tablet"))
    (fact,) = normalize(med_statement(medication)).facts
    assert fact.concept == "loop-diuretic"
    assert any("matched by free text" in n for n in fact.notes)


# --- combination products ----------------------------------------------------------------------------


def test_combination_product_counts_for_each_ingredient_class():
    facts = normalize(med_statement(rxnorm("608054", "Furosemide / Potassium Chloride"))).facts
    assert {f.concept for f in facts} == {"loop-diuretic", "potassium-supplement"}
    assert all(any("combination product" in n for n in f.notes) for f in facts)


def test_combination_of_two_diuretic_classes():
    facts = normalize(med_statement(rxnorm("1009094", "Amiloride / Furosemide / Indapamide"))).facts
    assert {f.concept for f in facts} == {"loop-diuretic", "thiazide-diuretic"}


def test_free_text_combination():
    classes = classes_of(med_statement(text_only("Furosemide 40 mg + potassium chloride 20 mEq")))
    assert classes == {"loop-diuretic", "potassium-supplement"}


# --- references --------------------------------------------------------------------------------------


def _chlorthalidone_medication(mid: str) -> dict[str, Any]:
    return {
        "resourceType": "Medication",
        "id": mid,
        "code": concept(coding(SNOMED, "317935006", "Chlorthalidone 50mg tablet (product)")),
    }


def test_contained_medication_reference():
    request = med_request(
        None, contained=[_chlorthalidone_medication("med0316")], medicationReference={"reference": "#med0316"}
    )
    assert classes_of(request) == {"thiazide-diuretic"}


def test_contained_medication_with_ingredients():
    medication = {
        "resourceType": "Medication",
        "id": "mix",
        "code": concept(text="Custom IV bag"),
        "ingredient": [{"itemCodeableConcept": rxnorm("8591", "potassium chloride")}],
    }
    request = med_request(None, contained=[medication], medicationReference={"reference": "#mix"})
    assert classes_of(request) == {"potassium-supplement"}


def test_bundle_urn_uuid_medication_reference():
    url = "urn:uuid:0c3f3a2e-2d9b-4d2b-9d64-5b0b1c1c7a11"
    medication = {"resourceType": "Medication", "id": "furo", "code": rxnorm("313988", "Furosemide 40 MG Oral Tablet")}
    request = med_request(None, medicationReference={"reference": url})
    results = normalize_resources(bundle(medication, request, full_urls=[url, "urn:uuid:req-1"]))
    (result,) = [r for r in results if r.resource_type == "MedicationRequest"]
    assert {f.concept for f in result.facts} == {"loop-diuretic"}


def test_bundle_relative_medication_reference():
    medication = {"resourceType": "Medication", "id": "furo", "code": rxnorm("4603")}
    request = med_request(None, medicationReference={"reference": "Medication/furo"})
    results = normalize_resources(bundle(medication, request))
    assert {f.concept for r in results for f in r.facts} == {"loop-diuretic"}


def test_unresolvable_reference_warns_and_uses_the_display():
    request = med_request(None, medicationReference={"reference": "Medication/elsewhere", "display": "Lasix 40 mg"})
    result = normalize(request)
    assert {f.concept for f in result.facts} == {"loop-diuretic"}
    assert any(i.severity == "warning" and "medicationReference" in i.path for i in result.issues)


# --- status and intent -------------------------------------------------------------------------------


@pytest.mark.parametrize("intent", ["proposal", "plan", "option"])
def test_request_that_is_not_an_order_does_not_count(intent: str):
    (fact,) = normalize(med_request(rxnorm("4603"), intent=intent)).facts
    assert fact.counts is False
    assert any(intent in n for n in fact.notes)


def test_do_not_perform_request_does_not_count():
    (fact,) = normalize(med_request(rxnorm("4603"), doNotPerform=True)).facts
    assert fact.counts is False


@pytest.mark.parametrize("status", ["stopped", "completed", "on-hold", "not-taken", "intended"])
def test_statement_not_active_does_not_count(status: str):
    (fact,) = normalize(med_statement(rxnorm("4603"), status=status)).facts
    assert fact.counts is False


def test_entered_in_error_statement_is_retracted():
    (fact,) = normalize(med_statement(rxnorm("4603"), status="entered-in-error")).facts
    assert fact.retracted and not fact.counts


def test_statement_period_and_request_validity_period():
    (statement,) = normalize(med_statement(rxnorm("4603"), start="2024-01-01", end="2024-02-01")).facts
    assert statement.start is not None and statement.end is not None
    assert statement.end.isoformat().startswith("2024-02-01")
    request = med_request(
        rxnorm("4603"),
        authored="2023-12-20",
        dispenseRequest={"validityPeriod": {"start": "2024-01-01", "end": "2024-03-01"}},
    )
    (fact,) = normalize(request).facts
    assert fact.start is not None and fact.start.isoformat().startswith("2024-01-01")
    assert fact.end is not None and fact.end.isoformat().startswith("2024-03-01")


# --- free-text traps ---------------------------------------------------------------------------------


def test_penicillin_v_potassium_code_is_not_a_potassium_supplement():
    medication = rxnorm("834102", "Penicillin V Potassium 500 MG Oral Tablet")
    assert classes_of(med_request(medication)) == set()


def test_penicillin_v_potassium_text_is_not_a_potassium_supplement():
    assert classes_of(med_request(text_only("Penicillin V Potassium 500 MG Oral Tablet"))) == set()


def test_losartan_potassium_hctz_text_is_a_thiazide_not_a_potassium_supplement():
    assert classes_of(med_statement(text_only("losartan potassium / hydrochlorothiazide"))) == {"thiazide-diuretic"}
    assert classes_of(med_statement(text_only("Losartan Potassium 50 MG / HCTZ 12.5 MG Oral Tablet"))) == {
        "thiazide-diuretic"
    }


@pytest.mark.parametrize(
    "text",
    [
        "esomeprazole magnesium 40 MG Delayed Release Oral Capsule",
        "Magnesium Hydroxide 80 MG/ML Oral Suspension",
        "milk of magnesia",
        "Diclofenac Potassium 50 MG Oral Tablet",
        "Amoxicillin 875 MG / Clavulanate Potassium 125 MG Oral Tablet",
        "spironolactone (potassium-sparing diuretic)",
        "Little Pink Pill for water retention",
    ],
)
def test_salt_and_vague_traps_classify_as_nothing(text: str):
    assert classes_of(med_statement(text_only(text))) == set()


def test_lasix_free_text_is_a_loop_diuretic_with_a_note():
    (fact,) = normalize(med_statement(text_only("Lasix 40 mg"))).facts
    assert fact.concept == "loop-diuretic"
    assert "matched by free text (lower confidence)" in fact.notes


def test_real_potassium_chloride_text_still_matches():
    assert classes_of(med_statement(text_only("Potassium Chloride 20 MEQ Extended Release Oral Tablet"))) == {
        "potassium-supplement"
    }
    assert classes_of(med_statement(text_only("KCl 40 mEq PO"))) == {"potassium-supplement"}


def test_magnesium_oxide_text_is_a_magnesium_product():
    assert classes_of(med_statement(text_only("Magnesium Oxide 400 MG Oral Tablet"))) == {"magnesium-product"}


def test_substring_of_a_longer_word_does_not_match():
    assert classify([], ["furosemidex-like compound"]) == []
    assert classify([Coding(RXNORM, " ")], []) == []
