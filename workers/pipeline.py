"""Processing one batch of events: store each patient's events, replay them one by one on the patient's
timeline (``workers.steps``), apply the decisions. Called by the Celery task; the same function runs in
embedded (eager) mode."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any

import redis

from config.settings import get_settings
from rules.catalog import Catalog, load_catalog
from rules.model import Rule
from rules.site import read_site_profile
from workers.events import Event, clock_text
from workers.observability.logging import patient_ref
from workers.state import context_index
from workers.state.alerts import decision_body
from workers.state.connection import get_redis
from workers.state.data_problems import DataProblem, DataProblems
from workers.state.store import CLOSED_STATUSES, Store
from workers.steps import PatientPlan, plan_patient

log = logging.getLogger("ehr_alerts.pipeline")
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


@cache
def get_catalog() -> Catalog:
    """The rule catalog as this deployment runs it, loaded (and self-tested) once per process: the site profile
    (``EHR_ALERTS_SITE_PROFILE``) applied and card times in ``EHR_ALERTS_DISPLAY_TIMEZONE``. The CDS Hooks service,
    the review API and replay use this same catalog."""
    settings = get_settings()
    site = read_site_profile(settings.site_profile) if settings.site_profile else None
    file = settings.site_profile.name if settings.site_profile else ""
    return load_catalog().configure(site=site, display_zone=settings.display_timezone, file=file)


@cache
def get_store() -> Store:
    """The store on this process's Redis connection."""
    return Store(get_redis(), get_settings())


def window_pad_hours(rules: Sequence[Rule]) -> float:
    """How far before the earliest evaluation time a batch must read the timeline: the longest look-back of
    any input, its anchor's included (inf when an input reads a whole record of results)."""
    longest = 0.0
    for rule in rules:
        for spec in rule.inputs.values():
            if spec.lookback is None:
                if spec.select != "active":
                    return math.inf
                continue
            hours = rule.parameters[spec.lookback].hours or 0.0
            for other in (getattr(spec, "anchor", None), getattr(spec, "since", None)):
                if other and rule.inputs[other].lookback:
                    hours += rule.parameters[rule.inputs[other].lookback].hours or 0.0
            longest = max(longest, hours)
    return longest


def process_batch(raw_events: Iterable[dict[str, Any]], store: Store | None = None) -> Counter[str]:
    """Process a batch; returns counters (events stored / duplicate / stale, decisions, alerts opened, ...).

    Three round trips to Redis per batch whatever the number of patients: every patient's store (one atomic
    script each, pipelined), then every patient's decisions (idem), then the bookkeeping. A patient whose
    events fail at any stage (a poison event) is dead-lettered without taking the others along; transient
    Redis errors raise, and the task retries the whole batch (idempotent).
    """
    store = store or get_store()
    rules = get_catalog().evaluated()
    by_patient: dict[str, list[Event]] = defaultdict(list)
    for raw in raw_events:
        event = Event.model_validate(raw)
        by_patient[event.patient].append(event)
    counts: Counter[str] = Counter()
    if not by_patient:
        return counts

    def poison(patient: str, exc: BaseException) -> None:
        if isinstance(exc, _TRANSIENT):
            raise exc
        log.error(
            "events dead-lettered",
            extra={"events": len(by_patient[patient]), "patient_ref": patient_ref(patient)},
            exc_info=exc,
        )
        store.dead_letter(f"{type(exc).__name__}: {exc}", [e.model_dump(mode="json") for e in by_patient[patient]])
        counts["events_dead_lettered"] += len(by_patient[patient])

    settings = store.settings
    plans: dict[str, PatientPlan] = {}
    pruned: list[str] = []
    context: list[tuple[str, int, dict[str, Any] | None]] = []
    for patient, window in store.timelines.store_many(by_patient, window_pad_hours(rules)).items():
        if isinstance(window, Exception):
            poison(patient, window)
            continue
        events = by_patient[patient]
        for event, status in zip(events, window.statuses, strict=True):
            if event.kind != "tick":
                counts[f"events_{status}"] += 1
                counts[f"events_{status}:{event.resource.split('/')[0]}"] += 1  # for the metrics
        pruned.extend(window.pruned)
        try:
            plans[patient] = plan_patient(
                window,
                events,
                rules,
                tolerance_hours=settings.future_tolerance_hours,
                expires=lambda e: e.expires(settings),
            )
        except Exception as exc:  # a poison event must not block the patients after it
            poison(patient, exc)
            continue
        counts.update(plans[patient].counts)
        if context_index.touches_context(events, window):
            summary = context_index.summary(context_index.final_facts(events, window), plans[patient].clock)
            context.append((patient, plans[patient].version, summary))

    changed, closed, due, failed = _apply(store, plans, counts, poison)
    problems = [*_indeterminate_causes(plans), *_future_dated(by_patient, settings.future_tolerance_hours)]
    if problems:
        DataProblems(store.client).record_many(problems)
    received = {
        e.resource: p for p, events in by_patient.items() if p not in failed for e in events if e.kind == "resource"
    }
    context_index.ContextIndex(store.client).write([c for c in context if c[0] not in failed])
    store.record(
        changed,
        patients={p for p, events in by_patient.items() if any(e.kind != "tick" for e in events)},
        counts=counts,
        resources=received,
        forgotten=pruned,  # after the resources received: one stored and pruned in the same call is gone
        due=due,
        closed=closed,
    )
    return counts


def _apply(
    store: Store, plans: dict[str, PatientPlan], counts: Counter[str], poison: Any
) -> tuple[dict[str, str], set[str], dict[str, datetime | None], set[str]]:
    """Apply every patient's steps in one round trip; returns (changed alert id -> patient, the changed alerts
    whose last action closed them, due times of the patients whose steps were applied, patients that failed)."""
    calls = []
    for patient, plan in plans.items():
        if not plan.steps:
            continue
        steps = [_step_body(step) for step in plan.steps]
        meta = {"clock": clock_text(plan.clock), "clock_s": repr(plan.clock.timestamp())} if plan.clock else {}
        meta["due"] = clock_text(plan.due) if plan.due else ""
        calls.append((patient, plan.version, steps, meta))
    changed: dict[str, str] = {}
    closed: set[str] = set()
    due: dict[str, datetime | None] = {p: plan.due for p, plan in plans.items() if not plan.steps}
    failed: set[str] = set()
    for (patient, *_), results in zip(calls, store.alerts.apply_many(calls), strict=True):
        if isinstance(results, Exception):
            failed.add(patient)
            poison(patient, results)
            continue
        if results and results[0][1] == "stale":
            counts["decisions_stale"] += 1
            continue  # a newer timeline version was applied: its worker sets the due time
        due[patient] = plans[patient].due
        for rule_id, action, alert_id in results:
            if action in ("none", "suppressed"):
                continue
            counts[f"alerts_{action}"] += 1
            counts[f"alerts_{action}:{rule_id}"] += 1
            if alert_id:
                changed[alert_id] = patient
                if action in CLOSED_STATUSES:
                    closed.add(alert_id)
                else:
                    closed.discard(alert_id)
    return changed, closed, due, failed


def _indeterminate_causes(plans: dict[str, PatientPlan]) -> list[DataProblem]:
    """One data problem per fact an indeterminate decision rests on (the data-problems queue's items)."""
    found: dict[str, DataProblem] = {}
    for plan in plans.values():
        for step in plan.steps:
            for decision in step.decisions:
                if decision.outcome != "indeterminate":
                    continue
                for fact in decision.problem_facts:
                    problem = DataProblem.from_fact(fact, as_of=decision.as_of, rule_id=decision.rule_id)
                    found.setdefault(f"{problem.id}|{decision.rule_id}", problem)
    return list(found.values())


def _future_dated(by_patient: dict[str, list[Event]], tolerance_hours: float) -> list[DataProblem]:
    """A data problem per event dated beyond the tolerance after its receipt (stored; it moves no clock)."""
    found = []
    for patient, events in by_patient.items():
        for event in events:
            if event.facts and event.is_future(tolerance_hours):
                received = event.received or event.event_time
                found.append(
                    DataProblem(
                        patient=patient,
                        reason="future-date",
                        detail=f"dated {clock_text(event.event_time)[:16]} UTC, more than {tolerance_hours:g} h after "
                        f"it was received ({clock_text(received)[:16]} UTC): it counts only once the patient's time "
                        "reaches it",
                        resources=(event.facts[0].reference,),
                        as_of=received,
                        concept=event.facts[0].concept,
                    )
                )
    return found


def _step_body(step: Any) -> dict[str, Any]:
    """One step as the apply script reads it: the decisions of the active rules (shadow rules are evaluated
    and counted, never shown), each not-firing one with the reason an open alert of its rule would close."""
    decisions = []
    for decision in step.decisions:
        if decision.rule_status == "active":
            close = step.closes.get(decision.rule_id, "resolved" if decision.resolves else "withdrawn")
            decisions.append(decision_body(decision, close if decision.outcome == "not-fires" else None))
    return {"as_of": clock_text(step.as_of), "retracted": step.retracted, "decisions": decisions}
