"""Generate the committed example event stream ``examples/stream/events.ndjson``.

The shared public data (Synthea, HL7 examples) has no hypokalemia below 3.5 mmol/L and no magnesium
results, so nothing in it makes the rules fire. This script writes a small, synthetic but realistic
FHIR R4 feed for eleven patients (plus one irrelevant patient) that exercises every rule of the
catalog: firing, severities, resolution, retraction (entered-in-error), correction, unit handling
(mg/dL, mmol/L, mEq/L, seconds vs milliseconds, lower-case ``mmol/l``) and the indeterminate outcome
for an unknown unit. ``examples/README.md`` describes each patient and the expected alerts.

Output: one FHIR R4 resource per line, in the order a lab/medication feed would deliver them
(``meta.lastUpdated``). Every resource has ``id``, ``meta.versionId`` and ``meta.lastUpdated``; every
clinical resource has ``subject.reference = "Patient/<id>"``. All people are fictional
("Example Alpha" ...). The output is deterministic: no clock, no randomness.

Generation uses the standard library only; each resource is validated with the ``fhir.resources``
R4B models (a dependency of the project) before anything is written.

Usage (from the repository root)::

    .venv/bin/python examples/make_examples.py          # (re)write examples/stream/events.ndjson
    .venv/bin/python examples/make_examples.py --check  # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

Resource = dict[str, Any]

OUTPUT = Path(__file__).resolve().parent / "stream" / "events.ndjson"

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
MED_STATEMENT_CATEGORY = "http://terminology.hl7.org/CodeSystem/medication-statement-category"
MED_REQUEST_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
EXAMPLE_MRN = "https://ehr-alerts.dev/fhir/example-mrn"

# LOINC codes and displays as in rules/valuesets/labs.yaml (heart rate 8867-4 is deliberately not there).
K_SERUM = ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "Potassium")
K_BLOOD = ("6298-4", "Potassium [Moles/volume] in Blood", "Potassium, whole blood (blood gas)")
MG_MASS = ("19123-9", "Magnesium [Mass/volume] in Serum or Plasma", "Magnesium")
MG_MOLES = ("2601-3", "Magnesium [Moles/volume] in Serum or Plasma", "Magnesium")
EKG_STUDY = ("11524-6", "EKG study", "12-lead ECG")
QTC = ("8636-3", "Q-T interval corrected", "QTc")
HEART_RATE = ("8867-4", "Heart rate", "Heart rate")

# Reference ranges per reported unit: (low, high, UCUM code or None, unit text).
K_RANGE = (3.5, 5.1, "mmol/L", "mmol/L")
K_RANGE_LOWER = (3.5, 5.1, None, "mmol/l")
MG_RANGE_MGDL = (1.7, 2.4, "mg/dL", "mg/dL")
MG_RANGE_MMOL = (0.70, 1.00, "mmol/L", "mmol/L")
MG_RANGE_MEQ = (1.4, 2.0, "meq/L", "mEq/L")
MG_RANGE_PERCENT = (1.7, 2.4, None, "mg%")


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """An instant in March 2024, UTC."""
    return datetime(2024, 3, day, hour, minute, tzinfo=UTC)


def iso(instant: datetime) -> str:
    """FHIR instant/dateTime text with a Z offset."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def meta(version: int, updated: datetime) -> dict[str, str]:
    """``meta`` with versionId and lastUpdated."""
    return {"versionId": str(version), "lastUpdated": iso(updated)}


def subject(patient_id: str) -> dict[str, str]:
    """Reference to the patient."""
    return {"reference": f"Patient/{patient_id}"}


def concept(system: str, code: str, display: str, text: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with one coding."""
    result: dict[str, Any] = {"coding": [{"system": system, "code": code, "display": display}]}
    if text:
        result["text"] = text
    return result


def quantity(value: float, ucum: str | None, unit: str) -> dict[str, Any]:
    """A Quantity; without a UCUM code it carries only the ``unit`` text, as some lab feeds do."""
    result: dict[str, Any] = {"value": value, "unit": unit}
    if ucum is not None:
        result["system"] = UCUM
        result["code"] = ucum
    return result


def patient(pid: str, given: str, gender: str, birth_date: str, updated: datetime) -> Resource:
    """A Patient with an obviously synthetic name."""
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": meta(1, updated),
        "identifier": [{"system": EXAMPLE_MRN, "value": f"EX-{given.upper()}"}],
        "active": True,
        "name": [{"use": "official", "text": f"Example {given}", "family": "Example", "given": [given]}],
        "gender": gender,
        "birthDate": birth_date,
    }


def encounter(pid: str, index: int, updated: datetime) -> Resource:
    """The stay the patient is in: every other patient (feed order) on Ward 5B as an inpatient, the others in
    the emergency department; admitted when the Patient record was written, still in progress."""
    inpatient = index % 2 == 0
    kind, ward = (("IMP", "inpatient encounter"), "Ward 5B") if inpatient else (("EMER", "emergency"), "ED")
    location_type = "http://terminology.hl7.org/CodeSystem/location-physical-type"
    return {
        "resourceType": "Encounter",
        "id": f"enc-{pid.removeprefix('ex-')}",
        "meta": meta(1, updated + timedelta(minutes=1)),
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": kind[0], "display": kind[1]},
        "subject": subject(pid),
        "period": {"start": iso(updated)},
        "location": [
            {"location": {"display": ward}, "physicalType": concept(location_type, "wa", "Ward", "Ward")},
            {"location": {"display": f"{index + 1:02d}"}, "physicalType": concept(location_type, "bd", "Bed", "Bed")},
        ],
    }


def lab(
    rid: str,
    pid: str,
    code: tuple[str, str, str],
    value: float,
    ref: tuple[float, float, str | None, str],
    collected: datetime,
    issued: datetime,
    *,
    status: str = "final",
    version: int = 1,
    updated: datetime | None = None,
    note: str | None = None,
) -> Resource:
    """A laboratory Observation with valueQuantity, referenceRange and an L/N interpretation flag."""
    low, high, ucum, unit = ref
    flag = ("L", "Low") if value < low else ("H", "High") if value > high else ("N", "Normal")
    resource: Resource = {
        "resourceType": "Observation",
        "id": rid,
        "meta": meta(version, updated or issued),
        "status": status,
        "category": [concept(OBS_CATEGORY, "laboratory", "Laboratory")],
        "code": concept(LOINC, code[0], code[1], code[2]),
        "subject": subject(pid),
        "effectiveDateTime": iso(collected),
        "issued": iso(issued),
        "valueQuantity": quantity(value, ucum, unit),
        "interpretation": [concept(INTERPRETATION, flag[0], flag[1])],
        "referenceRange": [{"low": quantity(low, ucum, unit), "high": quantity(high, ucum, unit)}],
    }
    if note:
        resource["note"] = [{"text": note}]
    return resource


def ecg(
    rid: str, pid: str, qtc_value: float, qtc_unit: str, rate: int, recorded: datetime, issued: datetime
) -> Resource:
    """A 12-lead ECG Observation whose components carry heart rate and QTc (ms or s)."""
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": meta(1, issued),
        "status": "final",
        "category": [concept(OBS_CATEGORY, "procedure", "Procedure")],
        "code": concept(LOINC, EKG_STUDY[0], EKG_STUDY[1], EKG_STUDY[2]),
        "subject": subject(pid),
        "effectiveDateTime": iso(recorded),
        "issued": iso(issued),
        "component": [
            {
                "code": concept(LOINC, HEART_RATE[0], HEART_RATE[1], HEART_RATE[2]),
                "valueQuantity": quantity(rate, "/min", "/min"),
            },
            {
                "code": concept(LOINC, QTC[0], QTC[1], QTC[2]),
                "valueQuantity": quantity(qtc_value, qtc_unit, qtc_unit),
            },
        ],
    }


def heart_rate(rid: str, pid: str, rate: int, measured: datetime) -> Resource:
    """A vital-signs heart-rate Observation: not something the rules read."""
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": meta(1, measured + timedelta(minutes=2)),
        "status": "final",
        "category": [concept(OBS_CATEGORY, "vital-signs", "Vital Signs")],
        "code": concept(LOINC, HEART_RATE[0], HEART_RATE[1], HEART_RATE[2]),
        "subject": subject(pid),
        "effectiveDateTime": iso(measured),
        "valueQuantity": quantity(rate, "/min", "beats/minute"),
    }


def med_statement(
    rid: str, pid: str, rxnorm: str, display: str, text: str, dosage: str, start: str, asserted: datetime
) -> Resource:
    """An active MedicationStatement (home medication list), open-ended from ``start``."""
    return {
        "resourceType": "MedicationStatement",
        "id": rid,
        "meta": meta(1, asserted),
        "status": "active",
        "category": concept(MED_STATEMENT_CATEGORY, "community", "Community"),
        "medicationCodeableConcept": concept(RXNORM, rxnorm, display, text),
        "subject": subject(pid),
        "effectivePeriod": {"start": start},
        "dateAsserted": iso(asserted),
        "dosage": [{"text": dosage}],
    }


def med_request(rid: str, pid: str, rxnorm: str, display: str, text: str, dosage: str, authored: datetime) -> Resource:
    """An active inpatient MedicationRequest (intent order)."""
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "meta": meta(1, authored),
        "status": "active",
        "intent": "order",
        "category": [concept(MED_REQUEST_CATEGORY, "inpatient", "Inpatient")],
        "medicationCodeableConcept": concept(RXNORM, rxnorm, display, text),
        "subject": subject(pid),
        "authoredOn": iso(authored),
        "dosageInstruction": [{"text": dosage}],
        "dispenseRequest": {"validityPeriod": {"start": iso(authored)}},
    }


def condition(rid: str, pid: str, code: dict[str, Any], onset: str, recorded: datetime) -> Resource:
    """An active, confirmed problem-list Condition."""
    return {
        "resourceType": "Condition",
        "id": rid,
        "meta": meta(1, recorded),
        "clinicalStatus": concept(CONDITION_CLINICAL, "active", "Active"),
        "verificationStatus": concept(CONDITION_VERIFICATION, "confirmed", "Confirmed"),
        "category": [concept(CONDITION_CATEGORY, "problem-list-item", "Problem List Item")],
        "code": code,
        "subject": subject(pid),
        "onsetDateTime": onset,
        "recordedDate": iso(recorded),
    }


def version2(resource: Resource, updated: datetime, **changes: Any) -> Resource:
    """The same resource re-sent as version 2 with ``changes`` applied."""
    copy: Resource = json.loads(json.dumps(resource))
    copy["meta"] = meta(2, updated)
    copy.update(changes)
    return copy


# --- scenarios ---------------------------------------------------------------------------------------

FUROSEMIDE_SCD = ("313988", "Furosemide 40 MG Oral Tablet")
FUROSEMIDE_IN = ("4603", "furosemide")
HCTZ_SCD = ("310798", "hydrochlorothiazide 25 MG Oral Tablet")
KCL_IN = ("8591", "potassium chloride")
AF_SNOMED = concept(SNOMED, "49436004", "Atrial fibrillation", "Atrial fibrillation")
AF_ICD10 = concept(ICD10CM, "I48.91", "Unspecified atrial fibrillation", "Atrial fibrillation, unspecified")


def alpha() -> list[Resource]:
    """(1) K 3.1 mmol/L, no magnesium anywhere: hypokalemia-without-magnesium, info."""
    pid = "ex-alpha"
    return [
        patient(pid, "Alpha", "female", "1958-04-17", at(10, 22, 0)),
        lab("k-alpha-1", pid, K_SERUM, 3.1, K_RANGE, at(11, 6, 5), at(11, 6, 58)),
    ]


def bravo() -> list[Resource]:
    """(2) Blood-gas K 2.8 with unit text ``mmol/l`` only (no UCUM code): warning."""
    pid = "ex-bravo"
    return [
        patient(pid, "Bravo", "male", "1971-11-02", at(11, 7, 40)),
        lab("k-bravo-1", pid, K_BLOOD, 2.8, K_RANGE_LOWER, at(11, 8, 20), at(11, 8, 31)),
    ]


def charlie() -> list[Resource]:
    """(3) K 3.3 opens the alert; Mg 0.78 mmol/L drawn 6 h later resolves it."""
    pid = "ex-charlie"
    return [
        patient(pid, "Charlie", "female", "1949-01-28", at(10, 23, 15)),
        lab("k-charlie-1", pid, K_SERUM, 3.3, K_RANGE, at(11, 5, 50), at(11, 6, 40)),
        lab("mg-charlie-1", pid, MG_MOLES, 0.78, MG_RANGE_MMOL, at(11, 11, 55), at(11, 12, 40)),
    ]


def delta() -> list[Resource]:
    """(4) Furosemide (home statement 4603 + inpatient order 313988), K 3.2 then 3.1 30 h apart, KCl
    ordered in between: refractory-hypokalemia-on-diuretic warning and hypokalemia-without-magnesium info."""
    pid = "ex-delta"
    return [
        patient(pid, "Delta", "male", "1944-07-09", at(10, 14, 0)),
        med_statement(
            "ms-delta-furosemide",
            pid,
            *FUROSEMIDE_IN,
            "Furosemide (home medication)",
            "40 mg by mouth once daily",
            "2023-11-02",
            at(10, 14, 20),
        ),
        med_request(
            "mr-delta-furosemide",
            pid,
            *FUROSEMIDE_SCD,
            "Furosemide 40 mg tablet",
            "40 mg by mouth twice daily",
            at(10, 15, 30),
        ),
        lab("k-delta-1", pid, K_SERUM, 3.2, K_RANGE, at(11, 4, 30), at(11, 5, 20)),
        med_request(
            "mr-delta-kcl",
            pid,
            *KCL_IN,
            "Potassium chloride 20 mEq extended-release tablet",
            "20 mEq by mouth twice daily",
            at(11, 6, 10),
        ),
        lab("k-delta-2", pid, K_SERUM, 3.1, K_RANGE, at(12, 10, 30), at(12, 11, 15)),
    ]


def echo() -> list[Resource]:
    """(5) HCTZ statement, K 3.3 then 3.2 only 10 h apart: not refractory (one episode); still no Mg,
    so hypokalemia-without-magnesium info."""
    pid = "ex-echo"
    return [
        patient(pid, "Echo", "female", "1963-02-21", at(12, 6, 30)),
        med_statement(
            "ms-echo-hctz",
            pid,
            *HCTZ_SCD,
            "Hydrochlorothiazide 25 mg tablet",
            "25 mg by mouth every morning",
            "2022-06-01",
            at(12, 6, 45),
        ),
        lab("k-echo-1", pid, K_SERUM, 3.3, K_RANGE, at(12, 7, 10), at(12, 8, 0)),
        lab("k-echo-2", pid, K_SERUM, 3.2, K_RANGE, at(12, 17, 10), at(12, 17, 55)),
    ]


def foxtrot() -> list[Resource]:
    """(6) Active AF (SNOMED) and Mg 1.4 mg/dL: arrhythmia-with-low-magnesium critical. The ECG's QTc is
    468 ms (milliseconds), not above 500, so the AF Condition is the arrhythmia evidence."""
    pid = "ex-foxtrot"
    return [
        patient(pid, "Foxtrot", "male", "1952-09-30", at(12, 12, 40)),
        condition("cond-foxtrot-af", pid, AF_SNOMED, "2021-09-14", at(12, 13, 0)),
        ecg("ecg-foxtrot-1", pid, 468, "ms", 112, at(12, 13, 30), at(12, 13, 52)),
        lab("mg-foxtrot-1", pid, MG_MASS, 1.4, MG_RANGE_MGDL, at(12, 13, 45), at(12, 14, 30)),
    ]


def golf() -> list[Resource]:
    """(7) ECG QTc 0.52 s (seconds) and Mg 1.2 mEq/L (= 0.6 mmol/L), normal K: critical."""
    pid = "ex-golf"
    return [
        patient(pid, "Golf", "female", "1967-05-12", at(13, 1, 50)),
        ecg("ecg-golf-1", pid, 0.52, "s", 64, at(13, 2, 15), at(13, 2, 40)),
        lab("mg-golf-1", pid, MG_MOLES, 1.2, MG_RANGE_MEQ, at(13, 2, 30), at(13, 3, 20)),
        lab("k-golf-1", pid, K_SERUM, 3.9, K_RANGE, at(13, 2, 30), at(13, 3, 20)),
    ]


def hotel() -> list[Resource]:
    """(8) K 3.2 final, re-sent as version 2 entered-in-error (wrong patient): the alert is retracted."""
    pid = "ex-hotel"
    first = lab("k-hotel-1", pid, K_SERUM, 3.2, K_RANGE, at(13, 6, 0), at(13, 6, 45))
    retracted = version2(
        first,
        at(13, 9, 20),
        status="entered-in-error",
        note=[{"text": "Result entered in error: specimen belonged to another patient."}],
    )
    return [patient(pid, "Hotel", "male", "1980-12-03", at(13, 5, 30)), first, retracted]


def india() -> list[Resource]:
    """(9) K 3.0 final, then version 2 ``corrected`` to 3.8: the alert resolves."""
    pid = "ex-india"
    first = lab("k-india-1", pid, K_SERUM, 3.0, K_RANGE, at(13, 7, 0), at(13, 7, 50))
    corrected = lab(
        "k-india-1",
        pid,
        K_SERUM,
        3.8,
        K_RANGE,
        at(13, 7, 0),
        at(13, 10, 5),
        status="corrected",
        version=2,
        note="Corrected result: 3.0 mmol/L was reported in error (transcription); corrected value 3.8 mmol/L.",
    )
    return [patient(pid, "India", "female", "1975-08-25", at(13, 6, 20)), first, corrected]


def juliet() -> list[Resource]:
    """(10) Normal K 4.1 and Mg 2.0 mg/dL, plus a heart-rate vital sign: no alert."""
    pid = "ex-juliet"
    return [
        patient(pid, "Juliet", "female", "1990-03-19", at(13, 7, 30)),
        heart_rate("hr-juliet-1", pid, 78, at(13, 8, 5)),
        lab("k-juliet-1", pid, K_SERUM, 4.1, K_RANGE, at(13, 8, 0), at(13, 8, 50)),
        lab("mg-juliet-1", pid, MG_MASS, 2.0, MG_RANGE_MGDL, at(13, 8, 0), at(13, 8, 50)),
    ]


def kilo() -> list[Resource]:
    """(11) AF (ICD-10-CM I48.91) and Mg 1.5 reported in ``mg%`` (unit text, no UCUM code): the unit is not
    in the table, so arrhythmia-with-low-magnesium is indeterminate, never silently normal."""
    pid = "ex-kilo"
    return [
        patient(pid, "Kilo", "male", "1956-10-06", at(13, 10, 15)),
        condition("cond-kilo-af", pid, AF_ICD10, "2019-02-11", at(13, 10, 30)),
        lab("mg-kilo-1", pid, MG_MASS, 1.5, MG_RANGE_PERCENT, at(13, 11, 0), at(13, 11, 40)),
    ]


def lima() -> list[Resource]:
    """Irrelevant: a patient with only a heart-rate vital sign. Must be ignored."""
    pid = "ex-lima"
    return [
        patient(pid, "Lima", "other", "1985-06-01", at(11, 9, 0)),
        heart_rate("hr-lima-1", pid, 88, at(11, 9, 30)),
    ]


SCENARIOS: list[Callable[[], list[Resource]]] = [
    alpha,
    bravo,
    charlie,
    delta,
    echo,
    foxtrot,
    golf,
    hotel,
    india,
    juliet,
    kilo,
    lima,
]


# --- checks and output ---------------------------------------------------------------------------------


def validate(resource: Resource) -> None:
    """Raise ValueError unless ``resource`` is valid FHIR (R4B models) and carries id, meta and subject."""
    from fhir.resources.R4B import get_fhir_model_class  # project dependency, only needed to validate

    rtype = resource["resourceType"]
    label = f"{rtype}/{resource.get('id')}"
    try:
        get_fhir_model_class(rtype).model_validate(resource)
    except Exception as exc:  # pydantic.ValidationError and the TypeErrors fhir.resources raises
        raise ValueError(f"{label} is not valid FHIR: {exc}") from exc
    resource_meta = resource.get("meta") or {}
    if not resource.get("id") or not resource_meta.get("versionId") or not resource_meta.get("lastUpdated"):
        raise ValueError(f"{label} lacks id, meta.versionId or meta.lastUpdated")
    if not resource_meta["lastUpdated"].endswith("Z"):
        raise ValueError(f"{label}: meta.lastUpdated must be UTC with a Z offset")
    if rtype != "Patient" and not str((resource.get("subject") or {}).get("reference", "")).startswith("Patient/"):
        raise ValueError(f"{label} has no subject Patient reference")


def build() -> list[Resource]:
    """All resources of all scenarios, validated, in feed (``meta.lastUpdated``) order."""
    resources = [resource for scenario in SCENARIOS for resource in scenario()]
    for resource in resources:
        validate(resource)
    versions = [(r["resourceType"], r["id"], r["meta"]["versionId"]) for r in resources]
    if len(set(versions)) != len(versions):
        raise ValueError("duplicate (resourceType, id, versionId) in the example stream")
    # Stable sort: equal times keep scenario order (e.g. the K and Mg of one draw).
    resources.sort(key=lambda r: r["meta"]["lastUpdated"])
    people = [r for r in resources if r["resourceType"] == "Patient"]
    stays = [encounter(p["id"], i, parse(p["meta"]["lastUpdated"])) for i, p in enumerate(people)]
    for stay in stays:
        validate(stay)
    return sorted(resources + stays, key=lambda r: r["meta"]["lastUpdated"])


def parse(text: str) -> datetime:
    """The instant of a FHIR instant with a Z offset."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def render(resources: list[Resource]) -> str:
    """ndjson text: one compact JSON resource per line."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in resources)


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` verify) ``examples/stream/events.ndjson``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stream differs")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"output file (default: {OUTPUT})")
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run examples/make_examples.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} resources to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
