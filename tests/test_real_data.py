"""Real FHIR data (HL7 R4 examples, Synthea, CDS Hooks spec payloads): no crash, no false alert, and the
oddities listed in tests/data/shared/README.md handled as it describes."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fhir_builders import HYPOK, K_SERUM, LOINC, decide, packaged_catalog, rule, shared_data_dir

from rules.engine import Decision, evaluate, evaluate_rule
from rules.facts import Fact, latest_versions
from rules.normalize import NormalizeResult, normalize_resource, normalize_resources
from workers.sources import read_items

DATA = shared_data_dir()
assert DATA.is_dir(), f"shared data not found at {DATA}"

ALL_FILES = sorted(p for p in DATA.rglob("*") if p.suffix in (".json", ".ndjson")) if DATA.is_dir() else []
SYNTHEA = [p for p in ALL_FILES if p.parent.name == "synthea-r4"]
EXAMPLES = DATA / "fhir-r4-examples"
CDS_HOOKS = DATA / "cds-hooks"


def _rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


@cache
def _process(path: Path) -> tuple[list[NormalizeResult], list[Fact], list[Decision]]:
    """read -> normalise -> latest versions -> evaluate every patient as of its latest fact."""
    results: list[NormalizeResult] = []
    for item in read_items(path):
        if item.error is None:
            results.extend(normalize_resources(item.data))
    facts = latest_versions(f for r in results for f in r.facts)
    by_patient: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_patient[fact.patient].append(fact)
    decisions: list[Decision] = []
    for patient, patient_facts in sorted(by_patient.items()):
        times = [t for f in patient_facts for t in (f.start, f.end) if t is not None]
        if times:
            decisions.extend(evaluate(packaged_catalog().evaluated(), patient_facts, max(times), patient))
    return results, facts, decisions


def test_shared_data_is_present():
    assert len(ALL_FILES) > 100
    assert len(SYNTHEA) >= 5


@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_every_file_reads_normalises_and_evaluates(path: Path):
    results, _, decisions = _process(path)
    for result in results:
        assert result.outcome in ("accepted", "ignored", "rejected")
        if result.outcome == "rejected":
            assert result.issues and result.reason
        if result.outcome != "accepted":
            assert result.facts == []
    for decision in decisions:
        assert decision.outcome in ("fires", "not-fires", "indeterminate")


@pytest.mark.parametrize("path", SYNTHEA, ids=_rel)
def test_synthea_produces_no_alert_and_nothing_indeterminate(path: Path):
    results, facts, decisions = _process(path)
    assert not [r for r in results if r.outcome == "rejected"], "Synthea bundles are valid R4"
    outcomes = {(d.rule_id, d.outcome) for d in decisions}
    assert not [o for o in outcomes if o[1] != "not-fires"], outcomes
    assert all(f.determinate for f in facts)


def test_synthea_potassium_and_diuretics_are_recognised():
    facts = [f for path in SYNTHEA for f in _process(path)[1]]
    concepts = {f.concept for f in facts}
    assert "potassium" in concepts
    assert concepts & {"loop-diuretic", "thiazide-diuretic"}
    potassium = [f for f in facts if f.concept == "potassium"]
    assert all(f.value is not None and f.value >= Decimal("3.5") for f in potassium)


def test_synthea_duplicate_potassium_at_the_same_time():
    """README item 7: Synthea has duplicate K at one effectiveDateTime; the engine uses the lowest."""
    seen = 0
    for path in SYNTHEA:
        facts = [f for f in _process(path)[1] if f.concept == "potassium"]
        by_time: dict[datetime, list[Fact]] = defaultdict(list)
        for fact in facts:
            assert fact.start is not None
            by_time[fact.start].append(fact)
        for when, group in by_time.items():
            if len(group) < 2:
                continue
            seen += 1
            decision = evaluate_rule(rule(HYPOK), group, when, group[0].patient)
            (evidence,) = [e for e in decision.evidence if e.input == "potassium"]
            assert Decimal(evidence.value) == min(f.value for f in group if f.value is not None).quantize(
                Decimal("0.01")
            )
            assert f"{len(group)} results at that time" in decision.explanation
    assert seen > 0


def _synthea_potassium_observation() -> dict[str, Any]:
    for path in SYNTHEA:
        for entry in json.loads(path.read_text(encoding="utf-8"))["entry"]:
            resource = entry["resource"]
            codes = [c.get("code") for c in resource.get("code", {}).get("coding", [])]
            if resource["resourceType"] == "Observation" and "6298-4" in codes:
                return resource
    raise AssertionError("no Synthea potassium Observation")


def test_duplicate_potassium_with_different_values_uses_the_lowest():
    template = _synthea_potassium_observation()
    observations = []
    for rid, value in (("dup-a", 3.6), ("dup-b", 3.4)):
        obs = copy.deepcopy(template) | {"id": rid, "subject": {"reference": "Patient/p1"}}
        obs["valueQuantity"]["value"] = value
        observations.append(obs)
    as_of = datetime.fromisoformat(template["effectiveDateTime"])
    for order in (observations, observations[::-1]):
        decision = decide(HYPOK, *order, as_of=as_of)
        assert decision.outcome == "fires"
        assert "3.4 mmol/L" in decision.card["summary"]


# --- HL7 example oddities ----------------------------------------------------------------------------


def _as_potassium(resource: dict[str, Any]) -> dict[str, Any]:
    """The real resource, recoded as a serum potassium (the examples carry the odd units on other analytes)."""
    recoded = copy.deepcopy(resource)
    recoded["code"] = {"coding": [{"system": LOINC, "code": K_SERUM}]}
    recoded["status"] = "final"
    return recoded


def test_f001_lower_case_mmol_l_unit_is_parsed():
    original = _example("Observation-f001.json")
    assert original["valueQuantity"]["unit"] == "mmol/l"
    assert normalize_resource(original).outcome == "ignored"  # glucose: not read, no crash
    (fact,) = normalize_resource(_as_potassium(original)).facts
    assert fact.determinate
    assert fact.value == Decimal(str(original["valueQuantity"]["value"]))


def test_f203_snomed_unit_system_falls_back_to_the_unit_text():
    original = _example("Observation-f203.json")
    assert original["valueQuantity"]["system"] == "http://snomed.info/sct"
    (fact,) = normalize_resource(_as_potassium(original)).facts
    # The unit text is understood (mmol/L); 28 mmol/L (this example is a bicarbonate) is then no plausible K.
    assert fact.reported_unit == "mmol/L"
    assert fact.value is None
    assert fact.problem.startswith("implausible value 28 mmol/L")
    scaled = _as_potassium(original)
    scaled["valueQuantity"]["value"] = 2.8
    (fact,) = normalize_resource(scaled).facts
    assert fact.determinate
    assert fact.value == Decimal("2.8")


def test_f204_snomed_unit_system_with_umol_is_indeterminate_by_its_text():
    (fact,) = normalize_resource(_as_potassium(_example("Observation-f204.json"))).facts
    assert not fact.determinate
    assert "umol/L" in (fact.problem or "")


def test_observation_decimal_does_not_crash():
    original = _example("Observation-decimal.json")
    result = normalize_resource(original)
    assert result.outcome in ("ignored", "rejected")
    for i, component in enumerate(original["component"]):
        value = component["valueQuantity"]["value"]
        obs = _as_potassium(original) | {
            "id": f"decimal-{i}",
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-05-01T08:00:00Z",
            "valueQuantity": {"value": value, "unit": "mmol/L"},
        }
        obs.pop("component")
        decision = decide(HYPOK, obs)
        assert decision.outcome in ("fires", "not-fires", "indeterminate")


def test_nested_bundles_are_walked():
    data = _example("Bundle-72ac8493-52ac-41bd-8d5d-7258c289b5ea.json")
    inner = [e["resource"] for e in data["entry"] if e.get("resource", {}).get("resourceType") == "Bundle"]
    assert inner, "the outer bundle holds bundles"
    results = normalize_resources(data)
    assert len(results) > 0
    assert len(results) == sum(len(b.get("entry", [])) for b in inner)
    assert any(f.concept == "potassium" for r in results for f in r.facts)


def test_batch_response_with_searchsets_is_walked():
    """A batch-response of a Patient plus four (empty) searchsets: the searchsets are walked, not judged (the
    Patient is patient context)."""
    results = normalize_resources(_example("Bundle-bundle-response-medsallergies.json"))
    assert [(r.resource_type, r.outcome) for r in results] == [("Patient", "accepted")]
    assert [f.concept for f in results[0].facts] == ["patient"]


def test_search_warning_operation_outcome_is_ignored():
    results = normalize_resources(_example("Bundle-bundle-search-warning.json"))
    outcomes = [r for r in results if r.resource_type == "OperationOutcome"]
    assert outcomes and all(r.outcome == "ignored" for r in outcomes)


def test_medrx0311_contained_chlorthalidone_is_a_thiazide():
    (result,) = normalize_resources(_example("MedicationRequest-medrx0311.json"))
    assert result.outcome == "accepted"
    assert [f.concept for f in result.facts] == ["thiazide-diuretic"]
    assert result.facts[0].counts


def test_medication_statement_example005_entered_in_error_is_retracted():
    original = _example("MedicationStatement-example005.json")
    assert original["status"] == "entered-in-error"
    assert not [f for f in normalize_resource(original).facts if f.counts]  # amoxicillin: no facts at all
    as_diuretic = copy.deepcopy(original)
    as_diuretic["medicationCodeableConcept"] = {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "4603"}]
    }
    (fact,) = normalize_resource(as_diuretic).facts
    assert fact.retracted and not fact.counts


def test_medication_statement_example003_little_pink_pill_classifies_as_nothing():
    result = normalize_resource(_example("MedicationStatement-example003.json"))
    assert result.outcome == "ignored"
    assert result.facts == []


def test_medrx0323_tpn_electrolytes_yield_potassium_and_magnesium_products():
    facts = [f for r in normalize_resources(_example("MedicationRequest-medrx0323.json")) for f in r.facts]
    assert {f.concept for f in facts} == {"potassium-supplement", "magnesium-product"}


def test_hl7_medication_administrations_count_over_their_effective_period():
    """MedicationAdministration (R4 examples): a contained Medication is followed and the dose counts for the
    period it was given (K and Mg replacement in a TPN bag count as K given and Mg therapy)."""
    tpn = normalize_resource(_example("MedicationAdministration-medadmin0309.json"))
    assert tpn.outcome == "accepted"
    assert {f.concept for f in tpn.facts} == {"potassium-supplement", "magnesium-product"}
    assert all(f.kind == "medication" and f.counts for f in tpn.facts)
    assert {(f.start, f.end) for f in tpn.facts} == {
        (datetime(2015, 1, 15, 21, 3, tzinfo=UTC), datetime(2015, 1, 16, 1, 3, tzinfo=UTC))
    }
    kcl = normalize_resource(_example("MedicationAdministration-medadmin0302.json"))
    assert {f.concept for f in kcl.facts} == {"potassium-supplement"}


def test_hl7_entered_in_error_and_cancelled_observations_never_count():
    for name in ("Observation-f202.json", "Observation-unsat.json", "Observation-blood-pressure-cancel.json"):
        result = normalize_resource(_example(name))
        assert result.outcome in ("ignored", "rejected")
        assert not [f for f in result.facts if f.counts]


# --- CDS Hooks payloads ------------------------------------------------------------------------------


def _cds_results(name: str) -> list[NormalizeResult]:
    return [r for item in read_items(CDS_HOOKS / name) if item.error is None for r in normalize_resources(item.data)]


def test_dstu2_medication_order_in_draft_orders_is_ignored():
    results = _cds_results("cds-hooks_docs__docs_hooks_order-select__02__context.json")
    orders = [r for r in results if r.resource_type == "MedicationOrder"]
    assert orders and all(r.outcome == "ignored" for r in orders)


def test_dstu2_medication_order_in_a_response_resource_wrapper_is_ignored():
    """docs examples order-sign prefetch: ``{"response": ..., "resource": {MedicationOrder}}``."""
    results = _cds_results("cds-hooks_docs__docs_examples__00__request-order-sign.json")
    assert [(r.resource_type, r.outcome) for r in results] == [("MedicationOrder", "ignored")]


def test_spec_placeholder_resources_are_rejected_with_a_field_issue():
    placeholder = [
        r for r in _cds_results("HL7_cds-hooks__input_pagecontent_index__10__prefetch.json") if r.outcome == "rejected"
    ]
    assert placeholder
    assert any("..." in issue.path for r in placeholder for issue in r.issues)
