"""Who and where a patient is, for the worklist: the one seam between the review feature and patient context.

The worklist, the detail, the search and the ward / encounter-class filters read patients only through the
installed :class:`PatientDirectory`. The API installs :class:`StoredPatientDirectory` at start-up: who and where
each patient is, from the Patient and Encounter resources the stream ingested (``workers.state.context_index``,
kept by the workers). A patient the feed sent no Patient / Encounter for is unknown: the page shows the FHIR id.
:class:`NoPatientContext` knows nobody (the default until the API installs the stored one).

Names, MRNs and birth dates are PHI: they are shown to signed-in users only, never logged, never in metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

from config.localtime import to_local
from service.review.labels import encounter_label
from workers.state import review_index as rq
from workers.state.context_index import ContextIndex

SEXES = {"female": "F", "male": "M", "other": "X", "unknown": "?"}  # FHIR R4 administrative-gender


@dataclass(frozen=True)
class PatientDisplay:
    """What the worklist shows about a patient (every field optional but the id)."""

    id: str
    name: str | None = None  # as the EHR displays it, e.g. "DOE, Jane"
    mrn: str | None = None
    birth_date: date | None = None
    sex: str | None = None  # FHIR administrative-gender: female | male | other | unknown
    ward: str | None = None
    bed: str | None = None
    encounter_class: str | None = None  # HL7 v3 ActCode: IMP, EMER, AMB, OBSENC, ...

    def age(self, today: date) -> str | None:
        """``67 y`` (``8 mo`` under 2 years, ``12 d`` under 2 months) on ``today``; None without a birth date."""
        born = self.birth_date
        if born is None or born > today:
            return None
        years = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
        if years >= 2:
            return f"{years} y"
        months = (today.year - born.year) * 12 + today.month - born.month - (today.day < born.day)
        return f"{months} mo" if months >= 2 else f"{(today - born).days} d"

    def as_dict(self, today: date) -> dict[str, Any]:
        """The API's ``patient_context`` object."""
        return {
            "id": self.id,
            "name": self.name,
            "mrn": self.mrn,
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
            "age": self.age(today),
            "sex": self.sex,
            "ward": self.ward,
            "bed": self.bed,
            "encounter_class": self.encounter_class,
            "encounter_class_display": encounter_label(self.encounter_class) or None,
        }


class PatientDirectory(Protocol):
    """Where patient context comes from."""

    #: False while no patient context exists: the page then hides the ward and encounter-class filters
    available: bool

    def display(self, patient_ids: Iterable[str]) -> dict[str, PatientDisplay]:
        """The known patients among ``patient_ids`` (unknown ones are left out)."""
        ...

    def search(self, text: str, limit: int) -> list[str]:
        """Ids of patients whose name contains ``text`` (case-insensitive) or whose MRN equals it."""
        ...

    def where(self, ward: str | None, encounter_class: str | None) -> set[str]:
        """Ids of patients currently on ``ward`` and / or in an encounter of ``encounter_class``."""
        ...

    def wards(self) -> list[str]:
        """The wards patients are on now (for the filter)."""
        ...


class NoPatientContext:
    """The directory while Patient / Encounter resources are not ingested: it knows nobody."""

    available = False

    def display(self, patient_ids: Iterable[str]) -> dict[str, PatientDisplay]:
        return {}

    def search(self, text: str, limit: int) -> list[str]:
        return []

    def where(self, ward: str | None, encounter_class: str | None) -> set[str]:
        return set()

    def wards(self) -> list[str]:
        return []


def _birth_date(text: str | None) -> date | None:
    """A full FHIR date as a date (a year or year-month only: None, the age is not shown exactly)."""
    try:
        return date.fromisoformat(text) if text and len(text) == 10 else None
    except ValueError:
        return None


def _display(patient: str, entry: dict[str, Any]) -> PatientDisplay:
    return PatientDisplay(
        patient,
        entry.get("name"),
        entry.get("mrn"),
        _birth_date(entry.get("birth_date")),
        entry.get("sex"),
        entry.get("ward"),
        entry.get("bed"),
        entry.get("class"),
    )


class StoredPatientDirectory:
    """The patients the stream knows, from their ingested Patient and Encounter resources.

    ``index`` gives the context index on the current Redis connection (called per lookup, so a process that
    reconnects or a test that switches Redis reads the right one). Lookups by id are one HMGET; search and the
    ward / encounter-class filters walk the index with HSCAN (a hospital's patients, a few hundred bytes each)."""

    def __init__(self, index: Callable[[], ContextIndex]) -> None:
        self._index = index

    @property
    def available(self) -> bool:
        """True once any patient context was ingested (the page then offers the ward and class filters)."""
        return self._index().any()

    def display(self, patient_ids: Iterable[str]) -> dict[str, PatientDisplay]:
        found = self._index().get_many(list(patient_ids))
        return {patient: _display(patient, entry) for patient, entry in found.items()}

    def search(self, text: str, limit: int) -> list[str]:
        needle = text.strip().casefold()
        hits = [
            patient
            for patient, entry in self._index().scan()
            if (entry.get("name") and needle in str(entry["name"]).casefold())
            or (entry.get("mrn") and str(entry["mrn"]).casefold() == needle)
        ]
        return sorted(hits)[:limit]

    def where(self, ward: str | None, encounter_class: str | None) -> set[str]:
        return {
            patient
            for patient, entry in self._index().scan()
            if (ward is None or entry.get("ward") == ward)
            and (encounter_class is None or entry.get("class") == encounter_class)
        }

    def wards(self) -> list[str]:
        return sorted({str(entry["ward"]) for _, entry in self._index().scan() if entry.get("ward")})


def stored_directory() -> StoredPatientDirectory:
    """The directory on the stream's store (installed by the API at start-up)."""
    from workers.pipeline import get_store

    return StoredPatientDirectory(lambda: ContextIndex(get_store().client))


_directory: PatientDirectory = NoPatientContext()


def install(directory: PatientDirectory) -> PatientDirectory:
    """Use ``directory`` from now on in this process; returns the one it replaces."""
    global _directory
    previous, _directory = _directory, directory
    return previous


def directory() -> PatientDirectory:
    """The installed directory."""
    return _directory


def patient_contexts(patient_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The API's ``patient_context`` of the known patients among ``patient_ids``, in one lookup (ages on today's
    date in the display zone); unknown patients are left out (the page then shows the FHIR id)."""
    known = _directory.display(sorted(set(patient_ids)))
    today = to_local(rq.utcnow()).date()
    return {patient: display.as_dict(today) for patient, display in known.items()}


def find_patients(text: str, limit: int = 200) -> list[str]:
    """Patients whose name contains ``text`` or whose MRN is ``text``."""
    return _directory.search(text, limit) if text.strip() else []


def patients_where(ward: str | None, encounter_class: str | None) -> set[str]:
    """Patients on ``ward`` and / or in an encounter of ``encounter_class``."""
    return _directory.where(ward or None, encounter_class or None)
