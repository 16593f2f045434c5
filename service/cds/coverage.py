"""What one CDS Hooks call could check when some prefetch data could not be had.

Partial data never hides what is already known, and never raises or hides advice on its own:

- a rule that reads no key with a gap is evaluated on the call's data as usual;
- a rule that reads a key with a gap is *not checked* by the call: its result on the incomplete data is
  treated as indeterminate, so the patient's stored alert for it (computed by the stream from complete
  data) is shown, with a note saying what this call could not check, and nothing new is raised or closed;
- the call answers 412 only when nothing can be said at all: no card to show and at least one rule not
  checked because a key could not be had at all (an empty ``cards`` array would read "all clear" for a
  rule nobody checked). A key of which only the first page could be read (``link`` next without a usable
  ``fhirServer``) still answers 200 (§17 item 33).

Every gap and every rule not checked is logged (keys, kinds and rule ids only) and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rules.model import Rule
from service.cds import metrics
from service.cds.errors import issue
from service.cds.fhir_client import Gap
from service.cds.services import PrefetchQuery, keys_read_by

log = logging.getLogger("ehr_alerts.cds")


@dataclass
class Coverage:
    """The gaps of one call and the rules they leave unchecked (rule id -> the gaps of keys it reads)."""

    gaps: dict[str, Gap] = field(default_factory=dict)
    unchecked: dict[str, tuple[Gap, ...]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # key -> what it holds, in words

    def notes(self) -> dict[str, str]:
        """Rule id -> the Markdown note put on its card: what this call could not check."""
        out = {}
        for rule_id, gaps in self.unchecked.items():
            missing = [self.labels.get(g.key, g.key) for g in gaps if not g.partial]
            partly = [self.labels.get(g.key, g.key) for g in gaps if g.partial]
            said = []
            if missing:
                said.append(f"{_join(missing)} could not be retrieved")
            if partly:
                said.append(f"{_join(partly)} could only be partly retrieved")
            out[rule_id] = (
                f"*Not re-checked with the data of this request: {'; '.join(said)}. "
                "Shown as last assessed by ehr-alerts from the patient's full record.*"
            )
        return out

    def refuses(self, cards: list[dict[str, Any]]) -> bool:
        """True when nothing can be said: no card, and a rule left unchecked by a key not had at all."""
        return not cards and any(not g.partial for gaps in self.unchecked.values() for g in gaps)

    def outcome(self) -> dict[str, Any]:
        """The 412 OperationOutcome: one issue per gap, naming the key, the reason and the rules it left unchecked."""
        issues = []
        for key, gap in sorted(self.gaps.items()):
            rules = sorted(r for r, gaps in self.unchecked.items() if any(g.key == key for g in gaps))
            text = f"required data unavailable: prefetch key {key!r} ({self.labels.get(key, key)}): {gap.reason}"
            if rules:
                text += f"; not checked: {', '.join(rules)}"
            issues.append(issue(text, f"prefetch.{key}", gap.issue_code()))
        return {"resourceType": "OperationOutcome", "issue": issues}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def coverage(gaps: Mapping[str, Gap], rules: Iterable[Rule], queries: tuple[PrefetchQuery, ...]) -> Coverage:
    """The rules (active ones: shadow rules are never shown) that the gaps leave unchecked."""
    found = Coverage(dict(gaps), labels={q.key: q.label for q in queries})
    if not gaps:
        return found
    for rule in rules:
        if rule.status != "active":
            continue
        hit = tuple(gaps[k] for k in sorted(keys_read_by(rule, queries)) if k in gaps)
        if hit:
            found.unchecked[rule.id] = hit
    return found


def report(found: Coverage, queries: tuple[PrefetchQuery, ...], service_id: str) -> None:
    """Log and count the gaps of a call and the rules they left unchecked (no ids, no values)."""
    if not found.gaps:
        return
    known = frozenset(q.key for q in queries)
    for gap in found.gaps.values():
        metrics.record_gap(gap.key, gap.kind, known)
    for rule_id in found.unchecked:
        metrics.record_unchecked(rule_id)
    log.warning(
        "cds call with prefetch data it could not have",
        extra={
            "service": service_id,
            "gaps": {k: {"kind": g.kind, "partial": g.partial, "reason": g.reason} for k, g in found.gaps.items()},
            "rules_unchecked": sorted(found.unchecked),
        },
    )
