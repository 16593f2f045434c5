"""The alert detail in clinical words: why it fired, the evidence table and the medication context.

Everything here turns stored data (ISO UTC times, LOINC long names, the engine's input names) into what a
clinician reads: short test names from the value sets, local times in the display zone, one row per fact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from config.localtime import format_instant
from rules.facts import Fact, format_decimal
from service.review.labels import short_concept
from workers.state.review_index import epoch

_ISO = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})")
_PREFIX = re.compile(r"^(Fires|Does not fire|Indeterminate):\s*")
LAB_CONCEPTS = ("potassium", "magnesium", "qtc")
MEDICATION_KINDS = ("medication", "order")


def duration(seconds: float) -> str:
    """``2 d 6 h``, ``3 h 10 min``, ``12 min`` (``<1 min`` under a minute)."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {rest // 60} min"
    return f"{rest // 60} min" if rest >= 60 else "<1 min"


def why_lines(explanation: str | None, evidence: Iterable[dict[str, Any]], zone: str | None = None) -> list[str]:
    """The engine's explanation as short clinical sentences: one per condition, lab long names replaced by the
    test's short name, times in the display zone."""
    if not explanation:
        return []
    text = _PREFIX.sub("", explanation.strip())
    names = {e["display"]: short_concept(e["concept"]) for e in evidence if e.get("display") and e.get("concept")}
    for long_name in sorted(names, key=len, reverse=True):
        if names[long_name] and long_name != names[long_name] and _is_lab_name(long_name):
            text = text.replace(long_name, names[long_name])
    text = _ISO.sub(lambda m: format_instant(m.group(0), zone), text)
    return [line[:1].upper() + line[1:] for line in (part.strip() for part in text.split("; and ")) if line]


def _is_lab_name(name: str) -> bool:
    return "[" in name or name.lower().startswith(("potassium", "magnesium", "q-t", "qt"))


def evidence_rows(
    evidence: Iterable[dict[str, Any]], as_of: str | None, zone: str | None = None
) -> list[dict[str, Any]]:
    """One row per fact the alert rests on (an input listing the same fact twice gives one row): test, what
    (drug or finding for non-lab facts), value as the lab reported it and in the rule's unit when that
    differs, local time, and how long before the decision it was."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    decided = epoch(as_of)
    for item in evidence:
        key = (str(item.get("reference")), str(item.get("concept")))
        if key in seen:
            continue
        seen.add(key)
        lab = item.get("concept") in LAB_CONCEPTS
        reported = item.get("reported")
        canonical = _canonical(item)
        time = item.get("time")
        rows.append(
            {
                "test": short_concept(item.get("concept")),
                "what": None if lab else item.get("display"),
                "reported": reported or canonical,
                "canonical": canonical if reported and canonical and _differs(reported, canonical) else None,
                "time": format_instant(time, zone),
                "before": duration(decided - epoch(time)) if time and decided and decided >= epoch(time) else None,
                "reference": item.get("reference"),
                "notes": [n for n in item.get("notes") or [] if n],
            }
        )
    rows.sort(key=lambda r: (r["test"], r["time"]))
    return rows


def _canonical(item: dict[str, Any]) -> str | None:
    value, unit = item.get("value"), item.get("unit")
    if value in (None, ""):
        return None
    try:
        shown = format_decimal(Decimal(str(value)))
    except InvalidOperation:
        shown = str(value)
    return f"{shown} {unit or ''}".strip()


def _differs(reported: str, canonical: str) -> bool:
    return reported.replace(" ", "").lower() != canonical.replace(" ", "").lower()


def medication_rows(
    facts: Iterable[Fact], since: datetime, until: datetime, zone: str | None = None
) -> list[dict[str, Any]]:
    """Diuretics, K and Mg therapy and their orders active at any time in ``[since, until]``, newest first:
    class, drug, status, from, to (``ongoing`` when open)."""
    rows = []
    seen: set[tuple[str, str]] = set()
    for fact in facts:
        if fact.kind not in MEDICATION_KINDS or fact.start is None or fact.retracted:
            continue
        if fact.start > until or (fact.end is not None and fact.end < since):
            continue
        key = (fact.reference, fact.concept)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "class": short_concept(fact.concept),
                "drug": fact.display or "",
                "status": fact.status or "",
                "order": fact.kind == "order",
                "start": format_instant(fact.start, zone),
                "end": format_instant(fact.end, zone) if fact.end else "ongoing",
                "sort": fact.start.timestamp(),
                "reference": fact.reference,
            }
        )
    rows.sort(key=lambda r: -r["sort"])
    return rows
