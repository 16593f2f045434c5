"""Celery tasks."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task

from workers import inbox
from workers.celery_app import app
from workers.pipeline import get_store, process_batch

log = logging.getLogger("ehr_alerts.tasks")
MAX_RETRIES = 5


class _DeadLetterOnFailure(Task):
    """Move the batch from the inbox to the dead-letter list when it fails for good (one transaction):
    nothing is dropped silently, and a poison batch is not re-delivered forever."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        batch_id = args[0] if args else kwargs["batch_id"]
        client = get_store().client
        events = inbox.claim(client, batch_id)
        if events is None:
            return  # another delivery of the same batch finished it
        record = {
            "task_id": task_id,
            "batch_id": batch_id,
            "failed_at": datetime.now(UTC).isoformat(),
            "reason": f"{type(exc).__name__}: {exc}",
            "events": events,
        }
        inbox.finish(client, batch_id, dead_letter=json.dumps(record))
        log.error("batch dead-lettered", extra={"task_id": task_id, "events": len(events)})


@app.task(
    bind=True,
    base=_DeadLetterOnFailure,
    name="ehr_alerts.process_inbox_batch",
    autoretry_for=(redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError),
    retry_backoff=True,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def process_inbox_batch(self: Task, batch_id: str) -> dict[str, int]:
    """Process one inbox batch of normalised events (see ``workers.events.Event``), then remove it from
    the inbox. A batch already finished (a repeated doorbell) is a no-op."""
    client = get_store().client
    events = inbox.claim(client, batch_id)
    if events is None:
        return {"batches_already_done": 1}
    counts = dict(process_batch(events))
    inbox.finish(client, batch_id)
    return {**counts, "batch_events": len(events)}  # batch_events: for the latency metric


@app.task(name="ehr_alerts.noop")
def noop(event: dict[str, Any]) -> None:
    """Does nothing: the per-task overhead baseline for the stream benchmark."""
