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

from celery import Celery, bootsteps, signals

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


class _Periodic(bootsteps.StartStopStep):
    """A sweep every worker runs on its timer; a failure is logged and the next round tries again."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Timer"}
    name_for_logs = "sweep"
    run_at_start = False
    log_level = logging.INFO  # of what a round did

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref: Any = None

    def interval(self) -> float:
        """Seconds between two rounds."""
        raise NotImplementedError

    def sweep(self) -> str | None:
        """One round; returns what to log when it did something."""
        raise NotImplementedError

    def start(self, worker: Any) -> None:
        """Start the periodic sweep."""
        self.timer_ref = worker.timer.call_repeatedly(self.interval(), self._round, priority=10)
        if self.run_at_start:
            self._round()

    def stop(self, worker: Any) -> None:
        """Stop sweeping."""
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def _round(self) -> None:
        try:
            done = self.sweep()
        except Exception:  # a broker hiccup must not stop the worker; the next round tries again
            log.warning("%s failed", self.name_for_logs, exc_info=True)
            return
        if done:
            log.log(self.log_level, done)


class InboxSweep(_Periodic):
    """Every worker re-publishes overdue inbox batches (``workers.inbox.sweep``); the first round at start, so a
    restarted worker recovers quickly."""

    name_for_logs = "inbox sweep"
    run_at_start = True
    log_level = logging.WARNING  # a re-published batch means something was lost on the way

    def interval(self) -> float:
        return max(0.5, min(10.0, settings.redelivery_timeout / 4))

    def sweep(self) -> str | None:
        from workers import inbox
        from workers.state.connection import get_redis

        republished = inbox.sweep(get_redis(), settings.redelivery_timeout)
        return f"inbox sweep re-published {republished} unfinished batches" if republished else None


class DueSweep(_Periodic):
    """Every worker ticks the patients whose alerts are due for re-evaluation by time alone (``workers.due``)."""

    name_for_logs = "due sweep"

    def interval(self) -> float:
        return settings.due_sweep_interval

    def sweep(self) -> str | None:
        from workers import due
        from workers.state.connection import get_redis

        ticked = due.sweep(get_redis(), settings)
        return f"due sweep ticked {ticked} patients" if ticked else None


app.steps["worker"].add(InboxSweep)
app.steps["worker"].add(DueSweep)


@signals.worker_process_init.connect
def _prepare_worker_process(**_: Any) -> None:
    """In each forked worker process: load the rule catalog, then apply the garbage-collector settings the API
    uses (``EHR_ALERTS_GC_YOUNG_THRESHOLD``, ``EHR_ALERTS_GC_FREEZE_AT_START``), so full collections no longer
    re-scan the catalog and the imported models."""
    from config.process import freeze_startup_heap
    from workers.pipeline import get_catalog

    get_catalog()
    freeze_startup_heap()


# Operations: JSON logs, enqueue timestamps, latency metrics, heartbeats (signals and a bootstep).
from workers.observability.celery_hooks import install as _install_observability  # noqa: E402

_install_observability(app)
