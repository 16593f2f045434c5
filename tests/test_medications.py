"""Medication classification: codes at every level, references, combinations and free-text traps."""

from __future__ import annotations

from datetime import UTC, datetime
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

from config.settings import Settings
from rules.codes import Coding
from rules.medications import classify
from rules.normalize import normalize_resources
from workers.events import events_from

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


# --- the period a medication resource is evidence for (issue 10 item 12) ---------------------------------


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("status", ["not-taken", "intended", "unknown"])
def test_statement_not_known_to_be_taken_does_not_count(status: str):
    (fact,) = normalize(med_statement(rxnorm("4603"), status=status)).facts
    assert fact.counts is False and fact.notes


@pytest.mark.parametrize("status", ["cancelled", "draft", "unknown"])
def test_request_never_acted_on_does_not_count(status: str):
    facts = normalize(med_request(rxnorm("4603"), status=status)).facts
    medication = [f for f in facts if f.kind == "medication"]
    assert all(f.counts is False for f in medication)


@pytest.mark.parametrize("status", ["active", "on-hold", "completed", "stopped"])
def test_statement_counts_for_its_effective_period_whatever_its_status_now(status: str):
    (fact,) = normalize(med_statement(rxnorm("4603"), status=status, start="2024-04-01", end="2024-04-03")).facts
    assert fact.counts and (fact.start, fact.end) == (_at("2024-04-01T00:00:00Z"), _at("2024-04-03T00:00:00Z"))


def test_a_completed_order_without_an_end_counts_up_to_its_last_update_and_says_so():
    request = med_request(rxnorm("8591"), status="completed", authored="2024-04-01T08:00:00Z")
    request["meta"] = {"lastUpdated": "2024-04-02T09:30:00Z"}
    (fact,) = normalize(request).facts
    assert fact.counts and fact.start == _at("2024-04-01T08:00:00Z") and fact.end == _at("2024-04-02T09:30:00Z")
    assert any("meta.lastUpdated" in n for n in fact.notes)
    del request["meta"]
    (one_time,) = normalize(request).facts
    assert one_time.counts and one_time.end == one_time.start
    assert any("counted at its start only" in n for n in one_time.notes)


def test_a_completed_order_with_a_validity_period_counts_for_it():
    request = med_request(
        rxnorm("4603"),
        status="stopped",
        authored="2024-03-31",
        dispenseRequest={"validityPeriod": {"start": "2024-04-01", "end": "2024-04-05"}},
    )
    (fact,) = normalize(request).facts
    assert fact.counts and (fact.start, fact.end) == (_at("2024-04-01T00:00:00Z"), _at("2024-04-05T00:00:00Z"))


def test_an_active_order_is_open_ended_from_its_start():
    (fact,) = normalize(med_request(rxnorm("4603"), authored="2024-04-01")).facts
    assert fact.counts and fact.start == _at("2024-04-01T00:00:00Z") and fact.end is None


def test_a_finished_resource_with_no_dates_cannot_be_placed_in_time():
    (fact,) = normalize(med_statement(rxnorm("4603"), status="completed", start=None)).facts
    assert fact.counts is False and any("cannot be placed in time" in n for n in fact.notes)


def test_an_active_statement_with_an_effective_date_time_is_ongoing_from_it():
    statement = med_statement(rxnorm("4603"), start=None, effectiveDateTime="2024-04-01T08:00:00Z")
    (fact,) = normalize(statement).facts
    assert fact.start == _at("2024-04-01T08:00:00Z") and fact.end is None
    statement["status"] = "completed"
    (taken,) = normalize(statement).facts
    assert taken.start == taken.end == _at("2024-04-01T08:00:00Z")


def administration(medication: dict[str, Any], status: str = "completed", **extra: Any) -> dict[str, Any]:
    """A MedicationAdministration (R4)."""
    return {
        "resourceType": "MedicationAdministration",
        "id": extra.pop("id", "ma-1"),
        "status": status,
        "medicationCodeableConcept": medication,
        "subject": {"reference": "Patient/p1"},
        **extra,
    }


def test_an_administration_counts_at_its_time_or_over_its_period():
    (dose,) = normalize(administration(rxnorm("6585"), effectiveDateTime="2024-04-01T08:00:00Z")).facts
    assert (dose.concept, dose.kind, dose.counts) == ("magnesium-product", "medication", True)
    assert dose.start == dose.end == _at("2024-04-01T08:00:00Z")
    infusion = administration(rxnorm("8591"), status="in-progress", effectivePeriod={"start": "2024-04-01T08:00:00Z"})
    (running,) = normalize(infusion).facts
    assert running.counts and running.start == _at("2024-04-01T08:00:00Z") and running.end is None
    given = administration(
        rxnorm("8591"), effectivePeriod={"start": "2024-04-01T08:00:00Z", "end": "2024-04-01T12:00:00Z"}
    )
    (over,) = normalize(given).facts
    assert (over.start, over.end) == (_at("2024-04-01T08:00:00Z"), _at("2024-04-01T12:00:00Z"))


ADMINISTRATION_STATUSES = [
    ("not-done", False, False),
    ("on-hold", False, False),
    ("unknown", False, False),
    ("stopped", True, False),
    ("in-progress", True, False),
    ("entered-in-error", False, True),
]


@pytest.mark.parametrize(("status", "counts", "retracted"), ADMINISTRATION_STATUSES)
def test_administration_statuses(status: str, counts: bool, retracted: bool):
    (fact,) = normalize(administration(rxnorm("4603"), status=status, effectiveDateTime="2024-04-01T08:00:00Z")).facts
    assert (fact.counts, fact.retracted) == (counts, retracted)


def test_administration_with_a_contained_medication_and_an_invalid_status():
    contained = administration(
        None,  # type: ignore[arg-type]
        effectiveDateTime="2024-04-01T08:00:00Z",
        contained=[_chlorthalidone_medication("m1")],
        medicationReference={"reference": "#m1"},
    )
    del contained["medicationCodeableConcept"]
    assert classes_of(contained) == {"thiazide-diuretic"}
    bad = normalize_resources([administration(rxnorm("4603"), status="given", effectiveDateTime="2024-04-01")])
    assert bad[0].outcome == "rejected" and "MedicationAdministration.status" in bad[0].issues[0].path


@pytest.mark.parametrize("end", ["9999-12-31", "9999-12-31T23:59:59-05:00", "9000-01-01T00:00:00Z"])
def test_a_placeholder_end_date_is_open_ended_never_an_overflow(end: str):
    statement = med_statement(rxnorm("4603"), start="2024-04-01", end=end)
    result = normalize(statement)
    (fact,) = result.facts
    assert fact.counts and fact.end is None and any("no planned end" in n for n in fact.notes)
    event = events_from(result, datetime(2024, 5, 1, tzinfo=UTC))
    assert event is not None and event.expires(Settings())  # retention of an open-ended medication: no overflow
    finished = normalize(med_statement(rxnorm("4603"), status="completed", start="2024-04-01", end=end)).facts[0]
    assert finished.end == finished.start  # completed with no real end: its start (no lastUpdated)
    assert events_from(normalize(statement | {"status": "completed"}), datetime(2024, 5, 1, tzinfo=UTC))


def test_a_placeholder_start_date_is_rejected_naming_the_field():
    result = normalize_resources([med_statement(rxnorm("4603"), start="9999-12-31")])[0]
    assert result.outcome == "rejected" and result.issues[0].path == "MedicationStatement.effective[x]"
    assert "placeholder" in result.issues[0].message


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


# --- issue 11: IV fluids and premixes, balanced crystalloids, digoxin -----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Potassium Chl 20 mEq / 1000 mL D5 1/2 NS", {"potassium-supplement"}),
        ("KCl 20 mEq in Sodium Chloride 0.9% 1000 mL", {"potassium-supplement"}),
        ("Dextrose 5% and 0.45% Sodium Chloride with 20 mEq Potassium Chloride", {"potassium-supplement"}),
        ("KCl 20 mEq in Lactated Ringer's 1000 mL", {"potassium-supplement"}),  # an added amount: it counts
        ("Magnesium Sulfate in D5W 1 g/100 mL", {"magnesium-product"}),
        ("Magnesium Sulfate (Bolus)", {"magnesium-product"}),
        ("Lactated Ringers Injection", set()),
        (
            "Sodium Chloride, Sodium Lactate, Potassium Chloride, and Calcium Chloride Injection (Lactated Ringer's)",
            set(),
        ),
        ("Plasma-Lyte A Injection pH 7.4 (Potassium Chloride, Magnesium Chloride)", set()),
        ("Normosol-R", set()),
    ],
)
def test_iv_fluids_with_added_k_or_mg_count_and_balanced_crystalloids_do_not(text: str, expected: set[str]):
    resource = med_statement(text_only(text), status="active", start="2024-04-30")
    assert classes_of(resource) == expected


def test_digoxin_is_recognised_by_ingredient_product_brand_and_text():
    for code in ("3407", "197604", "309888", "1151522"):  # IN, SCD, SBD, dose-form group (PDDI valueset-digoxin)
        assert classes_of(med_statement(rxnorm(code), start="2024-04-30")) == {"digoxin"}, code
    assert classes_of(med_statement(text_only("Lanoxin 125 mcg tablet"), start="2024-04-30")) == {"digoxin"}
    fact = normalize(med_statement(rxnorm("197604", "Digoxin 0.125 MG Oral Tablet"), start="2024-04-30")).facts[0]
    assert fact.display == "Digoxin 0.125 MG Oral Tablet (cardiac glycoside)"


def test_potassium_chloride_by_snomed_substance():
    assert classes_of(med_statement(concept(coding(SNOMED, "8631001")), start="2024-04-30")) == {"potassium-supplement"}
