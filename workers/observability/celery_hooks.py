"""Celery integration, through signals and a bootstep (task bodies are not touched):

- ``setup_logging``: Celery leaves logging to :func:`configure_logging` (JSON, redacted) in the main
  process and in every pool child;
- ``before_task_publish``: stamps the enqueue time into the message headers (``ehr_enqueued_at``), read by
  the queue-age gauge and the latency histogram;
- ``task_prerun`` / ``task_postrun``: the task id joins the log context; a successful batch observes
  enqueue -> decisions-applied latency once per event;
- the heartbeat bootstep beats on ``worker_ready`` and every ``EHR_ALERTS_WORKER_HEARTBEAT_INTERVAL``
  seconds from the worker's own timer (if the main loop hangs, the heartbeat stops), and forgets the
  worker on a clean shutdown;
- in JSON mode, Celery's shutdown notices (written straight to the terminal) become JSON lines too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

from celery import Celery, bootsteps
from celery.apps import worker as celery_worker_app
from celery.signals import before_task_publish, setup_logging, task_postrun, task_prerun

from config.settings import get_settings
from workers.observability import context, heartbeat
from workers.observability.logging import configure_logging
from workers.observability.metrics import ENQUEUED_AT_HEADER, record_latency
from workers.state.connection import get_redis

log = logging.getLogger("ehr_alerts.worker")
_task_tokens: dict[str, Any] = {}


def _configure_logging(**_: Any) -> None:
    configure_logging()


def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers.setdefault(ENQUEUED_AT_HEADER, time.time())


def _prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _task_tokens[task_id] = context.bind(task_id=task_id)


def _postrun(
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    state: str | None = None,
    retval: Any = None,
    **_: Any,
) -> None:
    try:
        enqueued = getattr(getattr(task, "request", None), ENQUEUED_AT_HEADER, None)
        # events of the batch: the task's list argument, or what an inbox batch task reports it processed
        events = len(args[0]) if args and isinstance(args[0], list) else None
        if events is None and isinstance(retval, dict):
            events = retval.get("batch_events")
        if state == "SUCCESS" and enqueued is not None and events:
            try:
                record_latency(get_redis(), time.time() - float(enqueued), events)
            except Exception:  # metrics must never fail a task
                log.warning("could not record processing latency", exc_info=True)
    finally:
        tokens = _task_tokens.pop(task_id, None) if task_id else None
        if tokens:
            with contextlib.suppress(ValueError):  # a token from another context (eager mode)
                context.reset(tokens)


class HeartbeatStep(bootsteps.StartStopStep):
    """Beats at start and then every interval on the worker's timer."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None
        self.guard: heartbeat.OutageGuard | None = None
        self.last_beat = time.monotonic()

    def start(self, worker: Any) -> None:
        """First beat now, then periodically; the outage guard keeps the file fresh while Redis is down."""
        self._beat(worker)
        settings = get_settings()
        interval = settings.worker_heartbeat_interval
        self.tref = worker.timer.call_repeatedly(interval, self._beat, (worker,), priority=10)
        if settings.worker_heartbeat_file is not None:
            self.guard = heartbeat.OutageGuard(
                settings.worker_heartbeat_file, interval, lambda: self.last_beat, _ping_client(settings).ping
            )
            self.guard.start()

    def stop(self, worker: Any) -> None:
        """Stop beating and forget this worker (a clean shutdown is not a failure)."""
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        with contextlib.suppress(Exception):
            heartbeat.forget(get_redis(), worker.hostname)

    def _beat(self, worker: Any) -> None:
        self.last_beat = time.monotonic()  # the main loop runs: the outage guard stays quiet
        settings = get_settings()
        try:
            heartbeat.beat(get_redis(), worker.hostname, settings.worker_heartbeat_file)
        except Exception as exc:  # Redis down: readiness shows it; the file still tells liveness
            log.warning("heartbeat failed: %s", type(exc).__name__, extra={"hostname": worker.hostname})


def _ping_client(settings: Any) -> Any:
    """A Redis client with short timeouts for the outage guard's ping (embedded mode: the in-process one)."""
    import redis

    if settings.redis_url is None:
        return get_redis()
    return redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)


def _say_json(msg: str, f: Any = sys.__stderr__) -> None:
    """Replacement for Celery's ``safe_say`` (shutdown notices written from signal handlers): one JSON line,
    written with a single ``os.write`` like the original (no logging locks inside a signal handler)."""
    line = json.dumps(
        {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "INFO",
            "logger": "celery.worker",
            "message": str(msg).strip(),
        }
    )
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(f.fileno(), (line + "\n").encode())


def install(app: Celery) -> None:
    """Connect the signals and add the heartbeat bootstep to ``app``."""
    if get_settings().log_format == "json":
        celery_worker_app.safe_say = _say_json  # Celery prints shutdown notices as bare text otherwise
    setup_logging.connect(_configure_logging, weak=False)
    before_task_publish.connect(_stamp, weak=False)
    task_prerun.connect(_prerun, weak=False)
    task_postrun.connect(_postrun, weak=False)
    app.steps["worker"].add(HeartbeatStep)
