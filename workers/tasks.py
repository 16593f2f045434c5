"""Celery tasks."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task

from workers.celery_app import app
from workers.pipeline import get_store, process_batch

log = logging.getLogger("ehr_alerts.tasks")
MAX_RETRIES = 5


class _DeadLetterOnFailure(Task):
    """Send the batch to the dead-letter list when it fails for good; nothing is dropped silently."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        events = args[0] if args else kwargs.get("events", [])
        get_store().dead_letter(f"{type(exc).__name__}: {exc}", events, task_id)
        log.error("batch dead-lettered", extra={"task_id": task_id, "events": len(events)})


@app.task(
    bind=True,
    base=_DeadLetterOnFailure,
    name="ehr_alerts.process_events",
    autoretry_for=(redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError),
    retry_backoff=True,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def process_events(self: Task, events: list[dict[str, Any]]) -> dict[str, int]:
    """Process a batch of normalised events (see ``workers.events.Event``)."""
    return dict(process_batch(events))


@app.task(name="ehr_alerts.noop")
def noop(event: dict[str, Any]) -> None:
    """Does nothing: the per-task overhead baseline for the stream benchmark."""
