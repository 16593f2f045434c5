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
class ArrhythmiaMatch:
    """A coding recognised as arrhythmia evidence, and whether it is high risk (torsades, VT/VF, long QT)."""

    coding: Coding
    high_risk: bool
    display: str  # the coding's own display, else the value set's


@dataclass(frozen=True)
class _ArrhythmiaSet:
    snomed_systems: frozenset[str]
    snomed: dict[str, tuple[bool, str]]  # code -> (high risk, display)
    icd10_systems: frozenset[str]
    icd10_prefixes: tuple[tuple[str, bool, str], ...]  # (prefix, high risk, display), longest first
    icd9_systems: frozenset[str]
    icd9_prefixes: tuple[tuple[str, bool, str], ...]

    def match(self, coding: Coding) -> ArrhythmiaMatch | None:
        if not coding.code or not coding.system:
            return None
        if coding.system in self.snomed_systems:
            found = self.snomed.get(coding.code)
            return None if found is None else ArrhythmiaMatch(coding, found[0], coding.display or found[1])
        compact = coding.code.replace(".", "").upper()
        if coding.system in self.icd10_systems:
            prefixes = self.icd10_prefixes
        elif coding.system in self.icd9_systems:
            prefixes = self.icd9_prefixes
        else:
            return None
        hit = next((item for item in prefixes if compact.startswith(item[0])), None)
        return None if hit is None else ArrhythmiaMatch(coding, hit[1], coding.display or hit[2])


def _prefixes(items: list[dict[str, object]]) -> tuple[tuple[str, bool, str], ...]:
    triples = [(str(item["code"]), bool(item.get("high_risk", False)), str(item["display"])) for item in items]
    return tuple(sorted(triples, key=lambda triple: -len(triple[0])))  # the most specific prefix decides


@cache
def _arrhythmia() -> _ArrhythmiaSet:
    data = load_valueset("arrhythmia")
    return _ArrhythmiaSet(
        snomed_systems=frozenset(data["snomed_systems"]),
        snomed={str(i["code"]): (bool(i.get("high_risk", False)), str(i["display"])) for i in data["snomed"]},
        icd10_systems=frozenset(data["icd10_systems"]),
        icd10_prefixes=_prefixes(data["icd10_prefixes"]),
        icd9_systems=frozenset(data["icd9_systems"]),
        icd9_prefixes=_prefixes(data["icd9_prefixes"]),
    )


def arrhythmia_match(codings: Iterable[Coding]) -> ArrhythmiaMatch | None:
    """The coding that names a cardiac arrhythmia or QT prolongation (a high-risk one first), or None."""
    value_set = _arrhythmia()
    found = [m for m in (value_set.match(c) for c in codings) if m is not None]
    return next((m for m in found if m.high_risk), found[0] if found else None)


def arrhythmia_coding(codings: Iterable[Coding]) -> Coding | None:
    """The first coding that names a cardiac arrhythmia or QT prolongation, or None."""
    found = arrhythmia_match(codings)
    return found.coding if found else None


def arrhythmia_concept_display(concept: str) -> str:
    """Human name of an arrhythmia concept (``high-risk-arrhythmia`` -> ``Torsades de pointes, ...``)."""
    return str(load_valueset("arrhythmia")["concepts"].get(concept, concept))


@dataclass(frozen=True)
class _DialysisSet:
    systems: dict[str, str]  # system url -> snomed | icd10 | icd9 | cpt
    codes: dict[tuple[str, str, str], str]  # (resource kind, system kind, compact code) -> display


def _compact(system_kind: str, code: str) -> str:
    return code.replace(".", "").upper() if system_kind in ("icd10", "icd9") else code


@cache
def _dialysis() -> _DialysisSet:
    data = load_valueset("context")["dialysis"]
    systems = {url: kind.removesuffix("_systems") for kind in ("snomed_systems", "icd10_systems", "icd9_systems",
                                                               "cpt_systems") for url in data[kind]}  # fmt: skip
    codes = {
        (resource_kind, system_kind, _compact(system_kind, str(item["code"]))): str(item["display"])
        for resource_kind in ("conditions", "procedures")
        for system_kind, items in data[resource_kind].items()
        for item in items
    }
    return _DialysisSet(systems, codes)


def dialysis_coding(codings: Iterable[Coding], resource_kind: str) -> tuple[Coding, str] | None:
    """The first coding that names dialysis (``resource_kind``: conditions | procedures), with the value set's
    display; ICD codes match exactly with the dot removed."""
    value_set = _dialysis()
    for coding in codings:
        kind = value_set.systems.get(coding.system or "")
        if kind is None or not coding.code:
            continue
        display = value_set.codes.get((resource_kind, kind, _compact(kind, coding.code.strip())))
        if display is not None:
            return coding, display
    return None
