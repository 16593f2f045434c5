"""Per-analyte unit normalisation (table in valuesets/units.yaml).

Never guesses: a unit that is missing or not in the analyte's table gives no conversion, and the caller
marks the fact indeterminate, unless the LOINC property fixes the unit (then the fact says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import cache, lru_cache

from rules.datafiles import load_valueset

UCUM_SYSTEM = "http://unitsofmeasure.org"


def unit_key(unit: str | None) -> str | None:
    """Case- and space-insensitive spelling of a unit, used as a lookup key (``mEq/L`` -> ``meq/l``)."""
    if unit is None:
        return None
    key = "".join(unit.split()).lower()
    return key or None


@dataclass(frozen=True)
class AnalyteUnits:
    """The units one analyte may arrive in and how each converts to the canonical unit."""

    analyte: str
    canonical: str
    factors: dict[str, Decimal]
    inferred_by_property: dict[str, str]
    plausible: tuple[Decimal, Decimal] | None = None  # canonical-unit bounds outside which a value is a data error
    dimensions: dict[str, str] | None = None  # unit key -> LOINC property (moles | mass)

    def dimension(self, unit: str | None) -> str | None:
        """The LOINC property a unit spelling belongs to (None when the table does not say)."""
        key = unit_key(unit)
        return None if key is None or not self.dimensions else self.dimensions.get(key)

    def implausible(self, canonical_value: Decimal) -> bool:
        """True when a converted value lies outside the analyte's plausible range."""
        if self.plausible is None:
            return False
        low, high = self.plausible
        return not (low <= canonical_value <= high)

    def factor(self, unit: str | None) -> Decimal | None:
        """Factor to canonical for a unit spelling, or None when unknown."""
        key = unit_key(unit)
        return None if key is None else self.factors.get(key)


@cache
def quantitative_concepts() -> frozenset[str]:
    """Concepts whose results are numbers with a unit table (potassium, magnesium, qtc, egfr, creatinine)."""
    return frozenset(load_valueset("units")["analytes"])


@cache
def analyte_units(analyte: str) -> AnalyteUnits:
    """The unit table for ``analyte`` (potassium, magnesium, qtc)."""
    entry = load_valueset("units")["analytes"][analyte]
    factors = {unit_key(unit): Decimal(str(f)) for unit, f in entry["units"].items()}
    bounds = entry.get("plausible")
    return AnalyteUnits(
        analyte=analyte,
        canonical=entry["canonical"],
        factors={k: v for k, v in factors.items() if k},
        inferred_by_property=dict(entry.get("inferred_by_property") or {}),
        plausible=(Decimal(str(bounds["low"])), Decimal(str(bounds["high"]))) if bounds else None,
        dimensions={
            key: prop for prop, units in (entry.get("dimensions") or {}).items() for u in units if (key := unit_key(u))
        },
    )


_PROPERTY_WORDS = {"moles": "substance (molar) concentration", "mass": "mass concentration"}


@dataclass(frozen=True)
class Resolution:
    """How a reported quantity's unit was understood."""

    unit: str | None  # the spelling that matched the table (None if nothing matched)
    factor: Decimal | None
    inferred: bool = False
    problem: str | None = None


def resolve_unit(
    analyte: str,
    *,
    system: str | None,
    code: str | None,
    unit: str | None,
    loinc_property: str | None,
    loinc_code: str | None = None,
) -> Resolution:
    """Resolve the unit of a reported quantity: UCUM code first, then `unit` text, then LOINC property."""
    args = (analyte, system, code, unit, loinc_property, loinc_code)
    if any(len(text or "") > _CACHED_CHARS for text in (system, code, unit)):  # the sender's odd spellings
        return _resolve.__wrapped__(*args)  # are not kept (the cache stays small)
    return _resolve(*args)


_CACHED_CHARS = 128


@lru_cache(maxsize=4096)
def _resolve(
    analyte: str,
    system: str | None,
    code: str | None,
    unit: str | None,
    loinc_property: str | None,
    loinc_code: str | None,
) -> Resolution:
    """:func:`resolve_unit`, remembered: a pure function of its arguments with an immutable answer, and a chart
    repeats the same few unit spellings (bounded, since the spellings come from the sender)."""
    table = analyte_units(analyte)
    candidates: list[str] = []
    if code and (system in (None, UCUM_SYSTEM)):
        candidates.append(code)
    if unit:
        candidates.append(unit)
    for candidate in candidates:
        factor = table.factor(candidate)
        if factor is not None:
            dimension = table.dimension(candidate)
            if loinc_property and dimension and loinc_property in _PROPERTY_WORDS and dimension != loinc_property:
                return Resolution(
                    unit=candidate,
                    factor=None,
                    problem=f"unit {candidate!r} is a {_PROPERTY_WORDS[dimension]} but LOINC {loinc_code or ''} is "
                    f"a {_PROPERTY_WORDS[loinc_property]} code: the unit or the code is wrong, the value is not used",
                )
            return Resolution(unit=candidate, factor=factor)
    if candidates:
        shown = " / ".join(dict.fromkeys(candidates))
        return Resolution(unit=None, factor=None, problem=f"unknown unit {shown!r} for {analyte}")
    inferred = table.inferred_by_property.get(loinc_property or "")
    if inferred:
        return Resolution(unit=inferred, factor=table.factor(inferred), inferred=True)
    return Resolution(unit=None, factor=None, problem=f"missing unit for {analyte}")
