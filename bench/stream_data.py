"""Synthetic, seeded FHIR R4 stream for the stream benchmark: a hospital's lab, medication and condition feed.

Codes are drawn from the packaged value sets (``rules/valuesets/*.yaml``), so every resource is one the
rules read (plus a share of resources they do not use, as a real feed carries). Per patient, over a
2-6 day stay: potassium every 8-24 h on a random walk (lower on diuretics), magnesium for some (mmol/L or
mg/dL), an ECG QTc for some, diuretics / potassium / magnesium / other medications as
MedicationStatement or MedicationRequest, arrhythmia and unrelated conditions, and a few corrected
potassium results (version 2). The feed is ordered by ``meta.lastUpdated`` across patients.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

VALUESETS = Path(__file__).resolve().parents[1] / "rules" / "valuesets"
T0 = datetime(2024, 6, 1, tzinfo=UTC)
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LAB = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
HYPERTENSION = ("38341003", "Hypertensive disorder")  # not used by the rules: the feed carries it anyway


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _load() -> dict[str, Any]:
    labs = yaml.safe_load((VALUESETS / "labs.yaml").read_text(encoding="utf-8"))["concepts"]
    meds = yaml.safe_load((VALUESETS / "medications.yaml").read_text(encoding="utf-8"))["ingredients"]
    arrhythmia = yaml.safe_load((VALUESETS / "arrhythmia.yaml").read_text(encoding="utf-8"))
    by_class: dict[str, list[tuple[str, str]]] = {}
    for ingredient in meds:
        if not ingredient.get("rxnorm"):
            continue
        for cls in ingredient.get("classes") or ["other"]:
            by_class.setdefault(cls, []).append((ingredient["rxnorm"][0], ingredient["display"]))
    return {
        "k": [c["code"] for c in labs["potassium"]["codes"] if c["property"] == "moles"],
        "mg_moles": [c["code"] for c in labs["magnesium"]["codes"] if c["property"] == "moles"],
        "mg_mass": [c["code"] for c in labs["magnesium"]["codes"] if c["property"] == "mass"],
        "qtc": [c["code"] for c in labs["qtc"]["codes"]],
        "meds": by_class,
        "arrhythmia_snomed": [(c["code"], c["display"]) for c in arrhythmia["snomed"]],
        "arrhythmia_icd10": [(c["code"], c["display"]) for c in arrhythmia["icd10_prefixes"]],
    }


def _lab(rid: str, patient: str, code: str, value: float, unit: str, at: datetime, **kw: Any) -> dict[str, Any]:
    version = kw.get("version", 1)
    updated = kw.get("updated") or at + timedelta(minutes=45)
    return {
        "resourceType": "Observation",
        "id": rid,
        "meta": {"versionId": str(version), "lastUpdated": _ts(updated)},
        "status": kw.get("status", "final"),
        "category": LAB,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": _ts(at),
        "issued": _ts(at + timedelta(minutes=45)),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def _medication(rid: str, patient: str, rxnorm: tuple[str, str], start: datetime, request: bool) -> dict[str, Any]:
    concept = {"coding": [{"system": RXNORM, "code": rxnorm[0], "display": rxnorm[1]}], "text": rxnorm[1]}
    common = {
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": _ts(start)},
        "status": "active",
        "medicationCodeableConcept": concept,
        "subject": {"reference": f"Patient/{patient}"},
    }
    if request:
        return {"resourceType": "MedicationRequest", **common, "intent": "order", "authoredOn": _ts(start)}
    return {"resourceType": "MedicationStatement", **common, "effectivePeriod": {"start": _ts(start)}}


def _condition(rid: str, patient: str, system: str, code: tuple[str, str], onset: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": rid,
        "meta": {"versionId": "1", "lastUpdated": _ts(onset)},
        "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
        "code": {"coding": [{"system": system, "code": code[0], "display": code[1]}], "text": code[1]},
        "subject": {"reference": f"Patient/{patient}"},
        "onsetDateTime": _ts(onset),
    }


def patient_resources(
    rng: random.Random, codes: dict[str, Any], patient: str, stay_hours: tuple[float, float] = (48, 144)
) -> list[dict[str, Any]]:
    """One patient's stay (its length drawn uniformly from ``stay_hours``)."""
    out: list[dict[str, Any]] = []
    admit = T0 + timedelta(minutes=rng.randrange(0, 3 * 24 * 60))
    stay = timedelta(hours=rng.uniform(*stay_hours))
    meds = codes["meds"]
    on_loop = rng.random() < 0.45
    if on_loop:
        loop = rng.choice(meds["loop-diuretic"])
        out.append(_medication(f"{patient}-loop", patient, loop, admit, rng.random() < 0.5))
    if rng.random() < 0.2:
        thiazide = rng.choice(meds["thiazide-diuretic"])
        out.append(_medication(f"{patient}-thz", patient, thiazide, admit - timedelta(days=200), False))
    if rng.random() < 0.3:
        other = rng.choice(meds["other"])
        out.append(_medication(f"{patient}-oth", patient, other, admit - timedelta(days=400), rng.random() < 0.5))
    if rng.random() < 0.15:
        system, pool = (SNOMED, "arrhythmia_snomed") if rng.random() < 0.6 else (ICD10CM, "arrhythmia_icd10")
        onset = admit - timedelta(days=rng.randrange(1, 900))
        out.append(_condition(f"{patient}-arr", patient, system, rng.choice(codes[pool]), onset))
    if rng.random() < 0.3:
        out.append(_condition(f"{patient}-htn", patient, SNOMED, HYPERTENSION, admit - timedelta(days=1000)))
    # Potassium: a random walk, lower on a loop diuretic; repletion once it is low.
    k = rng.gauss(3.9 if on_loop else 4.1, 0.35)
    at = admit + timedelta(hours=rng.uniform(0, 6))
    n = 0
    repleted = False
    while at < admit + stay:
        k = min(5.8, max(2.5, k + rng.gauss(-0.08 if on_loop else 0.0, 0.25)))
        code = rng.choice(codes["k"]) if rng.random() < 0.2 else "2823-3"
        out.append(_lab(f"{patient}-k{n}", patient, code, round(k, 1), "mmol/L", at))
        if rng.random() < 0.02:  # the lab corrects it later
            out.append(
                _lab(
                    f"{patient}-k{n}",
                    patient,
                    code,
                    round(k - 0.2, 1),
                    "mmol/L",
                    at,
                    version=2,
                    status="corrected",
                    updated=at + timedelta(hours=3),
                )
            )
        if k < 3.4 and not repleted and rng.random() < 0.6:
            repleted = True
            kcl = rng.choice(meds["potassium-supplement"])
            out.append(_medication(f"{patient}-kcl", patient, kcl, at + timedelta(hours=1), rng.random() < 0.5))
        n += 1
        at += timedelta(hours=rng.uniform(8, 24))
    # Magnesium for about 40 %, in mmol/L or mg/dL.
    for j in range(rng.choice([0, 0, 0, 1, 2, 3]) if rng.random() < 0.7 else 0):
        when = admit + timedelta(hours=rng.uniform(2, stay.total_seconds() / 3600))
        mmol = round(rng.uniform(0.5, 1.05), 2)
        if rng.random() < 0.6:
            out.append(_lab(f"{patient}-mg{j}", patient, rng.choice(codes["mg_moles"]), mmol, "mmol/L", when))
        else:
            out.append(_lab(f"{patient}-mg{j}", patient, codes["mg_mass"][0], round(mmol * 2.43, 1), "mg/dL", when))
        if mmol < 0.7 and rng.random() < 0.5:
            mg_product = rng.choice(meds["magnesium-product"])
            out.append(_medication(f"{patient}-mgp{j}", patient, mg_product, when + timedelta(hours=1), True))
    if rng.random() < 0.2:
        when = admit + timedelta(hours=rng.uniform(1, 48))
        out.append(_lab(f"{patient}-qtc", patient, rng.choice(codes["qtc"]), rng.randrange(400, 530), "ms", when))
    return out


def generate(
    patients: int, seed: int = 20240601, prefix: str = "bp", stay_hours: tuple[float, float] = (48, 144)
) -> list[dict[str, Any]]:
    """The whole feed, ordered by ``meta.lastUpdated`` (ties by id). The defaults give the stream benchmark's
    feed; the backfill benchmark asks for longer stays."""
    rng = random.Random(seed)
    codes = _load()
    feed = [r for i in range(patients) for r in patient_resources(rng, codes, f"{prefix}-{i:05d}", stay_hours)]
    feed.sort(key=lambda r: (r["meta"]["lastUpdated"], r["id"]))
    return feed


def probe(patient: str, at: datetime) -> dict[str, Any]:
    """A low potassium for a patient with no magnesium: opens ``hypokalemia-without-magnesium`` at once."""
    return _lab(f"{patient}-probe", patient, "2823-3", 2.9, "mmol/L", at)
