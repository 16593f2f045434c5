"""FHIR R4 resources -> facts. The one place that reads FHIR for the rules (with :mod:`rules.context`, which reads
the Patient and Encounter resources it is handed from here).

Each resource is validated with the ``fhir.resources`` R4B models (the closest to R4 4.0.1) plus the
required-binding code checks those models leave out (status, comparator, intent). A resource that fails
validation gives field-level issues and no facts; it never raises. With ``NormalizeOptions.lean`` (the CDS
path) a resource is read through the lean model of only the members the rules read (:mod:`rules.lean`) and
validated in full only when that model refuses it, so what is left out is left out for the full path's
reasons.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from rules import lean
from rules.codes import (
    ArrhythmiaMatch,
    Coding,
    LabCode,
    arrhythmia_match,
    dialysis_coding,
    excluded_lab_reason,
    lab_code,
)
from rules.context import encounter_fact, patient_fact
from rules.facts import Fact
from rules.fhirtime import is_placeholder, to_utc
from rules.medications import class_display, classify
from rules.orders import order_concepts_for_class, order_concepts_for_lab, order_counts, order_display
from rules.units import analyte_units, quantitative_concepts, resolve_unit, unit_key

SUPPORTED_TYPES = (
    "Observation",
    "MedicationStatement",
    "MedicationRequest",
    "MedicationAdministration",
    "Condition",
    "ServiceRequest",
    "Procedure",
    "Patient",
    "Encounter",
)

# Required bindings of FHIR R4 that the fhir.resources models do not enforce.
_REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Observation", "status"): frozenset(
        ["registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"]
    ),
    ("MedicationStatement", "status"): frozenset(
        ["active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown", "not-taken"]
    ),
    ("MedicationRequest", "status"): frozenset(
        ["active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"]
    ),
    ("MedicationAdministration", "status"): frozenset(
        ["in-progress", "not-done", "on-hold", "completed", "entered-in-error", "stopped", "unknown"]
    ),
    ("MedicationRequest", "intent"): frozenset(
        ["proposal", "plan", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"]
    ),
    ("ServiceRequest", "status"): frozenset(
        ["draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"]
    ),
    ("Procedure", "status"): frozenset(
        ["preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"]
    ),
    ("Encounter", "status"): frozenset(
        [
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ]
    ),
    ("Patient", "gender"): frozenset(["male", "female", "other", "unknown"]),
    ("ServiceRequest", "intent"): frozenset(
        [
            "proposal",
            "plan",
            "directive",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        ]
    ),
}
_BINDINGS: dict[str, list[tuple[str, frozenset[str]]]] = {}
for (_type, _name), _allowed in _REQUIRED_CODES.items():
    _BINDINGS.setdefault(_type, []).append((_name, _allowed))
_COMPARATORS = frozenset({"<", "<=", ">", ">="})
_RESULT_OK = frozenset({"final", "amended", "corrected"})
_RESULT_RETRACTED = frozenset({"cancelled", "entered-in-error"})
_REQUEST_INTENTS_THAT_TREAT = frozenset({"order", "original-order", "reflex-order", "filler-order", "instance-order"})
_CONDITION_ACTIVE = frozenset({"active", "recurrence", "relapse"})
_CONDITION_UNCONFIRMED = frozenset({"refuted", "entered-in-error", "differential"})
_VALUE_STRING = re.compile(r"^\s*(<=|>=|<|>)?\s*([-+]?\d+(?:\.\d+)?)\s*(\S.*)?$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/.*)?$")
_ENCOUNTER_REF = re.compile(r"(?:^|/)(Encounter/[A-Za-z0-9\-.]{1,64})(?:/_history/.*)?$")
_PROCEDURE_COUNTING = frozenset({"in-progress", "completed", "stopped"})

Severity = Literal["error", "warning", "information"]


@dataclass(frozen=True)
class Issue:
    """A problem found in one resource: FHIRPath-like location plus a plain message."""

    severity: Severity
    path: str
    message: str


@dataclass
class NormalizeResult:
    """What one resource turned into."""

    resource_type: str
    resource_id: str | None
    outcome: Literal["accepted", "ignored", "rejected"]
    facts: list[Fact] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    reason: str | None = None  # why ignored / rejected, one line
    patient: str | None = None


@dataclass(frozen=True)
class NormalizeOptions:
    """Deployment choices for normalisation."""

    include_preliminary: bool = False  # count preliminary lab results as results
    default_patient: str | None = None  # patient for resources without subject (CDS Hooks context)
    lean: bool = False  # read through the lean models (rules.lean) first; full validation only when they refuse


def normalize_resource(
    data: Any,
    options: NormalizeOptions | None = None,
    *,
    resolve: Mapping[str, Mapping[str, Any]] | None = None,
    raw: bytes | None = None,
) -> NormalizeResult:
    """Validate one FHIR resource (JSON dict) and turn it into facts.

    ``resolve`` maps references (``Medication/x``, ``urn:uuid:...``) to resources of the same bundle, so
    ``medicationReference`` can be followed; contained resources (``#id``) are always followed. ``raw``: the
    resource's JSON (``orjson.dumps(data)``) when the caller already has it; the lean reader then does not
    serialise it again.
    """
    options = options or NormalizeOptions()
    if not isinstance(data, Mapping):
        return _rejected("?", None, "", f"expected a JSON object, got {type(data).__name__}")
    rtype = data.get("resourceType")
    rid = data.get("id") if isinstance(data.get("id"), str) else None
    if not isinstance(rtype, str) or not rtype:
        return _rejected("?", rid, "resourceType", "missing resourceType")
    if rtype not in SUPPORTED_TYPES:
        return NormalizeResult(rtype, rid, "ignored", reason=f"{rtype} is not a type the rules read")
    model = lean.parse(rtype, data, raw) if options.lean else None
    if model is not None and _binding_problems(rtype, data):
        model = None  # rejected below, with the full path's issues
    if model is None:  # full fhir.resources validation (ingestion always; the CDS path when the lean model refuses)
        model, problems = parse(rtype, data)
        if model is None or problems:
            return NormalizeResult(rtype, rid, "rejected", issues=problems, reason=problems[0].message)
    patient = _patient_id(model, options)
    if patient is None and rtype == "Patient":
        return _rejected(rtype, rid, "Patient.id", "resource has no id (a Patient is known by its own id)")
    if patient is None:
        return _rejected(rtype, rid, f"{rtype}.subject", "no Patient reference in subject")
    if not rid:
        return _rejected(rtype, rid, f"{rtype}.id", "resource has no id (needed to track versions)")
    extractor = _EXTRACTORS[rtype]
    result = NormalizeResult(rtype, rid, "accepted", patient=patient)
    extractor(model, patient, options, resolve or {}, result)
    placeholder = next((f.start for f in result.facts if is_placeholder(f.start)), None)
    if placeholder is not None:
        path = f"{rtype}.{_TIME_FIELDS[rtype]}"
        return _rejected(
            rtype, rid, path, f"{path} {placeholder.date().isoformat()} is a placeholder date, not a clinical time"
        )
    if not result.facts and result.outcome == "accepted":
        result.outcome = "ignored"
        result.reason = result.reason or (
            "no potassium, magnesium, QTc, renal, arrhythmia, dialysis, K/Mg drug or order content"
        )
    return result


def parse(rtype: str, data: Mapping[str, Any]) -> tuple[Any, list[Issue]]:
    """Validate a resource against the R4B model and the required code bindings.

    Returns ``(model, [])`` when valid, else ``(model or None, issues)``.
    """
    issues: list[Issue] = []
    model = None
    try:
        model = get_fhir_model_class(rtype).model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            path = ".".join([rtype, *(str(p) for p in error["loc"])])
            message = error["msg"].removeprefix("Value error, ")
            issues.append(Issue("error", path, f"{message} (at {path})"))
    except (TypeError, ValueError, KeyError) as exc:  # fhir.resources raises these on odd shapes
        issues.append(Issue("error", rtype, f"invalid {rtype}: {exc}"))
    issues.extend(_binding_problems(rtype, data))
    if model is None and not issues:
        issues.append(Issue("error", rtype, f"invalid {rtype}"))
    return model, issues


def _binding_problems(rtype: str, data: Mapping[str, Any]) -> list[Issue]:
    """The required code bindings the ``fhir.resources`` models leave out (status, intent, gender, comparator)."""
    issues: list[Issue] = []
    for name, allowed in _BINDINGS.get(rtype, ()):
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or value not in allowed):
            issues.append(
                Issue(
                    "error",
                    f"{rtype}.{name}",
                    f"{rtype}.{name} {value!r} is not one of the FHIR R4 codes ({', '.join(sorted(allowed))})",
                )
            )
    if rtype == "Observation":
        issues.extend(_check_comparators(data))
    return issues


def _check_comparators(data: Mapping[str, Any]) -> list[Issue]:
    found: list[Issue] = []
    quantities = [("Observation.valueQuantity", data.get("valueQuantity"))]
    for i, component in enumerate(data.get("component") or []):
        if isinstance(component, Mapping):
            quantities.append((f"Observation.component[{i}].valueQuantity", component.get("valueQuantity")))
    for path, quantity in quantities:
        if isinstance(quantity, Mapping) and quantity.get("comparator") not in (None, *_COMPARATORS):
            found.append(
                Issue(
                    "error",
                    f"{path}.comparator",
                    f"{path}.comparator {quantity['comparator']!r} is not one of <, <=, >, >=",
                )
            )
    return found


def _rejected(rtype: str, rid: str | None, path: str, message: str) -> NormalizeResult:
    return NormalizeResult(rtype, rid, "rejected", issues=[Issue("error", path or rtype, message)], reason=message)


def _patient_id(model: Any, options: NormalizeOptions) -> str | None:
    if model.get_resource_type() == "Patient":
        return model.id if isinstance(model.id, str) and model.id else None
    subject = getattr(model, "subject", None)
    reference = getattr(subject, "reference", None) if subject is not None else None
    if reference:
        if reference.startswith("urn:uuid:"):  # a Bundle-local Patient: the uuid must be a real one (an id)
            uuid = reference.removeprefix("urn:uuid:")
            return uuid if _UUID.match(uuid) else None
        match = _PATIENT_REF.search(reference)
        if match:
            return match.group(1)
    return options.default_patient


def _codings(concept: Any) -> list[Coding]:
    if concept is None:
        return []
    return [Coding(c.system, c.code, c.display) for c in (concept.coding or [])]


def _texts(concept: Any) -> list[str]:
    if concept is None:
        return []
    texts = [concept.text] if concept.text else []
    texts.extend(c.display for c in (concept.coding or []) if c.display)
    return texts


def _version(model: Any) -> str | None:
    meta = getattr(model, "meta", None)
    return getattr(meta, "versionId", None) if meta is not None else None


def _encounter_ref(model: Any) -> str | None:
    """``Encounter/<id>`` of the stay a resource belongs to (its ``encounter`` reference), if any."""
    reference = getattr(getattr(model, "encounter", None), "reference", None)
    if not isinstance(reference, str):
        return None
    if reference.startswith("urn:uuid:"):  # a Bundle-internal reference: the element only ever names an Encounter
        return "Encounter/" + reference.removeprefix("urn:uuid:")
    match = _ENCOUNTER_REF.search(reference)
    return match.group(1) if match else None


def _base_fact(model: Any, patient: str, **fields: Any) -> dict[str, Any]:
    return {
        "patient": patient,
        "resource_type": model.get_resource_type(),
        "resource_id": model.id,
        "version": _version(model),
        "updated": to_utc(getattr(getattr(model, "meta", None), "lastUpdated", None)),
        "status": getattr(model, "status", None),
        "encounter": _encounter_ref(model),
        **fields,
    }


# --- Observation -------------------------------------------------------------------------------------


def _observation(model: Any, patient: str, options: NormalizeOptions, _: Mapping, result: NormalizeResult) -> None:
    status = model.status
    counts = status in _RESULT_OK or (options.include_preliminary and status == "preliminary")
    retracted = status in _RESULT_RETRACTED
    when = to_utc(
        model.effectiveDateTime
        or getattr(model.effectivePeriod, "start", None)
        or model.effectiveInstant
        or model.issued
    )
    codings = _codings(model.code)
    base = _base_fact(model, patient, counts=counts, retracted=retracted, start=when, end=when)
    notes: list[str] = []
    if not counts and not retracted:
        notes.append(f"status {status} is not a reportable result")
    if when is None:
        notes.append("no effective time")
        base["counts"] = False

    lab = lab_code(codings)
    if lab is not None and lab.concept in quantitative_concepts():
        fact = _quantity_fact(base, lab, model, notes)
        result.facts.append(_with_reference_low(fact, model.referenceRange))
    elif lab is None:
        excluded = excluded_lab_reason(codings)
        if excluded:
            result.reason = excluded
    for i, component in enumerate(model.component or []):
        component_lab = lab_code(_codings(component.code))
        if component_lab is not None and component_lab.concept == "qtc" and not _has_concept(result, "qtc"):
            result.facts.append(_quantity_fact(base, component_lab, component, [*notes, f"from component[{i}]"]))
    sources = [codings, _codings(model.valueCodeableConcept)]
    sources += [_codings(component.valueCodeableConcept) for component in model.component or []]
    finding = arrhythmia_match(coding for source in sources for coding in source)
    if finding is not None:
        display = finding.display
        _arrhythmia_facts(
            Fact(**base, concept="arrhythmia", kind="finding", display=display, notes=tuple(notes)), finding, result
        )


def _arrhythmia_facts(fact: Fact, finding: ArrhythmiaMatch, result: NormalizeResult) -> None:
    """The ``arrhythmia`` fact and, for torsades / VT / VF / long QT syndrome, its ``high-risk-arrhythmia`` twin."""
    result.facts.append(fact)
    if finding.high_risk:
        result.facts.append(fact.model_copy(update={"concept": "high-risk-arrhythmia"}))


def _has_concept(result: NormalizeResult, concept: str) -> bool:
    return any(f.concept == concept for f in result.facts)


def _quantity_fact(base: dict[str, Any], lab: LabCode, holder: Any, notes: list[str]) -> Fact:
    """Fact for a quantitative result held by an Observation or one of its components."""
    concept, display = lab.concept, lab.display
    fields: dict[str, Any] = {**base, "concept": concept, "kind": "lab", "display": display}
    notes = list(notes)
    quantity = holder.valueQuantity
    if quantity is not None and quantity.value is not None:
        value, comparator = Decimal(quantity.value), quantity.comparator
        system, code, unit = quantity.system, quantity.code, quantity.unit
    elif getattr(holder, "valueString", None):
        parsed = _VALUE_STRING.match(holder.valueString)
        if parsed is None:
            return Fact(
                **fields,
                reported_value=holder.valueString,
                notes=tuple(notes),
                problem=f"unparseable value {holder.valueString!r}",
            )
        comparator, number, unit = parsed.groups()
        value, system, code = Decimal(number), None, None
    else:
        absent = getattr(holder, "dataAbsentReason", None)
        reason = (absent.text or next((c.code for c in absent.coding or []), None)) if absent else None
        notes.append(f"no value (dataAbsentReason: {reason})" if reason else "no value")
        return Fact(**{**fields, "counts": False}, notes=tuple(notes))
    reported_unit = unit or code
    if not value.is_finite():
        return Fact(
            **fields,
            reported_value=str(value),
            reported_unit=reported_unit,
            notes=tuple(notes),
            problem=f"value {value} is not a finite number",
        )
    resolution = resolve_unit(
        concept, system=system, code=code, unit=unit, loinc_property=lab.property, loinc_code=lab.code
    )
    if resolution.factor is None:
        return Fact(
            **fields,
            reported_value=str(value),
            reported_unit=reported_unit,
            comparator=comparator,
            notes=tuple(notes),
            problem=resolution.problem,
        )
    if resolution.inferred:
        notes.append(f"unit inferred ({resolution.unit}) from the LOINC code's property")
        reported_unit = resolution.unit
    try:
        canonical = value * resolution.factor
    except InvalidOperation:
        return Fact(
            **fields,
            reported_value=str(value),
            reported_unit=reported_unit,
            notes=tuple(notes),
            problem=f"value {value} cannot be converted",
        )
    table = analyte_units(concept)
    if table.implausible(canonical):
        low, high = table.plausible or (None, None)
        return Fact(
            **fields,
            reported_value=str(value),
            reported_unit=reported_unit,
            comparator=comparator,
            notes=tuple(notes),
            problem=f"implausible value {value} {reported_unit or ''}".rstrip()
            + f" (outside {low}-{high} {table.canonical}); treated as a data error",
        )
    return Fact(
        **fields,
        value=canonical,
        unit=table.canonical,
        comparator=comparator,
        reported_value=str(value),
        reported_unit=reported_unit,
        notes=tuple(notes),
    )


_RANGE_TYPES = frozenset({"normal"})


def _with_reference_low(fact: Fact, ranges: Any) -> Fact:
    """The fact with the lab's own lower reference limit (``referenceRange.low``) in its unit and the canonical one.

    Only a general range is read: type normal (or none), not restricted to a population (``appliesTo``) or an age.
    A range without a unit is in the result's unit; one whose unit cannot be converted, or outside the analyte's
    plausible values, is not used (the rule's own threshold then applies)."""
    if fact.value is None or fact.problem is not None or not ranges:
        return fact
    table = analyte_units(fact.concept)
    for item in ranges:
        low = getattr(item, "low", None)
        if low is None or low.value is None or item.appliesTo or item.age is not None:
            continue
        kinds = {c.code for c in (item.type.coding or [])} if item.type is not None else set()
        if kinds and not kinds & _RANGE_TYPES:
            continue
        reported_factor = table.factor(fact.reported_unit)
        range_unit = low.code if low.code and low.system in (None, "http://unitsofmeasure.org") else low.unit
        range_factor = table.factor(range_unit) if range_unit else reported_factor
        if reported_factor is None or range_factor is None:
            return fact
        value = Decimal(low.value)
        canonical = value * range_factor
        if table.implausible(canonical):
            return fact
        same_unit = range_unit is None or unit_key(range_unit) == unit_key(fact.reported_unit)
        reported = value if same_unit else canonical / reported_factor
        return fact.model_copy(update={"reference_low": canonical, "reference_low_reported": reported})
    return fact


# --- Medications -------------------------------------------------------------------------------------


def _medication_content(
    model: Any, resolve: Mapping[str, Mapping[str, Any]], result: NormalizeResult, options: NormalizeOptions
) -> tuple[list[Coding], list[str]]:
    """Codings and texts describing the drug, following medicationReference when needed."""
    if model.medicationCodeableConcept is not None:
        return _codings(model.medicationCodeableConcept), _texts(model.medicationCodeableConcept)
    reference = model.medicationReference
    target = reference.reference if reference is not None else None
    texts = [reference.display] if reference is not None and reference.display else []
    medication: Any = None
    if target and target.startswith("#"):
        medication = next((c for c in model.contained or [] if getattr(c, "id", None) == target[1:]), None)
    elif target and target in resolve:
        medication = lean.parse_medication(resolve[target]) if options.lean else None
        if medication is None:
            medication = get_fhir_model_class("Medication").model_validate(resolve[target])
    if medication is None:
        result.issues.append(
            Issue(
                "warning",
                f"{model.get_resource_type()}.medicationReference",
                f"medication reference {target!r} could not be resolved; using its display",
            )
        )
        return [], texts
    codings, texts = _codings(medication.code), [*texts, *_texts(medication.code)]
    for ingredient in medication.ingredient or []:
        item = getattr(ingredient, "itemCodeableConcept", None)
        codings.extend(_codings(item))
        texts.extend(_texts(item))
    return codings, texts


# Which statuses make a medication resource evidence for the period it covers (FHIR R4 status codes).
_MED_COUNTING: dict[str, frozenset[str]] = {
    "MedicationRequest": frozenset({"active", "on-hold", "completed", "stopped"}),
    "MedicationStatement": frozenset({"active", "on-hold", "completed", "stopped"}),
    "MedicationAdministration": frozenset({"completed", "in-progress", "stopped"}),
}
_MED_FINISHED = frozenset({"completed", "stopped"})
_MED_NOT_COUNTING = {
    "cancelled": "cancelled: never acted on",
    "draft": "draft: not an order yet",
    "unknown": "status unknown: not known to be given or taken",
    "intended": "intended: not taken yet",
    "not-taken": "not taken",
    "not-done": "not given (not-done)",
    "on-hold": "on hold: not being given",
    "entered-in-error": "entered in error",
}


@dataclass
class _Period:
    """When a medication resource says the drug was (or is) given or taken."""

    start: datetime | None
    end: datetime | None
    counts: bool
    notes: list[str]


def _raw_period(model: Any) -> tuple[datetime | None, datetime | None, bool]:
    """(start, end, is a single instant) as the resource states them."""
    if model.get_resource_type() == "MedicationRequest":  # the order's validity, else from when it was written
        validity = getattr(model.dispenseRequest, "validityPeriod", None) if model.dispenseRequest else None
        start = to_utc(getattr(validity, "start", None)) or to_utc(model.authoredOn)
        return start, to_utc(getattr(validity, "end", None)), False
    if model.effectivePeriod is not None:
        return to_utc(model.effectivePeriod.start), to_utc(model.effectivePeriod.end), False
    return to_utc(model.effectiveDateTime), None, True


def _medication_period(model: Any) -> _Period:
    """The period a medication resource is evidence for.

    Requests (active, on-hold) count from the validity start (else authoredOn) to the validity end (open if
    none); completed / stopped requests and statements count up to their end, else meta.lastUpdated (when the
    completion was recorded), else their start. Statements count for effective[x] (an active one from an
    effectiveDateTime on); administrations at effectiveDateTime (one dose) or over effectivePeriod. A
    placeholder end (9999-12-31, any year >= 9000) means no planned end.
    """
    rtype, status = model.get_resource_type(), model.status
    start, end, instant = _raw_period(model)
    notes: list[str] = []
    if is_placeholder(end):
        notes.append(f"end date {end.date().isoformat()} read as no planned end")  # type: ignore[union-attr]
        end = None
    counts = status in _MED_COUNTING[rtype]
    if not counts:
        notes.append(_MED_NOT_COUNTING.get(status, f"status {status}"))
    if instant and (status in _MED_FINISHED or rtype == "MedicationAdministration"):
        end = start  # one dose, or taken at one time
    elif end is None and status in _MED_FINISHED:
        updated = to_utc(getattr(getattr(model, "meta", None), "lastUpdated", None))
        if updated is not None and not is_placeholder(updated) and (start is None or updated >= start):
            end = updated
            notes.append(f"{status} with no end date: counted up to meta.lastUpdated")
        elif start is not None:
            end = start
            notes.append(f"{status} with no end date or lastUpdated: counted at its start only")
    if counts and start is None and end is None and status in _MED_FINISHED:
        counts = False
        notes.append(f"{status} with no dates: cannot be placed in time")
    elif start is None:
        notes.append("no effective time: active from an unknown start")
    return _Period(start, end, counts, notes)


def _medication(model: Any, patient: str, options: NormalizeOptions, resolve: Mapping, result: NormalizeResult) -> None:
    codings, texts = _medication_content(model, resolve, result, options)
    matches = classify(codings, texts)
    period = _medication_period(model)
    notes = period.notes
    counts = period.counts
    rtype = model.get_resource_type()
    if rtype == "MedicationRequest":
        if model.intent not in _REQUEST_INTENTS_THAT_TREAT:
            counts = False
            notes.append(f"intent {model.intent} is not an order")
        if model.doNotPerform:
            counts = False
            notes.append("doNotPerform")
    draft = rtype == "MedicationRequest" and model.status == "draft"
    ingredient_names = sorted({m.ingredient for m in matches})
    if len(ingredient_names) > 1:
        notes.append("combination product: " + " + ".join(ingredient_names))
    seen: set[str] = set()
    for match in matches:
        for class_id in match.classes:
            if class_id in seen:
                continue
            seen.add(class_id)
            class_notes = [*notes, "matched by free text (lower confidence)"] if match.via == "text" else notes
            display = texts[0] if texts else (codings[0].display if codings and codings[0].display else None)
            display = display or match.ingredient
            if draft:
                _order_facts(model, patient, order_concepts_for_class(class_id), display, class_notes, result)
                if _has_concept(result, class_id):
                    continue  # the draft is evidence of this concept as an order being signed
            result.facts.append(
                Fact(
                    **_base_fact(model, patient),
                    concept=class_id,
                    kind="medication",
                    counts=counts,
                    retracted=model.status == "entered-in-error",
                    start=period.start,
                    end=period.end,
                    display=f"{display} ({class_display(class_id).lower()})",
                    notes=tuple(class_notes),
                )
            )


# --- Orders ------------------------------------------------------------------------------------------


def _order_facts(
    model: Any, patient: str, concepts: Iterable[str], display: str, notes: list[str], result: NormalizeResult
) -> None:
    """Facts for an order (a draft MedicationRequest or a ServiceRequest) of the given order concepts.

    A draft has no time of its own yet (it is being written now), so it is active from an unknown start;
    a placed order is active from ``authoredOn``.
    """
    counts = order_counts(model.status) and model.intent != "option" and not model.doNotPerform
    start = None if model.status == "draft" else to_utc(model.authoredOn)
    for concept in concepts:
        if _has_concept(result, concept):
            continue
        result.facts.append(
            Fact(
                **_base_fact(model, patient),
                concept=concept,
                kind="order",
                counts=counts,
                retracted=model.status == "entered-in-error",
                start=start,
                end=None,
                display=f"{display} ({order_display(concept).lower()}, {model.status})",
                notes=tuple(notes),
            )
        )


def _service_request(model: Any, patient: str, _: NormalizeOptions, __: Mapping, result: NormalizeResult) -> None:
    lab = lab_code(_codings(model.code))
    if lab is None:
        return
    texts = _texts(model.code)
    _order_facts(model, patient, order_concepts_for_lab(lab.concept), texts[0] if texts else lab.display, [], result)


# --- Condition ---------------------------------------------------------------------------------------


def _first_code(concept: Any) -> str | None:
    if concept is None:
        return None
    return next((c.code for c in concept.coding or [] if c.code), None)


def _condition_status(model: Any) -> tuple[bool, str | None, str | None, list[str]]:
    """(counts, clinicalStatus, verificationStatus, notes) of a Condition."""
    clinical = _first_code(model.clinicalStatus)
    verification = _first_code(model.verificationStatus)
    notes: list[str] = []
    counts = True
    if clinical is None:
        notes.append("no clinicalStatus: taken as active")
    elif clinical not in _CONDITION_ACTIVE:
        counts = False
        notes.append(f"clinicalStatus {clinical}")
    if verification in _CONDITION_UNCONFIRMED:
        counts = False
        notes.append(f"verificationStatus {verification}")
    categories = {c.code for category in model.category or [] for c in category.coding or [] if c.code}
    if "encounter-diagnosis" in categories:
        notes.append("encounter diagnosis")
    return counts, clinical, verification, notes


def _condition(model: Any, patient: str, _: NormalizeOptions, __: Mapping, result: NormalizeResult) -> None:
    codings = _codings(model.code)
    finding = arrhythmia_match(codings)
    dialysis = dialysis_coding(codings, "conditions")
    if finding is None and dialysis is None:
        return
    counts, clinical, verification, notes = _condition_status(model)
    start, start_notes = _condition_start(model)
    notes.extend(start_notes)
    end = to_utc(model.abatementDateTime or getattr(model.abatementPeriod, "end", None))
    if is_placeholder(end):
        notes.append(f"abatement {end.date().isoformat()} read as not abated")  # type: ignore[union-attr]
        end = None
    text = model.code.text if model.code else None
    common = {
        **_base_fact(model, patient, status=clinical),
        "kind": "condition",
        "counts": counts,
        "retracted": verification == "entered-in-error",
        "start": start,
        "end": end,
        "notes": tuple(notes),
    }
    if finding is not None:
        display = finding.coding.display or text or finding.display
        _arrhythmia_facts(Fact(**common, concept="arrhythmia", display=display), finding, result)
    if dialysis is not None:
        result.facts.append(Fact(**common, concept="dialysis", display=dialysis[0].display or text or dialysis[1]))


# --- Procedure, Patient, Encounter --------------------------------------------------------------------


def _procedure(model: Any, patient: str, _: NormalizeOptions, __: Mapping, result: NormalizeResult) -> None:
    found = dialysis_coding(_codings(model.code), "procedures")
    if found is None:
        return
    period = model.performedPeriod
    start = to_utc(model.performedDateTime or getattr(period, "start", None))
    end = to_utc(getattr(period, "end", None)) if period is not None else start
    notes = [] if model.status in _PROCEDURE_COUNTING else [f"status {model.status}: not a dialysis done"]
    if start is None:
        notes.append("no performed time")
    result.facts.append(
        Fact(
            **_base_fact(model, patient),
            concept="dialysis",
            kind="procedure",
            counts=model.status in _PROCEDURE_COUNTING and start is not None,
            retracted=model.status == "entered-in-error",
            start=start,
            end=end if end is not None or model.status != "completed" else start,
            display=found[0].display or (model.code.text if model.code else None) or found[1],
            notes=tuple(notes),
        )
    )


def _patient(model: Any, patient: str, _: NormalizeOptions, __: Mapping, result: NormalizeResult) -> None:
    result.facts.append(patient_fact(model, _base_fact(model, patient, status=None)))


def _encounter(model: Any, patient: str, _: NormalizeOptions, __: Mapping, result: NormalizeResult) -> None:
    result.facts.append(encounter_fact(model, _base_fact(model, patient)))


def _condition_start(model: Any) -> tuple[datetime | None, list[str]]:
    """When the record knew of the condition: the later of onset and recordedDate (a diagnosis recorded today
    with an onset in 2015 is new to this record today; a decision never uses it before it was recorded)."""
    onset = to_utc(model.onsetDateTime or getattr(model.onsetPeriod, "start", None))
    recorded = to_utc(model.recordedDate)
    if onset is None and recorded is None:
        return None, ["no onset or recorded date"]
    if onset is None or recorded is None:
        return onset or recorded, []
    if recorded > onset:
        return recorded, [f"onset {onset.date().isoformat()}, recorded {recorded.date().isoformat()}"]
    return onset, []


_TIME_FIELDS = {  # where each type's time comes from, for the message that rejects a placeholder date
    "Observation": "effective[x]",
    "MedicationStatement": "effective[x]",
    "MedicationAdministration": "effective[x]",
    "MedicationRequest": "authoredOn",
    "Condition": "onset[x] / recordedDate",
    "ServiceRequest": "authoredOn",
    "Procedure": "performed[x]",
    "Patient": "birthDate",
    "Encounter": "period.start",
}

_EXTRACTORS = {
    "Observation": _observation,
    "MedicationStatement": _medication,
    "MedicationRequest": _medication,
    "MedicationAdministration": _medication,
    "Condition": _condition,
    "ServiceRequest": _service_request,
    "Procedure": _procedure,
    "Patient": _patient,
    "Encounter": _encounter,
}


# --- Bundles and collections -------------------------------------------------------------------------


def iter_resources(data: Any) -> Iterator[tuple[str | None, Any]]:
    """Yield ``(fullUrl, resource)`` for every resource, recursing into nested Bundles and
    batch/transaction responses; Bundles themselves are not yielded."""
    if not isinstance(data, Mapping):
        yield None, data
        return
    if "resourceType" not in data and isinstance(data.get("resource"), Mapping):
        yield from iter_resources(data["resource"])  # pre-R4 {response, resource} wrapper (CDS Hooks examples)
        return
    if data.get("resourceType") != "Bundle":
        yield None, data
        return
    for entry in data.get("entry") or []:
        if not isinstance(entry, Mapping):
            continue
        for key in ("resource", "response"):
            inner = entry.get(key)
            if isinstance(inner, Mapping) and key == "response":
                inner = inner.get("outcome")
            if isinstance(inner, Mapping) and inner.get("resourceType") == "Bundle":
                yield from iter_resources(inner)
            elif isinstance(inner, Mapping) and key == "resource":
                yield entry.get("fullUrl"), inner


def reference_index(resources: Iterable[tuple[str | None, Any]]) -> dict[str, Mapping[str, Any]]:
    """Map ``fullUrl`` and ``Type/id`` of each resource to the resource, for medicationReference."""
    index: dict[str, Mapping[str, Any]] = {}
    for full_url, resource in resources:
        if not isinstance(resource, Mapping):
            continue
        if isinstance(full_url, str) and full_url:  # real bundles carry odd fullUrl values
            index[full_url] = resource
        if isinstance(resource.get("resourceType"), str) and isinstance(resource.get("id"), str):
            index[f"{resource['resourceType']}/{resource['id']}"] = resource
    return index


def normalize_resources(data: Any, options: NormalizeOptions | None = None) -> list[NormalizeResult]:
    """Normalise a resource, a Bundle (nested or not) or a list of either."""
    items = data if isinstance(data, list) else [data]
    pairs = [pair for item in items for pair in iter_resources(item)]
    index = reference_index(pairs)
    return [normalize_resource(resource, options, resolve=index) for _, resource in pairs]
