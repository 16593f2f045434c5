"""Shared builders for the rule-engine tests (imported by the test modules; fixtures live in conftest.py).

Tests build small, realistic FHIR R4 JSON resources with the helpers below, run them through the real
normaliser (``rules.normalize``) and the real engine (``rules.engine``). Times are explicit: ``NOW`` is the
evaluation instant and ``ago(hours)`` gives a FHIR dateTime that many hours before it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from rules.catalog import Catalog, load_catalog
from rules.engine import Decision, evaluate, evaluate_rule
from rules.facts import Fact, latest_versions
from rules.normalize import NormalizeOptions, NormalizeResult, normalize_resource, normalize_resources

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PATIENT = "p1"

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
MIMIC_ICD10 = "http://fhir.mimic.mit.edu/CodeSystem/diagnosis-icd10"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"

K_SERUM = "2823-3"  # Potassium [Moles/volume] in Serum or Plasma
K_BLOOD = "6298-4"  # Synthea's potassium code
MG_MOLES = "2601-3"  # Magnesium [Moles/volume] in Serum or Plasma
MG_MASS = "19123-9"  # Magnesium [Mass/volume] in Serum or Plasma
QTC = "8636-3"
ECG_IMPRESSION = "8601-7"
AF_SNOMED = "49436004"

HYPOK = "hypokalemia-without-magnesium"
REFRACTORY = "refractory-hypokalemia-on-diuretic"
ARRHYTHMIA = "arrhythmia-with-low-magnesium"

_ids = itertools.count(1)


def ago(hours: float, *, now: datetime = NOW) -> str:
    """FHIR dateTime ``hours`` before ``now`` (negative: after)."""
    return (now - timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


def next_id(prefix: str) -> str:
    """A fresh resource id (FHIR id syntax)."""
    return f"{prefix}-{next(_ids)}"


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    """A FHIR Coding."""
    return {"system": system, "code": code, **({"display": display} if display else {})}


def concept(*codings: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    """A FHIR CodeableConcept."""
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = list(codings)
    if text:
        out["text"] = text
    return out


def subject(patient: str = PATIENT) -> dict[str, str]:
    """A Patient reference."""
    return {"reference": f"Patient/{patient}"}


# --- Observations ------------------------------------------------------------------------------------


def quantity(
    value: float | str | None,
    unit: str | None = "mmol/L",
    *,
    ucum: bool = True,
    comparator: str | None = None,
    code: str | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    """A valueQuantity. ``ucum=False`` leaves only the ``unit`` text (no system / code)."""
    out: dict[str, Any] = {}
    if value is not None:
        out["value"] = value
    if comparator:
        out["comparator"] = comparator
    if unit is not None:
        out["unit"] = unit
    if ucum and (unit is not None or code is not None):
        out["system"] = system or UCUM
        out["code"] = code or unit
    elif system or code:
        out |= {k: v for k, v in (("system", system), ("code", code)) if v}
    return out


def observation(
    loinc: str,
    value: float | str | None = None,
    unit: str | None = "mmol/L",
    *,
    at: str | None = None,
    status: str = "final",
    patient: str = PATIENT,
    id: str | None = None,
    version: str | None = None,
    comparator: str | None = None,
    ucum: bool = True,
    valuequantity: dict[str, Any] | None = None,
    extra_codings: Iterable[dict[str, Any]] = (),
    **extra: Any,
) -> dict[str, Any]:
    """An Observation with a LOINC code and (optionally) a valueQuantity."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": id or next_id("obs"),
        "status": status,
        "code": concept(coding(LOINC, loinc), *extra_codings),
        "subject": subject(patient),
        "effectiveDateTime": at or ago(4),
    }
    if version is not None:
        resource["meta"] = {"versionId": version}
    if valuequantity is not None:
        resource["valueQuantity"] = valuequantity
    elif value is not None:
        resource["valueQuantity"] = quantity(value, unit, ucum=ucum, comparator=comparator)
    resource.update(extra)
    return resource


def potassium(value: float | str | None, unit: str | None = "mmol/L", **kw: Any) -> dict[str, Any]:
    """A serum potassium result (LOINC 2823-3 unless ``loinc=``)."""
    return observation(kw.pop("loinc", K_SERUM), value, unit, **kw)


def magnesium(value: float | str | None, unit: str | None = "mmol/L", **kw: Any) -> dict[str, Any]:
    """A total serum magnesium result; LOINC follows the unit (mass units -> 19123-9) unless ``loinc=``."""
    default = MG_MASS if unit is not None and unit.lower() == "mg/dl" else MG_MOLES
    return observation(kw.pop("loinc", default), value, unit, **kw)


def qtc(value: float | str | None, unit: str | None = "ms", **kw: Any) -> dict[str, Any]:
    """A QTc interval result."""
    return observation(kw.pop("loinc", QTC), value, unit, **kw)


def ecg(rhythm: str = AF_SNOMED, *, at: str | None = None, **kw: Any) -> dict[str, Any]:
    """An ECG impression Observation whose coded value is a rhythm finding (SNOMED)."""
    return observation(ECG_IMPRESSION, None, None, at=at, valueCodeableConcept=concept(coding(SNOMED, rhythm)), **kw)


def ecg_panel(qtc_value: float, qtc_unit: str = "ms", *, at: str | None = None, **kw: Any) -> dict[str, Any]:
    """A 12-lead ECG panel (LOINC 11524-6) carrying QTc as a component."""
    return observation(
        "11524-6",
        None,
        None,
        at=at,
        component=[
            {"code": concept(coding(LOINC, "8867-4", "Heart rate")), "valueQuantity": quantity(72, "/min")},
            {"code": concept(coding(LOINC, QTC, "QTc")), "valueQuantity": quantity(qtc_value, qtc_unit)},
        ],
        **kw,
    )


def egfr(value: float | str | None, unit: str | None = "mL/min/{1.73_m2}", **kw: Any) -> dict[str, Any]:
    """An eGFR result (LOINC 98979-8, CKD-EPI 2021, unless ``loinc=``)."""
    return observation(kw.pop("loinc", "98979-8"), value, unit, **kw)


def creatinine(value: float | str | None, unit: str | None = "mg/dL", **kw: Any) -> dict[str, Any]:
    """A serum creatinine result (LOINC 2160-0 unless ``loinc=``)."""
    return observation(kw.pop("loinc", "2160-0"), value, unit, **kw)


# --- patient context ---------------------------------------------------------------------------------

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


def patient_resource(
    id: str = PATIENT,
    birth: str | None = "1950-03-01",
    *,
    gender: str = "female",
    family: str = "Doe",
    given: str = "Jane",
    mrn: str | None = "MRN-0001",
    **extra: Any,
) -> dict[str, Any]:
    """A Patient with an official name, a typed MRN (v2-0203 MR) and a birth date."""
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": id,
        "gender": gender,
        "name": [{"use": "official", "family": family, "given": [given]}],
    }
    if birth:
        resource["birthDate"] = birth
    if mrn:
        mr = concept(coding("http://terminology.hl7.org/CodeSystem/v2-0203", "MR"))
        resource["identifier"] = [{"type": mr, "system": "urn:oid:1.2.36.146.595.217.0.1", "value": mrn}]
    resource.update(extra)
    return resource


def encounter(
    cls: str = "IMP",
    *,
    start: str | None = None,
    end: str | None = None,
    status: str | None = None,
    patient: str = PATIENT,
    id: str | None = None,
    ward: str | None = None,
    bed: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An Encounter of HL7 v3 ActCode class ``cls`` (in progress unless it has an end)."""
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": id or next_id("enc"),
        "status": status or ("finished" if end else "in-progress"),
        "class": coding(ACT_CODE, cls),
        "subject": subject(patient),
        "period": {k: v for k, v in (("start", start or ago(48)), ("end", end)) if v},
    }
    locations = [(ward, "wa"), (bed, "bd")]
    if ward or bed:
        resource["location"] = [
            {"location": {"display": name}, "physicalType": concept(coding(
                "http://terminology.hl7.org/CodeSystem/location-physical-type", kind))}
            for name, kind in locations if name
        ]  # fmt: skip
    resource.update(extra)
    return resource


def dialysis(at: str | None = None, *, code: str = "302497006", patient: str = PATIENT, **extra: Any) -> dict[str, Any]:
    """A completed dialysis Procedure (default: SNOMED 302497006 hemodialysis)."""
    return {
        "resourceType": "Procedure",
        "id": extra.pop("id", None) or next_id("proc"),
        "status": extra.pop("status", "completed"),
        "code": concept(coding(SNOMED, code)),
        "subject": subject(patient),
        "performedDateTime": at or ago(24),
        **extra,
    }


# --- Conditions --------------------------------------------------------------------------------------


def condition(
    code: str = AF_SNOMED,
    system: str = SNOMED,
    *,
    clinical: str | None = "active",
    onset: str | None = "2023-01-01",
    patient: str = PATIENT,
    id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Condition (default: active atrial fibrillation)."""
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": id or next_id("cond"),
        "code": concept(coding(system, code)),
        "subject": subject(patient),
    }
    if clinical:
        resource["clinicalStatus"] = concept(coding(CONDITION_CLINICAL, clinical))
    if onset:
        resource["onsetDateTime"] = onset
    resource.update(extra)
    return resource


# --- Medications -------------------------------------------------------------------------------------


def rxnorm(code: str, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    """A medication CodeableConcept coded in RxNorm."""
    return concept(coding(RXNORM, code, display), text=text)


def med_statement(
    medication: dict[str, Any] | None = None,
    *,
    status: str = "active",
    start: str | None = "2024-04-01",
    end: str | None = None,
    patient: str = PATIENT,
    id: str | None = None,
    version: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A MedicationStatement; ``medication`` is a CodeableConcept (omit it to pass medicationReference)."""
    resource: dict[str, Any] = {
        "resourceType": "MedicationStatement",
        "id": id or next_id("ms"),
        "status": status,
        "subject": subject(patient),
    }
    if medication is not None:
        resource["medicationCodeableConcept"] = medication
    if start or end:
        resource["effectivePeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
    if version is not None:
        resource["meta"] = {"versionId": version}
    resource.update(extra)
    return resource


def med_request(
    medication: dict[str, Any] | None = None,
    *,
    status: str = "active",
    intent: str = "order",
    authored: str | None = "2024-04-01",
    patient: str = PATIENT,
    id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A MedicationRequest (Synthea style: authoredOn, no end date)."""
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": id or next_id("mr"),
        "status": status,
        "intent": intent,
        "subject": subject(patient),
    }
    if medication is not None:
        resource["medicationCodeableConcept"] = medication
    if authored:
        resource["authoredOn"] = authored
    resource.update(extra)
    return resource


FUROSEMIDE = rxnorm("4603", "furosemide")


def bundle(*resources: dict[str, Any], full_urls: Iterable[str] | None = None) -> dict[str, Any]:
    """A collection Bundle of the resources (fullUrl ``Type/id`` unless given)."""
    urls = list(full_urls) if full_urls is not None else [f"{r['resourceType']}/{r['id']}" for r in resources]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": u, "resource": r} for u, r in zip(urls, resources, strict=True)],
    }


# --- normalisation and evaluation ---------------------------------------------------------------------


def normalize(resource: dict[str, Any], options: NormalizeOptions | None = None) -> NormalizeResult:
    """Normalise one resource; fail the test if it is rejected."""
    result = normalize_resource(resource, options)
    assert result.outcome != "rejected", (result.reason, result.issues)
    return result


def facts_of(*resources: dict[str, Any], options: NormalizeOptions | None = None) -> list[Fact]:
    """Facts of the resources, read as one bundle (so references resolve), latest versions only."""
    results = normalize_resources(list(resources), options)
    rejected = [(r.resource_type, r.resource_id, r.reason) for r in results if r.outcome == "rejected"]
    assert not rejected, rejected
    return latest_versions(f for r in results for f in r.facts)


def only_fact(resource: dict[str, Any], concept_name: str | None = None, **kw: Any) -> Fact:
    """The single fact (of ``concept_name``, if given) a resource yields."""
    facts = [f for f in normalize(resource, **kw).facts if concept_name is None or f.concept == concept_name]
    assert len(facts) == 1, facts
    return facts[0]


@cache
def packaged_catalog() -> Catalog:
    """The packaged, self-tested rule catalog (loaded once per process)."""
    return load_catalog()


def rule(rule_id: str):
    """A catalog rule by id."""
    found = packaged_catalog().get(rule_id)
    assert found is not None, rule_id
    return found


def decide(
    rule_id: str,
    *resources: dict[str, Any],
    as_of: datetime = NOW,
    options: NormalizeOptions | None = None,
    patient: str = PATIENT,
) -> Decision:
    """Normalise the resources and evaluate one rule for ``patient`` as of ``as_of``."""
    return evaluate_rule(rule(rule_id), facts_of(*resources, options=options), as_of, patient)


def decide_all(*resources: dict[str, Any], as_of: datetime = NOW) -> list[Decision]:
    """Every evaluated catalog rule for every patient in the resources."""
    return evaluate(packaged_catalog().evaluated(), facts_of(*resources), as_of)


def walk(value: Any, path: str = "card") -> Iterator[tuple[str, Any]]:
    """Every (path, leaf-or-container) in a JSON-like structure, depth first."""
    yield path, value
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from walk(inner, f"{path}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from walk(inner, f"{path}[{i}]")


# --- shared real data --------------------------------------------------------------------------------


def shared_data_dir() -> Path:
    """The public FHIR data vendored in ``tests/data/shared`` (a copy of the team's shared data folder; see
    its README for origins and licences), or ``$EHR_ALERTS_SHARED_DATA``."""
    override = os.environ.get("EHR_ALERTS_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parent / "data" / "shared"
