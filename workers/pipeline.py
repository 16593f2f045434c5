"""Processing one batch of events: upsert each patient's timeline, evaluate as of the patient's clock,
apply the decisions. Called by the Celery task; the same function runs in embedded (eager) mode."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from functools import cache
from typing import Any

import redis

from config.settings import get_settings
from rules.catalog import Catalog, load_catalog
from rules.engine import Decision, evaluate
from workers.events import Event
from workers.observability.logging import patient_ref
from workers.state.connection import get_redis
from workers.state.store import Store, Timeline

log = logging.getLogger("ehr_alerts.pipeline")


@cache
def get_catalog() -> Catalog:
    """The rule catalog, loaded (and self-tested) once per process."""
    return load_catalog()


@cache
def get_store() -> Store:
    """The store on this process's Redis connection."""
    return Store(get_redis(), get_settings())


def evaluation_times(timeline: Timeline, events: list[Event]) -> list[datetime]:
    """The instants to evaluate a patient at after an upsert, in order: each new event time after the
    clock the patient had before this batch, then the patient's clock. So a batch gives the alerts (and
    their history) that one event at a time would: an alert that opens and resolves within one batch
    (a backfill brings a whole stay at once) is still recorded. Late events (before the old clock) are
    only seen as of the clock, as they would be one at a time."""
    before = timeline.previous_clock
    times = sorted({e.event_time for e in events if (before is None or e.event_time > before)} - {timeline.clock})
    return [t for t in times if t < timeline.clock] + [timeline.clock]


_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def process_batch(raw_events: Iterable[dict[str, Any]], store: Store | None = None) -> Counter[str]:
    """Process a batch; returns counters (stored, duplicate, stale, alerts_opened, ...).

    Three round trips to Redis per batch whatever the number of patients: every patient's timeline
    upsert (one atomic script each, pipelined), then every patient's decisions (idem), then the
    bookkeeping. A patient whose events fail (a poison event) is dead-lettered without blocking the
    others; transient Redis errors raise, and the task retries the whole batch (idempotent).
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

    failed: set[str] = set()

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

    planned: list[tuple[Timeline, list[Decision]]] = []
    for patient, timeline in store.upsert_many(by_patient).items():
        if isinstance(timeline, Exception):
            poison(patient, timeline)
            continue
        counts.update(f"events_{s}" for s in timeline.statuses)
        # by resource type, for the metrics (workers.observability.metrics)
        events = by_patient[patient]
        counts.update(f"events_{s}:{e.resource.split('/')[0]}" for e, s in zip(events, timeline.statuses, strict=False))
        # Evaluate even when every event was a duplicate: a worker may have died between storing the facts
        # and applying the decisions, and the redelivered task must finish that work (apply is idempotent).
        try:
            for as_of in evaluation_times(timeline, by_patient[patient]):
                decisions = evaluate(rules, timeline.facts, as_of, patient)
                counts.update(f"decisions_{d.outcome}" for d in decisions)
                counts.update(f"decisions_{d.outcome}:{d.rule_id}" for d in decisions)
                planned.append((replace(timeline, clock=as_of), decisions))
        except Exception as exc:  # a poison event must not block the patients after it
            poison(patient, exc)
            planned = [p for p in planned if p[0].patient != patient]
            continue
    changed: dict[str, str] = {}
    for (timeline, _), results in zip(planned, store.apply_many(planned), strict=True):
        patient = timeline.patient
        if isinstance(results, Exception):
            if patient not in failed:
                failed.add(patient)
                poison(patient, results)
            continue
        for rule_id, action, alert_id in results:
            if action not in ("none", "stale"):
                counts[f"alerts_{action}"] += 1
                counts[f"alerts_{action}:{rule_id}"] += 1
            elif action == "stale":
                counts["decisions_stale"] += 1
            if alert_id and action not in ("none", "stale", "suppressed"):
                changed[alert_id] = patient
    stored = {e.resource: p for p, events in by_patient.items() if p not in failed for e in events if not e.tombstone}
    store.record(changed, patients=set(by_patient), counts=counts, resources=stored)
    return counts
