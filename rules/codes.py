"""Code look-ups for observations and conditions (valuesets/labs.yaml, valuesets/arrhythmia.yaml)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from rules.datafiles import load_valueset

LOINC = "http://loinc.org"


@dataclass(frozen=True)
class LabCode:
    """A LOINC code the rules read, with its concept and LOINC property."""

    concept: str
    code: str
    display: str
    property: str


@dataclass(frozen=True)
class Coding:
    """A minimal (system, code, display) triple, decoupled from the fhir.resources models."""

    system: str | None
    code: str | None
    display: str | None = None


@cache
def _lab_index() -> tuple[dict[str, LabCode], dict[str, str]]:
    data = load_valueset("labs")
    index: dict[str, LabCode] = {}
    for concept, entry in data["concepts"].items():
        for item in entry["codes"]:
            index[item["code"]] = LabCode(concept, item["code"], item["display"], item["property"])
    excluded = {item["code"]: item["reason"] for item in data.get("excluded", [])}
    return index, excluded


def lab_code(codings: Iterable[Coding]) -> LabCode | None:
    """The first LOINC coding that is in the lab value set."""
    index, _ = _lab_index()
    for coding in codings:
        if coding.system == LOINC and coding.code in index:
            return index[coding.code]
    return None


def excluded_lab_reason(codings: Iterable[Coding]) -> str | None:
    """Why a LOINC coding is deliberately not read (RBC Mg, ionized Mg, ...), or None."""
    _, excluded = _lab_index()
    for coding in codings:
        if coding.system == LOINC and coding.code in excluded:
            return f"LOINC {coding.code}: {excluded[coding.code]}"
    return None


@dataclass(frozen=True)
class _ArrhythmiaSet:
    snomed_systems: frozenset[str]
    snomed: frozenset[str]
    icd10_systems: frozenset[str]
    icd10_prefixes: tuple[str, ...]
    icd9_systems: frozenset[str]
    icd9_prefixes: tuple[str, ...]

    def matches(self, coding: Coding) -> bool:
        if not coding.code or not coding.system:
            return False
        if coding.system in self.snomed_systems:
            return coding.code in self.snomed
        compact = coding.code.replace(".", "").upper()
        if coding.system in self.icd10_systems:
            return compact.startswith(self.icd10_prefixes)
        if coding.system in self.icd9_systems:
            return compact.startswith(self.icd9_prefixes)
        return False


@cache
def _arrhythmia() -> _ArrhythmiaSet:
    data = load_valueset("arrhythmia")
    return _ArrhythmiaSet(
        snomed_systems=frozenset(data["snomed_systems"]),
        snomed=frozenset(item["code"] for item in data["snomed"]),
        icd10_systems=frozenset(data["icd10_systems"]),
        icd10_prefixes=tuple(item["code"] for item in data["icd10_prefixes"]),
        icd9_systems=frozenset(data["icd9_systems"]),
        icd9_prefixes=tuple(item["code"] for item in data["icd9_prefixes"]),
    )


def arrhythmia_coding(codings: Iterable[Coding]) -> Coding | None:
    """The first coding that names a cardiac arrhythmia or QT prolongation, or None."""
    value_set = _arrhythmia()
    return next((coding for coding in codings if value_set.matches(coding)), None)
