"""Lean models: read a FHIR resource through only the members the rules read (issue 15, "cold charts near the
floor").

Full ``fhir.resources`` validation of a resource costs ~100-150 µs, most of it in members no rule reads. A CDS
Hooks call brings the EHR's view of the chart (hundreds of resources, most of them seen for the first time on a
cold chart), so the CDS path reads resources through these models instead, built at import from the
``fhir.resources`` R4B classes and :data:`READ`, the tree of members :mod:`rules.normalize` and
:mod:`rules.context` read:

* **strict where the rules read**: every read member keeps the ``fhir.resources`` field type (the same
  primitive types and validators, so the same values: dates, decimals, codes, ids), its cardinality and whether
  it is required; the checks ``fhir.resources`` runs after its field validation are repeated on the read
  members (one value of a choice ``x[x]``, required primitives, no ``_member`` extension of a read member, no
  null in a list);
* **lenient elsewhere**: members the rules do not read are neither validated nor kept (``extra="ignore"``), at
  any depth: a ``category`` sent as an object, an unknown member inside a ``code``, a ``dosageInstruction`` of
  an odd shape do not matter to the rules;
* **anything unusual goes the full way**: a resource the lean model does not accept (an error in a read member,
  a missing required member, a modifier element anywhere, a contained resource that is not a Medication, ...) is
  handed back (:func:`parse` answers None) and the caller validates it with ``fhir.resources`` as before, so a
  resource left out is left out with exactly the full path's reason (``tests/test_lean.py`` checks both ways on
  every resource of the shared data, the tests' data and the example stream, and on generated variations).

Ingestion keeps full ``fhir.resources`` validation (it guards the store: what is stored is valid R4); only the
CDS path (a transient view of the EHR's data) reads lean. Pure: no I/O.
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

Spec = dict[str, "Spec | None"]

_CODING: Spec = {"system": None, "code": None, "display": None}
_CONCEPT: Spec = {"coding": _CODING, "text": None}
_REFERENCE: Spec = {"reference": None, "display": None}
_PERIOD: Spec = {"start": None, "end": None}
_QUANTITY: Spec = {"value": None, "comparator": None, "unit": None, "system": None, "code": None}
_META: Spec = {"versionId": None, "lastUpdated": None}
_COMMON: Spec = {"id": None, "meta": _META}
_CLINICAL: Spec = {**_COMMON, "subject": _REFERENCE, "encounter": _REFERENCE}
_MEDICATION: Spec = {"id": None, "code": _CONCEPT, "ingredient": {"itemCodeableConcept": _CONCEPT}}

#: Per resource type, the members the rules read (a member mapped to None is read whole with its
#: ``fhir.resources`` type; a mapping: only the listed sub-members). Keep in step with ``rules/normalize.py`` and
#: ``rules/context.py``: ``tests/test_lean.py`` compares the facts with the full path's on real data.
READ: dict[str, Spec] = {
    "Observation": {
        **_CLINICAL,
        "status": None,
        "code": _CONCEPT,
        "effectiveDateTime": None,
        "effectivePeriod": _PERIOD,
        "effectiveInstant": None,
        "issued": None,
        "valueQuantity": _QUANTITY,
        "valueString": None,
        "valueCodeableConcept": _CONCEPT,
        "dataAbsentReason": _CONCEPT,
        "component": {
            "code": _CONCEPT,
            "valueQuantity": _QUANTITY,
            "valueString": None,
            "valueCodeableConcept": _CONCEPT,
            "dataAbsentReason": _CONCEPT,
        },
        "referenceRange": {"low": _QUANTITY, "appliesTo": _CONCEPT, "age": {}, "type": _CONCEPT},
    },
    "MedicationRequest": {
        **_CLINICAL,
        "contained": None,
        "status": None,
        "intent": None,
        "doNotPerform": None,
        "medicationCodeableConcept": _CONCEPT,
        "medicationReference": _REFERENCE,
        "authoredOn": None,
        "dispenseRequest": {"validityPeriod": _PERIOD},
    },
    "MedicationStatement": {
        **_CLINICAL,
        "contained": None,
        "status": None,
        "medicationCodeableConcept": _CONCEPT,
        "medicationReference": _REFERENCE,
        "effectiveDateTime": None,
        "effectivePeriod": _PERIOD,
    },
    "MedicationAdministration": {
        **_CLINICAL,
        "contained": None,
        "status": None,
        "medicationCodeableConcept": _CONCEPT,
        "medicationReference": _REFERENCE,
        "effectiveDateTime": None,
        "effectivePeriod": _PERIOD,
    },
    "Condition": {
        **_CLINICAL,
        "code": _CONCEPT,
        "category": _CONCEPT,
        "clinicalStatus": _CONCEPT,
        "verificationStatus": _CONCEPT,
        "onsetDateTime": None,
        "onsetPeriod": _PERIOD,
        "abatementDateTime": None,
        "abatementPeriod": _PERIOD,
        "recordedDate": None,
    },
    "ServiceRequest": {
        **_CLINICAL,
        "status": None,
        "intent": None,
        "doNotPerform": None,
        "code": _CONCEPT,
        "authoredOn": None,
    },
    "Procedure": {
        **_CLINICAL,
        "status": None,
        "code": _CONCEPT,
        "performedDateTime": None,
        "performedPeriod": _PERIOD,
    },
    "Patient": {
        **_COMMON,
        "birthDate": None,
        "gender": None,
        "name": {"use": None, "text": None, "family": None, "given": None},
        "identifier": {"use": None, "value": None, "type": _CONCEPT},
        "deceasedDateTime": None,
        "deceasedBoolean": None,
    },
    "Encounter": {
        **_COMMON,
        "subject": _REFERENCE,
        "status": None,
        "class_fhir": {"code": None},
        "period": _PERIOD,
        "type": _CONCEPT,
        "location": {"status": None, "location": _REFERENCE, "physicalType": _CONCEPT},
    },
    "Medication": _MEDICATION,
}
#: A resource with any of these anywhere goes the full way: modifier elements (they can change the meaning of
#: everything else), and ``_member`` primitive extensions (``"_`` starts such a key; a string value starting
#: with an underscore only costs a full validation).
_FULL_WAY = (b'"modifierExtension"', b'"implicitRules"', b'"_')


class LeanModel(BaseModel):
    """Base of the generated models: unread members ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)
    _fhir: typing.ClassVar[Any] = None
    _resource_type: typing.ClassVar[str] = ""  # the FHIR type, set when the model is built

    @classmethod
    def get_resource_type(cls) -> str:
        """The FHIR type (as ``fhir.resources`` models answer it; read several times per resource, so kept as a
        class attribute rather than asked of the ``fhir.resources`` class each time)."""
        return cls._resource_type


class _Checked(LeanModel):
    """A lean model of a type with required members or choice elements: the post-validation checks of
    ``fhir.resources`` repeated on the raw members (a failure sends the resource the full way)."""

    _required: typing.ClassVar[tuple[str, ...]] = ()  # aliases of required members (read or not) and primitives
    _choices: typing.ClassVar[tuple[tuple[frozenset[str], bool], ...]] = ()  # (every alias of a x[x], required)

    @model_validator(mode="before")
    @classmethod
    def _fhir_checks(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic refuses it with its own error
        get = data.get
        for key in cls._required:
            if get(key) is None:
                raise ValueError(f"{key} is required")
        for keys, required in cls._choices:
            present = sum(1 for key in keys.intersection(data) if data[key] is not None)  # members sent, not null
            if present > 1 or (required and not present):
                raise ValueError("one value of a choice element")
        return data


def _inner(annotation: Any) -> tuple[Any, str]:
    """(the element type, shape: ``one`` | ``optional`` | ``list``) of a ``fhir.resources`` annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, shape = _inner(args[0])
        return inner, "list" if shape == "list" else "optional"
    if origin in (list, typing.List):  # noqa: UP006
        return typing.get_args(annotation)[0], "list"
    return annotation, "one"


def _complex_class(element: Any) -> Any:
    name = getattr(element, "__name__", "")
    if not name.endswith("Type"):
        raise TypeError(f"not a complex FHIR type: {element!r}")
    return get_fhir_model_class(name.removesuffix("Type"))


def _build(cls: Any, spec: Spec, name: str) -> type[LeanModel]:
    fields: dict[str, Any] = {}
    for member, sub in spec.items():
        if member == "contained":  # contained Medications (parse() lets no other contained resource through)
            medication = model_for("Medication")
            fields[member] = (list[medication] | None, Field(None))  # type: ignore[valid-type]
            continue
        field = cls.model_fields.get(member)
        if field is None:  # e.g. encounter of a MedicationStatement (R4 names it context; the rules never read it)
            continue
        annotation = field.annotation
        if sub is not None:
            element, shape = _inner(annotation)
            lean = _build(_complex_class(element), sub, f"{name}_{member}")
            annotation = {"one": lean, "optional": lean | None, "list": list[lean] | None}[shape]  # type: ignore[valid-type]
        default = ... if field.is_required() else None
        fields[member] = (annotation, Field(default, alias=field.alias or member))
    aliases = {n: (f.alias or n) for n, f in cls.model_fields.items()}
    primitives = cls.get_required_fields(None) if hasattr(cls, "get_required_fields") else []
    required = tuple(aliases[n] for n, f in cls.model_fields.items() if f.is_required())
    required += tuple(aliases[p] for p, _ in primitives)
    groups = cls.get_one_of_many_fields(None) if hasattr(cls, "get_one_of_many_fields") else {}
    choices = tuple(
        (
            frozenset(aliases[c] for c in group),
            bool((cls.model_fields[group[0]].json_schema_extra or {}).get("one_of_many_required")),
        )
        for group in groups.values()
    )
    base = _Checked if required or choices else LeanModel
    model = create_model(name, __base__=base, **fields)
    model._fhir = cls
    model._resource_type = str(cls.get_resource_type())
    if base is _Checked:
        model._required, model._choices = required, choices
    return model


@cache
def model_for(resource_type: str) -> type[LeanModel] | None:
    """The lean model of a resource type (None: the type has none; read it in full)."""
    spec = READ.get(resource_type)
    if spec is None:
        return None
    return _build(get_fhir_model_class(resource_type), spec, f"Lean{resource_type}")


_MEDICATION_TYPES = frozenset({"MedicationRequest", "MedicationStatement", "MedicationAdministration"})


def parse(resource_type: str, data: Any, raw: bytes | None = None) -> Any:
    """The resource read through its lean model, or None when it must go the full way (see the module
    docstring). ``raw``: the resource's JSON when the caller has it (saves a serialisation)."""
    model = model_for(resource_type)
    if model is None or not isinstance(data, dict):
        return None
    try:
        raw = raw if raw is not None else orjson.dumps(data)
    except (TypeError, orjson.JSONEncodeError):
        return None
    if any(marker in raw for marker in _FULL_WAY):
        return None
    contained = data.get("contained")
    if contained is not None and (
        resource_type not in _MEDICATION_TYPES
        or not isinstance(contained, list)
        or not all(isinstance(c, dict) and c.get("resourceType") == "Medication" for c in contained)
    ):
        return None
    try:
        return model.model_validate(data)
    except (ValidationError, TypeError, ValueError):
        return None


def parse_medication(data: Any) -> Any:
    """A Medication (a medicationReference's target) read lean, or None (read it in full)."""
    if not isinstance(data, dict) or "contained" in data:
        return None
    return parse("Medication", data)


__all__ = ["READ", "LeanModel", "model_for", "parse", "parse_medication"]
