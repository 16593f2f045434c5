"""Patient context: who the patient is and where they are cared for, as facts and as of an instant.

Patient and Encounter resources become facts like every other resource (``patient_fact`` / ``encounter_fact``,
called by :mod:`rules.normalize`), so they travel every ingestion path and the CDS prefetch, and are versioned,
deleted and replayed with the rest. :class:`PatientContext` reads those facts as of an evaluation instant: the
patient's age bounds (a birth date given as a year only is uncertain by up to a year), whether they are dead,
and the encounter in progress (its class). Rules decide applicability from it (:mod:`rules.engine`).

Names, MRNs and birth dates are PHI: they live in the facts for display, never in explanations or logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

from rules.datafiles import load_valueset
from rules.facts import EncounterInfo, Fact, PatientInfo
from rules.fhirtime import is_placeholder, to_utc

_FOREVER_DEAD = datetime.min.replace(tzinfo=UTC)


@cache
def _context() -> dict[str, Any]:
    return load_valueset("context")


def encounter_class_display(code: str | None) -> str | None:
    """``Inpatient encounter`` for ``IMP`` (None when unknown)."""
    return _context()["encounter_classes"]["codes"].get(code or "") if code else None


# --- FHIR -> facts ------------------------------------------------------------------------------------------


def _name(model: Any) -> str | None:
    names = [n for n in model.name or [] if getattr(n, "use", None) not in ("old", "anonymous")]
    names.sort(key=lambda n: 0 if n.use == "official" else 1 if n.use in (None, "usual") else 2)
    for name in names:
        if name.text:
            return " ".join(name.text.split())
        family, given = (name.family or "").strip(), " ".join(name.given or []).strip()
        if family or given:
            return f"{family.upper()}, {given}".strip(", ") if family else given
    return None


def _mrns(model: Any) -> tuple[str, ...]:
    """Identifiers typed MR (HL7 v2-0203); with none typed at all, the first untyped identifier's value."""
    mr = _context()["mrn_identifier_type"]
    current = [i for i in model.identifier or [] if i.value and getattr(i, "use", None) != "old"]
    typed = [
        i.value
        for i in current
        if i.type is not None and any(c.system == mr["system"] and c.code == mr["code"] for c in i.type.coding or [])
    ]
    if typed:
        return tuple(typed)
    untyped = [i.value for i in current if i.type is None]
    return tuple(untyped[:1])


def _deceased(model: Any, recorded: datetime | None) -> datetime | None:
    if model.deceasedDateTime is not None:
        return to_utc(model.deceasedDateTime)
    if model.deceasedBoolean:
        return recorded or _FOREVER_DEAD  # dead, from when the record says so (else: for every evaluation)
    return None


def patient_fact(model: Any, base: dict[str, Any]) -> Fact:
    """The ``patient`` fact of a Patient resource (birth date, gender, name, MRNs, deceased)."""
    born = model.birthDate
    info = PatientInfo(
        birth_date=born.isoformat() if isinstance(born, date) else (str(born) if born else None),
        gender=model.gender,
        name=_name(model),
        mrns=_mrns(model),
        deceased=_deceased(model, base.get("updated")),
    )
    notes = () if info.birth_date else ("no birthDate: age unknown",)
    return Fact(**base, concept="patient", kind="patient", patient_info=info, display="Patient", notes=notes)


def _locations(model: Any) -> tuple[str | None, str | None]:
    """(ward, bed) displays from Encounter.location (active or planned entries; by physicalType)."""
    types = _context()["location_types"]
    ward = bed = None
    fallback = None
    for entry in model.location or []:
        if getattr(entry, "status", None) in ("completed",) or entry.location is None:
            continue
        display = entry.location.display
        if not display:
            continue
        kinds = {c.code for c in (entry.physicalType.coding or [])} if entry.physicalType is not None else set()
        if kinds & set(types["bed"]):
            bed = bed or display
        elif kinds & set(types["ward"]):
            ward = ward or display
        elif not kinds:
            fallback = fallback or display
    return ward or fallback, bed


def encounter_fact(model: Any, base: dict[str, Any]) -> Fact:
    """The ``encounter`` fact of an Encounter: class, status, period (an open end: still in progress), location."""
    status = model.status
    period = model.period
    start = to_utc(getattr(period, "start", None))
    end = to_utc(getattr(period, "end", None))
    notes: list[str] = []
    if is_placeholder(end):
        notes.append(f"period end {end.date().isoformat()} read as no planned end")  # type: ignore[union-attr]
        end = None
    if status == "finished" and end is None:
        updated = base.get("updated")
        end = updated if updated is not None and (start is None or updated >= start) else start
        notes.append(
            "finished with no period end: ended " + ("when last updated" if end == updated else "at its start")
        )
    if start is None:
        notes.append("no period start: not placed in time")
    code = model.class_fhir.code if model.class_fhir is not None else None
    ward, bed = _locations(model)
    kind_text = next((t.text for t in model.type or [] if t.text), None)
    return Fact(
        **base,
        concept="encounter",
        kind="encounter",
        counts=status in _context()["encounter_present_statuses"] and start is not None,
        retracted=status == "entered-in-error",
        start=start,
        end=end,
        display=kind_text or encounter_class_display(code) or code or "Encounter",
        encounter_info=EncounterInfo(class_code=code, ward=ward, bed=bed),
        notes=tuple(notes),
    )


# --- facts -> context as of an instant --------------------------------------------------------------------


def _birthday(born: date, years: int) -> date:
    try:
        return born.replace(year=born.year + years)
    except ValueError:  # 29 February in a common year: the day after 28 February
        return born.replace(year=born.year + years, month=3, day=1)


def _birth_bounds(text: str) -> tuple[date, date] | None:
    """(earliest, latest) possible birth date of a FHIR date (``1944``, ``1944-07``, ``1944-07-09``)."""
    parts = text.split("-")
    try:
        year = int(parts[0])
        if len(parts) == 1:
            return date(year, 1, 1), date(year, 12, 31)
        month = int(parts[1])
        if len(parts) == 2:
            return date(year, month, 1), date(year + month // 12, month % 12 + 1, 1) - timedelta(days=1)
        day = date(year, month, int(parts[2][:2]))
        return day, day
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class PatientContext:
    """One patient's context as of one instant, from their ``patient`` and ``encounter`` facts."""

    as_of: datetime
    patient: Fact | None
    encounters: tuple[Fact, ...]  # counted, not retracted, in time order
    current: Fact | None  # the encounter in progress at ``as_of`` (the latest begun, when several)

    @staticmethod
    def of(facts: Iterable[Fact], as_of: datetime) -> PatientContext:
        """The context from a patient's facts (the newest patient fact; encounters that count)."""
        patients = [f for f in facts if f.kind == "patient" and not f.retracted and f.patient_info is not None]
        patient = max(patients, key=lambda f: (f.updated or _FOREVER_DEAD, f.version or ""), default=None)
        encounters = tuple(
            sorted(
                (f for f in facts if f.kind == "encounter" and f.counts and not f.retracted and f.start is not None),
                key=lambda f: (f.start, f.resource_id),
            )
        )
        current = None
        for encounter in encounters:  # the period's end is exclusive: discharged at 10:00 is gone at 10:00
            if encounter.start <= as_of and (encounter.end is None or encounter.end > as_of):  # type: ignore[operator]
                current = encounter
        return PatientContext(as_of, patient, encounters, current)

    def birth_bounds(self) -> tuple[date, date] | None:
        """(earliest, latest) possible birth date, or None when the birth date is unknown."""
        info = self.patient.patient_info if self.patient else None
        return _birth_bounds(info.birth_date) if info and info.birth_date else None

    def age_bounds(self) -> tuple[int, int] | None:
        """(youngest, oldest) possible age in whole years at ``as_of``, or None when the birth date is unknown."""
        bounds = self.birth_bounds()
        if bounds is None:
            return None
        today = self.as_of.date()
        earliest, latest = bounds
        return _age(latest, today), _age(earliest, today)

    def deceased(self) -> bool:
        """True when the patient is dead at ``as_of``."""
        info = self.patient.patient_info if self.patient else None
        return info is not None and info.deceased is not None and info.deceased <= self.as_of

    def encounters_since(self, start: datetime) -> list[Fact]:
        """Encounters of the patient active at some time in [start, as_of]."""
        return [e for e in self.encounters if e.start <= self.as_of and (e.end is None or e.end >= start)]  # type: ignore[operator]

    def next_change(self, min_age: int | None, *, encounters: bool) -> datetime | None:
        """The earliest instant after ``as_of`` at which this context changes by time alone: an encounter begins
        or ends (when ``encounters`` matter), the patient reaches ``min_age`` or dies."""
        times = (
            [t for e in self.encounters for t in (e.start, e.end) if t is not None and t > self.as_of]
            if encounters
            else []
        )
        if min_age is not None and (bounds := self.birth_bounds()) is not None:
            for born in bounds:
                birthday = datetime.combine(_birthday(born, min_age), datetime.min.time(), UTC)
                if birthday > self.as_of:
                    times.append(birthday)
        info = self.patient.patient_info if self.patient else None
        if info is not None and info.deceased is not None and info.deceased > self.as_of:
            times.append(info.deceased)
        return min(times, default=None)


def _age(born: date, today: date) -> int:
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


@dataclass(frozen=True)
class Verdict:
    """Whether a rule applies to the patient at the instant, why not, and what was unknown when it did."""

    applies: bool
    why_not: str = ""
    unknown: str = ""  # "age unknown (...)": applied by the rule's policy although this was not known


def applicability(rule_applicability: Any, context: PatientContext) -> Verdict:
    """Decide a rule's :class:`rules.model.Applicability` on the patient's context (ages are never named: PHI)."""
    app = rule_applicability
    unknown: list[str] = []
    if context.deceased():
        return Verdict(False, "the patient is deceased (Patient.deceased)")
    if app.min_age_years is not None:
        bounds = context.age_bounds()
        if bounds is None:
            what = "no Patient resource" if context.patient is None else "no birth date"
            if app.unknown_age == "skip":
                return Verdict(False, f"age unknown ({what}) and the rule skips patients of unknown age")
            unknown.append(f"age unknown ({what})")
        elif bounds[1] < app.min_age_years:
            return Verdict(False, f"the patient is under {app.min_age_years} years (the rule applies from "
                                  f"{app.min_age_years}; children are out until paediatric ranges exist)")  # fmt: skip
        elif bounds[0] < app.min_age_years:
            if app.unknown_age == "skip":
                return Verdict(False, f"the birth date is too coarse to tell whether the patient is "
                                      f"{app.min_age_years} yet")  # fmt: skip
            unknown.append(f"whether the patient is {app.min_age_years} yet (birth date too coarse)")
    if app.encounter_classes is not None:
        classes = ", ".join(app.encounter_classes)
        current = context.current
        if current is not None:
            code = current.encounter_info.class_code if current.encounter_info else None
            if code not in app.encounter_classes:
                shown = encounter_class_display(code) or code or "no class"
                return Verdict(False, f"the encounter in progress is {shown} ({code or '?'}), not one of {classes}")
        else:
            since = context.as_of - timedelta(hours=app.encounter_lookback_hours)
            if context.encounters_since(since):
                return Verdict(False, f"no encounter in progress (the rule applies during {classes} encounters)")
            window = format_hours(app.encounter_lookback_hours)
            if app.unknown_encounter == "skip":
                return Verdict(False, f"encounter unknown (no Encounter of this patient in the last {window}) and "
                                      "the rule skips patients whose encounter is unknown")  # fmt: skip
            unknown.append(f"encounter unknown (no Encounter of this patient in the last {window})")
    return Verdict(True, unknown="; ".join(unknown))


def format_hours(hours: float) -> str:
    """``365 days`` for 8760, ``72 h`` for 72."""
    return f"{hours / 24:g} days" if hours >= 48 and hours % 24 == 0 else f"{hours:g} h"
