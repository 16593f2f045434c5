"""Processing one batch of events: upsert each patient's timeline, evaluate as of the patient's clock,
apply the decisions. Called by the Celery task; the same function runs in embedded (eager) mode."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import cache
from typing import Any

import redis

from rules.catalog import Catalog, load_catalog
from rules.engine import evaluate
from rules.model import Rule
from workers import keys
from workers.events import Event
from workers.observability.logging import patient_ref
from workers.redis_conn import get_redis
from workers.settings import get_settings
from workers.store import Store

log = logging.getLogger("ehr_alerts.pipeline")


@cache
def get_catalog() -> Catalog:
    """The rule catalog, loaded (and self-tested) once per process."""
    return load_catalog()


@cache
def get_store() -> Store:
    """The store on this process's Redis connection."""
    return Store(get_redis(), get_settings())


def process_batch(raw_events: Iterable[dict[str, Any]], store: Store | None = None) -> Counter[str]:
    """Process a batch; returns counters (stored, duplicate, stale, alerts_opened, ...)."""
    store = store or get_store()
    rules = get_catalog().evaluated()
    by_patient: dict[str, list[Event]] = defaultdict(list)
    for raw in raw_events:
        event = Event.model_validate(raw)
        by_patient[event.patient].append(event)
    counts: Counter[str] = Counter()
    for patient, events in by_patient.items():
        try:
            _process_patient(store, rules, patient, events, counts)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            raise  # transient: the task retries the batch (idempotent)
        except Exception as exc:  # a poison event must not block the patients after it
            log.exception("events dead-lettered", extra={"events": len(events), "patient_ref": patient_ref(patient)})
            store.dead_letter(f"{type(exc).__name__}: {exc}", [e.model_dump(mode="json") for e in events])
            counts["events_dead_lettered"] += len(events)
    if by_patient:
        store.client.sadd(keys.patients(), *by_patient)
    store.count(**counts)
    return counts


def _process_patient(store: Store, rules: list[Rule], patient: str, events: list[Event], counts: Counter[str]) -> None:
    timeline = store.upsert(patient, events)
    counts.update(f"events_{s}" for s in timeline.statuses)
    # by resource type, for the metrics (workers.observability.metrics)
    counts.update(f"events_{s}:{e.resource.split('/')[0]}" for e, s in zip(events, timeline.statuses, strict=False))
    # Evaluate even when every event was a duplicate: a worker may have died between storing the facts
    # and applying the decisions, and the redelivered task must finish that work (apply is idempotent).
    decisions = evaluate(rules, timeline.facts, timeline.clock, patient)
    counts.update(f"decisions_{d.outcome}" for d in decisions)
    counts.update(f"decisions_{d.outcome}:{d.rule_id}" for d in decisions)
    for rule_id, action, _ in store.apply(timeline, decisions):
        if action not in ("none", "stale"):
            counts[f"alerts_{action}"] += 1
            counts[f"alerts_{action}:{rule_id}"] += 1
        elif action == "stale":
            counts["decisions_stale"] += 1
