"""The Celery application: Redis broker, at-least-once delivery.

Settings, and why:
- ``task_acks_late``: a task is acknowledged after it ran, so a worker that dies mid-task loses nothing.
- ``task_reject_on_worker_lost``: if the child process running a task is killed, the task is re-queued
  instead of being marked failed.
- ``worker_prefetch_multiplier=4``: a few batches in flight per process hides broker latency; with
  late acks, unacknowledged prefetched tasks are redelivered if the worker dies.
- ``broker_transport_options.visibility_timeout``: seconds before Redis hands an unacknowledged task to
  another worker (EHR_ALERTS_VISIBILITY_TIMEOUT, default 60 s; tasks take milliseconds, so a short
  timeout redelivers quickly after a crash; an early redelivery is harmless because processing is
  idempotent). kombu only sweeps for expired unacknowledged tasks every ``unacked_restore_interval``
  x ``unacked_restore_throttle`` seconds (10 x 10 = 100 s by default), so the sweep period is tied to the
  visibility timeout (at most 10 s, every sweep scans): otherwise a crash is recovered after ~100 s.
- ``unacked_mutex_expire``: kombu holds a Redis lock while it sweeps; a worker killed while holding it
  would block every other worker's sweep for the default 300 s. The sweep takes milliseconds, so the
  lock expires after the sweep period (overlapping sweeps are safe: each restore is a transaction).
- kombu's Redis transport cannot, by itself, guarantee at-least-once under SIGKILL: BRPOP removes the
  message from the queue and only the next round trip records it in ``unacked``; a worker killed in
  between loses it. The Celery message is therefore only a doorbell for a batch kept in the inbox until
  it is finished, and every worker runs the inbox sweep (``InboxSweep`` below) that re-publishes the
  doorbell of any batch unfinished after EHR_ALERTS_REDELIVERY_TIMEOUT seconds (see ``workers.inbox``).
- no result backend (``task_ignore_result``): results are the alert store, nothing polls task state.
- retries with exponential backoff for transient Redis errors (see ``workers.tasks``).
- embedded mode (no REDIS_URL): ``task_always_eager`` runs tasks in-process on fakeredis, same code.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import Celery, bootsteps

from config.settings import get_settings

log = logging.getLogger("ehr_alerts.celery")

settings = get_settings()
app = Celery("ehr_alerts", include=["workers.tasks"])
app.conf.update(
    broker_url=settings.redis_url or "memory://",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout))),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(1, min(10, int(settings.visibility_timeout))),
    },
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue="ehr-alerts",
    task_always_eager=settings.redis_url is None,
    task_eager_propagates=True,
    worker_hijack_root_logger=False,
)


class InboxSweep(bootsteps.StartStopStep):
    """Every worker re-publishes overdue inbox batches on its timer (see ``workers.inbox.sweep``)."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None

    def start(self, worker: Any) -> None:
        """Start the periodic sweep (first one right away: a restarted worker recovers quickly)."""
        interval = max(0.5, min(10.0, settings.redelivery_timeout / 4))
        self.timer_ref = worker.timer.call_repeatedly(interval, _sweep, priority=10)
        _sweep()

    def stop(self, worker: Any) -> None:
        """Stop sweeping."""
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None


def _sweep() -> None:
    from workers import inbox
    from workers.state.connection import get_redis

    try:
        republished = inbox.sweep(get_redis(), settings.redelivery_timeout)
    except Exception:  # a broker hiccup must not stop the worker; the next sweep tries again
        log.warning("inbox sweep failed", exc_info=True)
        return
    if republished:
        log.warning("inbox sweep re-published %d unfinished batches", republished)


app.steps["worker"].add(InboxSweep)


class DueSweep(bootsteps.StartStopStep):
    """Every worker ticks the patients whose alerts are due for re-evaluation by time alone (``workers.due``)."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None

    def start(self, worker: Any) -> None:
        """Start the periodic sweep."""
        self.timer_ref = worker.timer.call_repeatedly(settings.due_sweep_interval, _due_sweep, priority=10)

    def stop(self, worker: Any) -> None:
        """Stop sweeping."""
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None


def _due_sweep() -> None:
    from workers import due
    from workers.state.connection import get_redis

    try:
        ticked = due.sweep(get_redis(), settings)
    except Exception:  # a broker hiccup must not stop the worker; the next sweep tries again
        log.warning("due sweep failed", exc_info=True)
        return
    if ticked:
        log.info("due sweep ticked %d patients", ticked)


app.steps["worker"].add(DueSweep)

# Operations: JSON logs, enqueue timestamps, latency metrics, heartbeats (signals and a bootstep).
from workers.observability.celery_hooks import install as _install_observability  # noqa: E402

_install_observability(app)
