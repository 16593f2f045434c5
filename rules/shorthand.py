"""Shorthand facts for embedded rule tests, expanded into real FHIR R4 resources.

Expanding into FHIR (rather than building facts directly) means every embedded test also exercises the
normaliser: units, comparators, statuses and medication classification take the production path.

Shorthand keys: ``lab`` (potassium | magnesium | qtc) with ``value``, ``unit``, ``comparator``, ``at``,
``status``, ``loinc``; ``med`` (an RxNorm code) with ``status``, ``type`` (statement | request |
administration; ``status: draft`` makes a draft order), ``start`` / ``end`` (statement and administration:
effectivePeriod; request: authoredOn and dispenseRequest.validityPeriod.end), ``at`` (effectiveDateTime) and
``updated`` (meta.lastUpdated); ``lab_order`` (potassium | magnesium: a ServiceRequest for that lab) with
``status`` (default draft), ``intent``, ``at`` (authoredOn); ``condition`` (a code: SNOMED, or ``system:
icd-10-cm | icd-9-cm``) with ``start`` (onset), ``recorded``, ``category`` (e.g. encounter-diagnosis),
``clinical_status``; ``ecg`` (a SNOMED rhythm code) with ``at``; ``patient`` (a birth date, or null for none) with
``gender`` and ``deceased`` (the test's own patient); ``encounter`` (an HL7 v3 ActCode class such as IMP) with
``start``, ``end``, ``status`` (default in-progress, finished with an end), ``ward``, ``bed``; ``procedure`` (a
SNOMED code, e.g. 302497006 hemodialysis) with ``at`` and ``status``; or ``resource`` holding any FHIR resource as
is. ``lab`` also takes egfr and creatinine.
"""

from __future__ import annotations

from typing import Any

from rules.datafiles import load_valueset

UCUM = "http://unitsofmeasure.org"
_DEFAULT_LOINC = {
    "potassium": "2823-3",
    "magnesium": "2601-3",
    "qtc": "8636-3",
    "egfr": "33914-3",
    "creatinine": "2160-0",
}
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_CONDITION_SYSTEMS = {
    "snomed": "http://snomed.info/sct",
    "icd-10-cm": "http://hl7.org/fhir/sid/icd-10-cm",
    "icd-9-cm": "http://hl7.org/fhir/sid/icd-9-cm",
}


def _loinc_display(code: str) -> str:
    for concept in load_valueset("labs")["concepts"].values():
        for item in concept["codes"]:
            if item["code"] == code:
                return item["display"]
    return code


def expand(item: dict[str, Any], patient: str, index: int) -> dict[str, Any]:
    """One shorthand item -> one FHIR resource (dict)."""
    if "resource" in item:
        return item["resource"]
    rid = str(item.get("id", f"t{index}"))
    subject = {"reference": f"Patient/{patient}"}
    meta = {"versionId": str(item["version"])} if "version" in item else {}
    if "updated" in item:
        meta["lastUpdated"] = item["updated"]
    resource: dict[str, Any]
    if "lab" in item:
        loinc = item.get("loinc", _DEFAULT_LOINC[item["lab"]])
        resource = {
            "resourceType": "Observation",
            "id": rid,
            "status": item.get("status", "final"),
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": _loinc_display(loinc)}]},
            "subject": subject,
            "effectiveDateTime": item["at"],
        }
        if "value" in item:
            value = item["value"]
            quantity: dict[str, Any] = {"value": value if isinstance(value, int | float) else float(value)}
            if item.get("unit") is not None:
                quantity |= {"unit": item["unit"]}
                if item.get("ucum", True):
                    quantity |= {"system": UCUM, "code": item["unit"]}
            if item.get("comparator"):
                quantity["comparator"] = item["comparator"]
            resource["valueQuantity"] = quantity
    elif "med" in item:
        kind = item.get("type", "statement")
        concept = {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": str(item["med"])}]}
        period = {k: item[k] for k in ("start", "end") if k in item}
        effective = {"effectiveDateTime": item["at"]} if "at" in item else {"effectivePeriod": period} if period else {}
        if kind in ("statement", "administration"):
            default_status = "active" if kind == "statement" else "completed"
            resource = {
                "resourceType": "MedicationStatement" if kind == "statement" else "MedicationAdministration",
                "id": rid,
                "status": item.get("status", default_status),
                "medicationCodeableConcept": concept,
                "subject": subject,
                **effective,
            }
        elif kind != "request":
            raise ValueError(f"med type {kind!r} is not statement, request or administration")
        else:
            resource = {
                "resourceType": "MedicationRequest",
                "id": rid,
                "status": item.get("status", "active"),
                "intent": item.get("intent", "order"),
                "medicationCodeableConcept": concept,
                "subject": subject,
                **({"authoredOn": item["start"]} if "start" in item else {}),
                **({"dispenseRequest": {"validityPeriod": {"end": item["end"]}}} if "end" in item else {}),
            }
    elif "lab_order" in item:
        loinc = item.get("loinc", _DEFAULT_LOINC[item["lab_order"]])
        resource = {
            "resourceType": "ServiceRequest",
            "id": rid,
            "status": item.get("status", "draft"),
            "intent": item.get("intent", "order"),
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": _loinc_display(loinc)}]},
            "subject": subject,
            **({"authoredOn": item["at"]} if "at" in item else {}),
        }
    elif "condition" in item:
        code = str(item["condition"])
        resource = {
            "resourceType": "Condition",
            "id": rid,
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": item.get("clinical_status", "active"),
                    }
                ]
            },
            "code": {"coding": [{"system": _CONDITION_SYSTEMS[item.get("system", "snomed")], "code": code}]},
            "subject": subject,
            **({"onsetDateTime": item["start"]} if "start" in item else {}),
            **({"recordedDate": item["recorded"]} if "recorded" in item else {}),
        }
        if "category" in item:
            category = {"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": item["category"]}
            resource["category"] = [{"coding": [category]}]
    elif "ecg" in item:
        resource = {
            "resourceType": "Observation",
            "id": rid,
            "status": item.get("status", "final"),
            "code": {"coding": [{"system": "http://loinc.org", "code": "8601-7", "display": "EKG impression"}]},
            "subject": subject,
            "effectiveDateTime": item["at"],
            "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": str(item["ecg"])}]},
        }
    elif "patient" in item:
        resource = {"resourceType": "Patient", "id": patient, "gender": item.get("gender", "female")}
        if item["patient"]:
            resource["birthDate"] = str(item["patient"])
        if "deceased" in item:
            resource["deceasedDateTime"] = item["deceased"]
    elif "encounter" in item:
        status = item.get("status", "finished" if "end" in item else "in-progress")
        period = {k: item[k] for k in ("start", "end") if k in item}
        resource = {
            "resourceType": "Encounter",
            "id": rid,
            "status": status,
            "class": {"system": _ACT_CODE, "code": str(item["encounter"])},
            "subject": subject,
            **({"period": period} if period else {}),
        }
        places = [("ward", "wa"), ("bed", "bd")]
        locations = [
            {"location": {"display": item[key]}, "physicalType": {"coding": [{"code": code}]}}
            for key, code in places
            if key in item
        ]
        if locations:
            resource["location"] = locations
    elif "procedure" in item:
        resource = {
            "resourceType": "Procedure",
            "id": rid,
            "status": item.get("status", "completed"),
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": str(item["procedure"])}]},
            "subject": subject,
            "performedDateTime": item["at"],
        }
    else:
        raise ValueError(
            f"fact #{index}: expected one of lab, med, lab_order, condition, ecg, patient, encounter, procedure, "
            f"resource; got {sorted(item)}"
        )
    if meta:
        resource["meta"] = meta
    return resource
