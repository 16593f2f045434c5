"""Replaying one patient's batch event by event: what a batch decides is exactly what its events one at a time
would decide.

The timeline store returns the patient's facts as they were *before* the batch (only the window the rules can
read) and whether each event was stored, a duplicate or an older version. Here the events are applied to that
state in arrival order; after each one that changed something the rules are evaluated at the patient's clock,
with the facts (versions and retention included) known at that point. Time runs between events too: when the
clock moves past a due time (evidence leaving a look-back, a future-dated result coming due) the patient is
evaluated at that time first, with the facts of before the event. Pure: no Redis, no wall clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from rules.engine import Decision, evaluate, evaluate_rule
from rules.facts import Fact
from rules.fhirtime import parse_time
from rules.model import Rule
from workers.events import Event
from workers.state.timeline import PatientWindow, StoredResource

#: Most evaluations by time alone between two events (a guard; each one moves the clock forward).
MAX_TIME_STEPS = 200

Close = str  # "resolved" | "expired" | "withdrawn" (the store turns a close citing retracted data into "retracted")


@dataclass
class Step:
    """One evaluation of the patient: when, what every rule decided, the retracted resources in the timeline
    at that point, and for every open alert whose rule stopped firing why it closes."""

    as_of: datetime
    decisions: list[Decision]
    retracted: list[str]
    closes: dict[str, Close] = field(default_factory=dict)


@dataclass
class PatientPlan:
    """The steps of one patient's batch, and the patient's clock and due time after them."""

    patient: str
    version: int
    steps: list[Step]
    clock: datetime | None
    due: datetime | None
    counts: Counter[str] = field(default_factory=Counter)


def _facts(resources: dict[str, StoredResource], as_of: datetime) -> list[Fact]:
    """The facts readable at ``as_of``: retention is applied here, whatever Redis has pruned already."""
    return [fact for stored in resources.values() if stored.expires >= as_of for fact in stored.facts]


def _next_change(decisions: Sequence[Decision], as_of: datetime) -> datetime | None:
    times = []
    for decision in decisions:
        change = getattr(decision, "next_change", None)
        if isinstance(change, str):
            change = parse_time(change)
        if change is not None and change > as_of:
            times.append(change)
    return min(times, default=None)


class _Replay:
    """The mutable state of one patient's replay."""

    def __init__(self, window: PatientWindow, rules: Sequence[Rule]) -> None:
        self.window = window
        self.rules = list(rules)
        self.by_id = {rule.id: rule for rule in self.rules}
        self.resources = dict(window.resources)
        self.clock = window.clock
        self.due = window.due if window.due and window.clock and window.due > window.clock else None
        self.open = set(window.open_alerts)  # rules with an open alert
        self.steps: list[Step] = []
        self.counts: Counter[str] = Counter()

    def evaluate(self, as_of: datetime, before: Callable[[], list[Fact]] | None) -> None:
        """Evaluate every rule at ``as_of``; ``before`` gives the facts as they were before the current event
        (None: time alone moved), to tell an alert whose evidence aged out from one whose evidence changed."""
        facts = _facts(self.resources, as_of)
        decisions = evaluate(self.rules, facts, as_of, self.window.patient)
        closes: dict[str, Close] = {}
        for decision in decisions:
            self.counts[f"decisions_{decision.outcome}"] += 1
            self.counts[f"decisions_{decision.outcome}:{decision.rule_id}"] += 1
            if decision.outcome == "fires":
                self.open.add(decision.rule_id)
            elif decision.outcome == "not-fires" and decision.rule_id in self.open:
                self.open.discard(decision.rule_id)
                closes[decision.rule_id] = self._why_closed(decision, as_of, before)
        retracted = sorted(
            {f"{f.resource_type}/{f.resource_id}" for s in self.resources.values() for f in s.facts if f.retracted}
        )
        self.steps.append(Step(as_of, decisions, retracted, closes))
        self.clock = as_of
        self.due = _next_change(decisions, as_of)

    def _why_closed(self, decision: Decision, as_of: datetime, before: Callable[[], list[Fact]] | None) -> Close:
        if decision.resolves:
            return "resolved"
        if before is None:
            return "expired"
        # Same time, the facts of before the event: still not firing means time alone closed it.
        previous = evaluate_rule(self.by_id[decision.rule_id], before(), as_of, self.window.patient)
        return "withdrawn" if previous.outcome == "fires" else "expired"

    def run_time(self, until: datetime, *, inclusive: bool) -> None:
        """Let time run up to ``until``: evaluate at every due time before it (or at it, ``inclusive``)."""
        for _ in range(MAX_TIME_STEPS):
            due = self.due
            if due is None or self.clock is None or due <= self.clock:
                return
            if due > until or (due == until and not inclusive):
                return
            self.evaluate(due, None)

    def apply(self, event: Event, status: str, tolerance_hours: float, settings_expires: datetime | None) -> None:
        """Apply one event as it arrived, then evaluate if it changed anything."""
        target = event.clock_time(tolerance_hours)
        if event.kind == "tick":
            self.run_time(event.received or event.event_time, inclusive=True)
            return
        if target is not None:
            self.run_time(target, inclusive=False)
        changed = False
        previous: StoredResource | None = None
        if status == "stored":
            previous = self.resources.get(event.resource)
            self.resources[event.resource] = StoredResource(event.rank(), settings_expires, tuple(event.facts))
            changed = True
        if target is not None and (self.clock is None or target > self.clock):
            self.clock = target
            changed = True
        if changed and self.clock is not None:
            self.evaluate(self.clock, self._before(event.resource, previous) if status == "stored" else None)

    def _before(self, resource: str, previous: StoredResource | None) -> Callable[[], list[Fact]]:
        def facts() -> list[Fact]:
            resources = dict(self.resources)
            if previous is None:
                resources.pop(resource, None)
            else:
                resources[resource] = previous
            return _facts(resources, self.clock)  # type: ignore[arg-type]

        return facts


def plan_patient(
    window: PatientWindow,
    events: Sequence[Event],
    rules: Sequence[Rule],
    *,
    tolerance_hours: float,
    expires: Callable[[Event], datetime],
) -> PatientPlan:
    """Replay one patient's events (arrival order) on the state the store returned; see the module text."""
    replay = _Replay(window, rules)
    for event, status in zip(events, window.statuses, strict=True):
        replay.apply(event, status, tolerance_hours, expires(event) if status == "stored" else None)
    if not replay.steps and replay.clock is not None and any(e.kind != "tick" for e in events):
        # Nothing new (a redelivered batch): decide once at the clock, so work a crashed worker left is finished.
        replay.evaluate(replay.clock, None)
    return PatientPlan(window.patient, window.version, replay.steps, replay.clock, replay.due, replay.counts)
