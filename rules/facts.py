"""The fact: one clinically meaningful statement drawn from one FHIR resource.

Facts are what the engine reads and what the stream keeps in a patient's timeline. A resource yields
zero or more facts (a combination diuretic yields one per class; an ECG panel a QTc and a rhythm finding).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict

from rules.fhirtime import isoformat

FactKind = Literal["lab", "finding", "medication", "condition", "order", "procedure", "patient", "encounter"]

#: Schema version of a serialised fact; bump when a stored fact would no longer read back.
#: 2: patient context (``patient_info``, ``encounter_info``), ``encounter`` links and the lab's ``reference_low``.
FACT_SCHEMA_VERSION = 2
_EPOCH = datetime.min.replace(tzinfo=UTC)


class PatientInfo(BaseModel):
    """Who the patient is (from a Patient resource). PHI: shown to signed-in users, never logged or counted."""

    model_config = ConfigDict(frozen=True)

    birth_date: str | None = None  # FHIR date as sent: 1944-07-09, 1944-07 or 1944 (age bounds use the precision)
    gender: str | None = None  # administrative-gender: male | female | other | unknown
    name: str | None = None  # as the EHR displays it: "FAMILY, Given" (official name first)
    mrns: tuple[str, ...] = ()  # identifiers typed MR (v2-0203), else the first identifier
    deceased: datetime | None = None  # from when the patient is dead (deceasedBoolean true: from its record time)


class EncounterInfo(BaseModel):
    """Where the patient is being cared for (from an Encounter resource)."""

    model_config = ConfigDict(frozen=True)

    class_code: str | None = None  # HL7 v3 ActCode: IMP, ACUTE, NONAC, EMER, OBSENC, SS, AMB, HH, VR, ...
    ward: str | None = None  # Encounter.location display (physicalType wa / ro, or the first location)
    bed: str | None = None  # Encounter.location display whose physicalType is bd


class Fact(BaseModel):
    """A normalised, unit-converted statement about one patient, traceable to its source resource."""

    model_config = ConfigDict(frozen=True)

    patient: str
    concept: str  # potassium | magnesium | qtc | arrhythmia | loop-diuretic | ... | magnesium-order
    kind: FactKind
    resource_type: str
    resource_id: str
    version: str | None = None
    updated: datetime | None = None  # meta.lastUpdated
    status: str | None = None  # the resource's own status, as sent
    counts: bool = True  # False: cancelled / entered-in-error / not active / no value: never evidence
    retracted: bool = False  # entered-in-error or cancelled: retracts what it supported
    start: datetime | None = None  # effective time (observations) or start of the active period
    end: datetime | None = None  # end of the active period (None: open / same as start)
    value: Decimal | None = None  # in the canonical unit
    unit: str | None = None  # canonical unit
    comparator: str | None = None  # <, <=, >, >= as reported
    reported_value: str | None = None
    reported_unit: str | None = None
    display: str | None = None  # what the source called it (code display / drug name)
    problem: str | None = None  # why the fact is indeterminate (unknown unit, unparseable value)
    notes: tuple[str, ...] = ()  # "unit inferred from LOINC property", "matched by free text", ...
    encounter: str | None = None  # the stay a result or order belongs to ("Encounter/<id>", as referenced)
    reference_low: Decimal | None = None  # the lab's referenceRange.low in the canonical unit
    reference_low_reported: Decimal | None = None  # the same limit in the result's own unit (compared in it)
    patient_info: PatientInfo | None = None  # kind "patient" only
    encounter_info: EncounterInfo | None = None  # kind "encounter" only
    schema_version: int = FACT_SCHEMA_VERSION

    @property
    def key(self) -> str:
        """Identity inside a patient timeline: one fact per (resource, concept)."""
        return f"{self.resource_type}/{self.resource_id}#{self.concept}"

    @property
    def reference(self) -> str:
        """Versioned FHIR reference to the source resource."""
        base = f"{self.resource_type}/{self.resource_id}"
        return f"{base}/_history/{self.version}" if self.version else base

    @property
    def determinate(self) -> bool:
        """True when the value (if any) is known in the canonical unit."""
        return self.problem is None

    def describe(self) -> str:
        """Short human text: ``magnesium 1.5 mg/dL (0.62 mmol/L) at 2024-05-01T08:00:00Z``."""
        parts = [self.display or self.concept]
        if self.reported_value is not None:
            shown = f"{self.comparator or ''}{self.reported_value} {self.reported_unit or '(no unit)'}".strip()
            if self.value is not None and self.unit and (self.reported_unit or "") != self.unit:
                shown += f" (= {format_decimal(self.value)} {self.unit})"
            parts.append(shown)
        if self.start:
            parts.append(f"at {isoformat(self.start)}")
        return " ".join(parts)


def format_decimal(value: Decimal | None, places: int = 2) -> str:
    """Display rounding only: at most ``places`` decimals, trailing zeros removed (3.7000007 -> 3.7)."""
    if value is None:
        return "?"
    quantized = value.quantize(Decimal(1).scaleb(-places)) if value.as_tuple().exponent < -places else value
    text = format(quantized.normalize(), "f")
    return text


def version_rank(fact: Fact) -> tuple[int, int, datetime, int]:
    """Order of versions of one resource: numeric versionId, then lastUpdated; a retraction
    (entered-in-error) outranks an unversioned peer. Higher wins."""
    numeric = fact.version.isdigit() if fact.version else False
    return (
        int(numeric),
        int(fact.version) if numeric and fact.version else 0,
        fact.updated or _EPOCH,
        int(fact.retracted),
    )


def latest_versions(facts: Iterable[Fact]) -> list[Fact]:
    """Keep, per source resource, only the facts of its newest version (a new version replaces every
    fact the old one produced; equal rank: the later one in ``facts`` wins)."""
    best: dict[str, tuple[tuple[int, int, datetime, int], list[Fact]]] = {}
    for fact in facts:
        resource = f"{fact.resource_type}/{fact.resource_id}"
        rank = version_rank(fact)
        current = best.get(resource)
        if current is None or rank > current[0]:
            best[resource] = (rank, [fact])
        elif rank == current[0]:
            kept = [f for f in current[1] if f.concept != fact.concept]
            best[resource] = (rank, [*kept, fact])
    return [fact for _, group in best.values() for fact in group]
