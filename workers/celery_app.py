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
- no result backend (``task_ignore_result``): results are the alert store, nothing polls task state.
- retries with exponential backoff for transient Redis errors (see ``workers.tasks``).
- embedded mode (no REDIS_URL): ``task_always_eager`` runs tasks in-process on fakeredis, same code.
"""

from __future__ import annotations

from celery import Celery

from workers.settings import get_settings

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

# Operations: JSON logs, enqueue timestamps, latency metrics, heartbeats (signals and a bootstep).
from workers.observability.celery_hooks import install as _install_observability  # noqa: E402

_install_observability(app)
