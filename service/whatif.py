"""``ehr-alerts what-if``: the same extract under two rule set-ups (site profiles or rule folders), compared.

Each set-up replays the extract the way the stream would decide it, without Redis: the events are read through
the ingestion code, put in feed order (:func:`service.replay.feed_order`), and each patient's events go through
:func:`workers.steps.plan_patient` on an empty timeline (the pure core of a worker's batch: it decides exactly
what one event at a time would, with the clock, retention and due times), then time runs to the end of the feed.
An *alert* is an episode of a rule firing for a patient: it opens at the first firing decision and closes at the
first decision that does not fire (an indeterminate one keeps it open, as the alert store does). Shadow rules
are included: that is how a site sees a shadow rule's burden before promoting it.

The comparison matches alerts of the same patient and rule whose episodes overlap in time (a threshold change
moves an episode's start; it is still the same alert); the others are *added* (only under the candidate) or
*removed* (only under the base). Burden is alerts per 1,000 patient-days, a patient-day being a calendar day
(UTC) on which the patient has a clinical event in the extract.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from config.settings import Settings, get_settings
from rules.catalog import Catalog, load_catalog
from rules.fhirtime import isoformat
from rules.site import read_site_profile
from service.replay import collect, feed_order
from workers.events import Event, tick
from workers.state.review_index import severity_rank
from workers.state.timeline import PatientWindow
from workers.steps import plan_patient


@dataclass
class Alert:
    """One firing episode of a rule for a patient."""

    patient: str
    rule: str
    opened: datetime
    closed: datetime | None = None
    severity: str = ""
    summary: str = ""

    def overlaps(self, other: Alert) -> bool:
        """Same patient and rule, and the episodes share some time (an episode still open runs to the end)."""
        if self.patient != other.patient or self.rule != other.rule:
            return False
        ends = [t for t in (self.closed, other.closed) if t is not None]
        return not ends or max(self.opened, other.opened) <= min(ends)

    def row(self) -> dict[str, Any]:
        """The alert as the JSON output and the tests read it."""
        return {
            "patient": self.patient,
            "rule": self.rule,
            "opened": isoformat(self.opened),
            "closed": isoformat(self.closed),
            "severity": self.severity,
            "summary": self.summary,
        }


@dataclass
class Setup:
    """One side of the comparison: a name, its catalog, and what it raised on the extract."""

    name: str
    catalog: Catalog
    alerts: list[Alert] = field(default_factory=list)

    def status(self, rule_id: str) -> str:
        rule = self.catalog.get(rule_id)
        return rule.status if rule else "-"


def setup(name: str, site: Path | None, rules_dir: Path | None, settings: Settings) -> Setup:
    """A catalog as a deployment would run it with this site profile / rule folder."""
    profile = read_site_profile(site) if site else None
    catalog = load_catalog(rules_dir).configure(
        site=profile, display_zone=settings.display_timezone, file=site.name if site else ""
    )
    return Setup(name, catalog)


def _statuses(events: Sequence[Event], settings: Settings) -> list[str]:
    """What the timeline store would answer for each event in arrival order, as ``store_events.lua`` decides it:
    a new resource or a version that does not rank lower is stored, the same version again is a duplicate, an
    older one is stale."""
    kept: dict[str, tuple[str, str]] = {}
    out = []
    for event in events:
        if event.kind == "tick":
            out.append("tick")
            continue
        rank = event.rank()
        value = json.dumps([event.expires(settings).isoformat(), [f.model_dump(mode="json") for f in event.facts]])
        old = kept.get(event.resource)
        if old is None:
            status = "stored"
        elif old[1] == value and old[0] == rank:
            status = "duplicate"
        else:
            status = "stale" if rank < old[0] else "stored"
        if status == "stored":
            kept[event.resource] = (rank, value)
        out.append(status)
    return out


def alerts_of(catalog: Catalog, events: Sequence[Event], feed_end: datetime | None, settings: Settings) -> list[Alert]:
    """Every alert the catalog's evaluated rules (active and shadow) raise on the events, per patient."""
    by_patient: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_patient[event.patient].append(event)
    rules = catalog.evaluated()
    found: list[Alert] = []
    for patient, patient_events in sorted(by_patient.items()):
        sequence = [*patient_events, *([tick(patient, feed_end)] if feed_end else [])]
        window = PatientWindow(patient, 0, None, None, {}, _statuses(sequence, settings), {})
        plan = plan_patient(
            window,
            sequence,
            rules,
            tolerance_hours=settings.future_tolerance_hours,
            expires=lambda e: e.expires(settings),
        )
        open_: dict[str, Alert] = {}
        for step in plan.steps:
            for decision in step.decisions:
                alert = open_.get(decision.rule_id)
                if decision.outcome == "fires":
                    summary = (decision.card or {}).get("summary", "")
                    if alert is None:
                        alert = open_[decision.rule_id] = Alert(patient, decision.rule_id, step.as_of)
                        found.append(alert)
                    alert.severity = _worse(alert.severity, decision.severity or "")
                    alert.summary = alert.summary or summary
                elif decision.outcome == "not-fires" and alert is not None:
                    alert.closed = step.as_of
                    del open_[decision.rule_id]
    return found


def _worse(a: str, b: str) -> str:
    return a if severity_rank(a) <= severity_rank(b) else b


def patient_days(events: Sequence[Event]) -> int:
    """Calendar days (UTC) on which a patient has a clinical event (a result, an order, a diagnosis, an encounter;
    not a Patient record), summed over patients."""
    clinical = [e for e in events if e.kind == "resource" and not e.is_delete and not e.context_only]
    return len({(e.patient, e.event_time.date()) for e in clinical})


@dataclass
class Comparison:
    """The two set-ups on one extract: per rule counts and the alerts added and removed."""

    base: Setup
    candidate: Setup
    patient_days: int
    patients: int
    added: list[Alert]
    removed: list[Alert]

    def rules(self) -> list[str]:
        ids = {r.id for r in self.base.catalog.rules} | {r.id for r in self.candidate.catalog.rules}
        return sorted(ids)

    def per_1000(self, count: int) -> float:
        return 1000 * count / max(self.patient_days, 1)

    def table_rows(self) -> list[dict[str, Any]]:
        """Per rule: status, alerts, added, removed and burden per 1,000 patient-days on each side."""
        rows = []
        for rule in self.rules():
            a = sum(1 for x in self.base.alerts if x.rule == rule)
            b = sum(1 for x in self.candidate.alerts if x.rule == rule)
            rows.append(
                {
                    "rule": rule,
                    "status": f"{self.base.status(rule)} -> {self.candidate.status(rule)}",
                    "alerts_base": a,
                    "alerts_candidate": b,
                    "added": sum(1 for x in self.added if x.rule == rule),
                    "removed": sum(1 for x in self.removed if x.rule == rule),
                    "per_1000_patient_days_base": round(self.per_1000(a), 1),
                    "per_1000_patient_days_candidate": round(self.per_1000(b), 1),
                }
            )
        return rows

    def as_json(self) -> dict[str, Any]:
        return {
            "base": self.base.name,
            "candidate": self.candidate.name,
            "patients": self.patients,
            "patient_days": self.patient_days,
            "rules": self.table_rows(),
            "added": [a.row() for a in self.added],
            "removed": [a.row() for a in self.removed],
        }


def compare(paths: list[Path], base: Setup, candidate: Setup, console: Console) -> Comparison:
    """Read the extract once, replay it under both set-ups, and match their alerts."""
    settings = get_settings()
    collector, _ = collect(paths, console)
    events = feed_order(collector.events)
    feed_end = max((e.received for e in events if e.received), default=None)
    base.alerts = alerts_of(base.catalog, events, feed_end, settings)
    candidate.alerts = alerts_of(candidate.catalog, events, feed_end, settings)
    added = [b for b in candidate.alerts if not any(b.overlaps(a) for a in base.alerts)]
    removed = [a for a in base.alerts if not any(a.overlaps(b) for b in candidate.alerts)]
    patients = len({e.patient for e in events})
    return Comparison(base, candidate, patient_days(events), patients, added, removed)


def print_comparison(found: Comparison, console: Console) -> None:
    """The per-rule table and the alerts added and removed, as a pharmacy team reads them."""
    console.print(
        f"extract: {found.patients} patients, {found.patient_days} patient-days (days with a clinical event); "
        f"base: {found.base.name}; candidate: {found.candidate.name}"
    )
    table = Table("rule", "status", "alerts base", "alerts cand.", "added", "removed", "/1,000 pt-days base",
                  "/1,000 pt-days cand.")  # fmt: skip
    for row in found.table_rows():
        table.add_row(
            row["rule"],
            row["status"],
            str(row["alerts_base"]),
            str(row["alerts_candidate"]),
            str(row["added"]),
            str(row["removed"]),
            f"{row['per_1000_patient_days_base']:.1f}",
            f"{row['per_1000_patient_days_candidate']:.1f}",
        )
    console.print(table)
    for title, alerts in (("added (candidate only)", found.added), ("removed (base only)", found.removed)):
        if not alerts:
            console.print(f"alerts {title}: none")
            continue
        listing = Table("patient", "rule", "opened", "severity", "card summary", title=f"alerts {title}")
        for alert in alerts:
            listing.add_row(alert.patient, alert.rule, isoformat(alert.opened) or "", alert.severity, alert.summary)
        console.print(listing)
