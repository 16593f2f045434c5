"""Who and where a patient is, for the worklist: the one seam between the review feature and patient context.

The worklist, the detail, the search and the ward / encounter-class filters read patients only through the
installed :class:`PatientDirectory`. Until Patient / Encounter resources are ingested (issue 11) the default
directory knows nobody (:class:`NoPatientContext`): every lookup answers None / nothing and the page shows
the FHIR id, as before. The patient-context work installs its directory with :func:`install` (at start-up,
in every API process); nothing else changes.

Names, MRNs and birth dates are PHI: they are shown to signed-in users only, never logged, never in metrics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

from service.review.labels import encounter_label

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


_directory: PatientDirectory = NoPatientContext()


def install(directory: PatientDirectory) -> PatientDirectory:
    """Use ``directory`` from now on in this process; returns the one it replaces."""
    global _directory
    previous, _directory = _directory, directory
    return previous


def directory() -> PatientDirectory:
    """The installed directory."""
    return _directory


def patient_display(patient_id: str) -> PatientDisplay | None:
    """Who patient ``patient_id`` is, or None when unknown (the page then shows the FHIR id)."""
    return _directory.display([patient_id]).get(patient_id)


def patient_displays(patient_ids: Iterable[str]) -> dict[str, PatientDisplay]:
    """:func:`patient_display` for several patients in one lookup."""
    return _directory.display(sorted(set(patient_ids)))


def find_patients(text: str, limit: int = 200) -> list[str]:
    """Patients whose name contains ``text`` or whose MRN is ``text``."""
    return _directory.search(text, limit) if text.strip() else []


def patients_where(ward: str | None, encounter_class: str | None) -> set[str]:
    """Patients on ``ward`` and / or in an encounter of ``encounter_class``."""
    return _directory.where(ward or None, encounter_class or None)
