"""Medication classification by ingredient (table in valuesets/medications.yaml).

Whatever the coding (RxNorm ingredient or product, ATC, SNOMED, NDC, contained Medication) the drug is
reduced to its ingredients, and each ingredient to its classes. Free text is the lower-confidence
fallback, used only when no coding is recognised, with known salt traps removed first
("Penicillin V Potassium" is not a potassium supplement).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

from rules.codes import Coding
from rules.datafiles import load_valueset

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
SNOMED = "http://snomed.info/sct"
NDC = "http://hl7.org/fhir/sid/ndc"


@dataclass(frozen=True)
class Match:
    """One ingredient recognised in a medication, with how it was recognised."""

    ingredient: str
    classes: tuple[str, ...]
    via: str  # rxnorm-ingredient | rxnorm-product | atc | snomed | ndc | text
    code: str | None = None

    @property
    def confidence(self) -> str:
        """``coded`` for a code match, ``text`` for a free-text match."""
        return "text" if self.via == "text" else "coded"


@dataclass
class _Index:
    ingredient_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rxnorm_in: dict[str, str] = field(default_factory=dict)
    rxnorm_product: dict[str, tuple[str, ...]] = field(default_factory=dict)
    atc_exact: dict[str, str] = field(default_factory=dict)
    atc_class_prefix: dict[str, str] = field(default_factory=dict)
    snomed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    ndc: dict[str, tuple[str, ...]] = field(default_factory=dict)
    names: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    exclusions: list[str] = field(default_factory=list)
    fluids: list[str] = field(default_factory=list)
    class_display: dict[str, str] = field(default_factory=dict)
    #: text -> its matches (the same drug texts recur on every chart: each is scanned by the patterns once)
    text_matches: dict[str, tuple[Match, ...]] = field(default_factory=dict)


_TEXT_CACHE_SIZE = 20_000


@cache
def _index() -> _Index:
    data = load_valueset("medications")
    index = _Index()
    for class_id, entry in data["classes"].items():
        index.class_display[class_id] = entry["display"]
        for prefix in entry.get("atc_prefixes", []):
            index.atc_class_prefix[prefix.upper()] = class_id
    for item in data["ingredients"]:
        ingredient = item["id"]
        index.ingredient_classes[ingredient] = tuple(item.get("classes") or ())
        for code in item.get("rxnorm") or []:
            index.rxnorm_in[str(code)] = ingredient
        for code in item.get("atc") or []:
            index.atc_exact[str(code).upper()] = ingredient
        for name in item.get("names") or []:
            pattern = re.compile(r"(?<![a-z0-9])" + re.escape(name.lower()) + r"(?![a-z0-9])")
            index.names.append((pattern, ingredient))
    for key, attr in (("products", "rxnorm_product"), ("snomed", "snomed"), ("ndc", "ndc")):
        target = getattr(index, attr)
        for item in data.get(key) or []:
            target[str(item["code"])] = tuple(item["ingredients"])
    index.exclusions = sorted((e["phrase"].lower() for e in data.get("text_exclusions") or []), key=len)[::-1]
    index.fluids = [e["phrase"].lower() for e in data.get("fluid_exclusions") or []]
    return index


def class_display(class_id: str) -> str:
    """Human name of a medication class id (``loop-diuretic`` -> ``Loop diuretic``)."""
    return _index().class_display.get(class_id, class_id)


def known_classes() -> tuple[str, ...]:
    """Every medication class id the value set defines."""
    return tuple(_index().class_display)


def _match_coding(coding: Coding, index: _Index) -> list[Match]:
    code = (coding.code or "").strip()
    if not code:
        return []
    system = coding.system or ""

    def make(ingredients: Iterable[str], via: str) -> list[Match]:
        return [Match(i, index.ingredient_classes.get(i, ()), via, code) for i in ingredients]

    if system == RXNORM:
        if code in index.rxnorm_in:
            return make([index.rxnorm_in[code]], "rxnorm-ingredient")
        if code in index.rxnorm_product:
            return make(index.rxnorm_product[code], "rxnorm-product")
    elif system == ATC:
        upper = code.upper()
        if upper in index.atc_exact:
            return make([index.atc_exact[upper]], "atc")
        for prefix, class_id in index.atc_class_prefix.items():
            if upper.startswith(prefix):
                return [Match(f"atc:{upper}", (class_id,), "atc", code)]
    elif system == SNOMED and code in index.snomed:
        return make(index.snomed[code], "snomed")
    elif system == NDC and code in index.ndc:
        return make(index.ndc[code], "ndc")
    return []


_ADDED_AMOUNT = re.compile(r"\d+(?:\.\d+)?\s*(?:meq|mmol)\b")


def _match_text(text: str, index: _Index) -> list[Match]:
    found = index.text_matches.get(text)
    if found is None:
        if len(index.text_matches) >= _TEXT_CACHE_SIZE:
            index.text_matches.clear()
        found = index.text_matches[text] = tuple(_scan_text(text, index))
    return list(found)


def _scan_text(text: str, index: _Index) -> list[Match]:
    lowered = " ".join(text.lower().split())
    if any(fluid in lowered for fluid in index.fluids) and not _ADDED_AMOUNT.search(lowered):
        return []  # a balanced crystalloid: its K / Mg salts are maintenance, not replacement
    for phrase in index.exclusions:
        lowered = lowered.replace(phrase, " ")
    found: dict[str, Match] = {}
    for pattern, ingredient in index.names:
        if ingredient not in found and pattern.search(lowered):
            found[ingredient] = Match(ingredient, index.ingredient_classes.get(ingredient, ()), "text")
    return list(found.values())


def classify(codings: Iterable[Coding], texts: Iterable[str]) -> list[Match]:
    """Ingredients of a medication from its codings, else from its texts (lower confidence).

    Combination products yield one match per ingredient. Returns [] when nothing is recognised.
    """
    index = _index()
    coded: dict[str, Match] = {}
    for coding in codings:
        for match in _match_coding(coding, index):
            coded.setdefault(match.ingredient, match)
    if coded:
        return list(coded.values())
    textual: dict[str, Match] = {}
    for text in texts:
        for match in _match_text(text, index):
            textual.setdefault(match.ingredient, match)
    return list(textual.values())
