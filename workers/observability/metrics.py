"""Pipeline metrics kept in Redis and exported by the API's ``/metrics``.

Why Redis: the work happens in Celery prefork children on worker pods that KEDA starts and stops. Counters
in process memory would need a multiprocess directory per pod plus an exporter port per pod, and would lose
what a pod counted since its last scrape when it is scaled down. The pipeline already writes one counters
hash per batch (``Store.count``, one round trip); the latency histogram adds one pipelined round trip per
batch. The API reads these at scrape time, so Prometheus scrapes only the API.

These series are cluster-wide: every API replica reports the same values. Aggregate them with ``max``
(e.g. ``max without(instance, pod) (rate(ehr_alerts_rule_decisions_total[5m]))``), not ``sum``.

Counter fields in ``<prefix>:counters`` (written by ``workers.pipeline``):
``events_<status>:<resource type>`` (stored | duplicate | stale), ``decisions_<outcome>:<rule>``
(fires | not-fires | indeterminate), ``alerts_<kind>:<rule>`` (opened | updated | resolved | retracted, and
review actions), ``events_dead_lettered``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from config.settings import get_settings
from workers.state import keys

QUEUE = "ehr-alerts"
ENQUEUED_AT_HEADER = "ehr_enqueued_at"
#: Upper bounds (seconds) of the processing-latency histogram: enqueue -> decisions applied.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def latency_key() -> str:
    """Hash of the latency histogram: ``le:<bound>`` cumulative counts, ``sum``, ``count``."""
    return f"{get_settings().key_prefix}:metrics:latency"


def heartbeat_key() -> str:
    """Sorted set of worker name -> unix time of its last heartbeat."""
    return f"{get_settings().key_prefix}:workers:heartbeat"


def subscription_gaps_key() -> str:
    """Hash of subscription -> notifications missing (written by ``service.subscriptions``)."""
    return f"{get_settings().key_prefix}:subscriptions:gaps"


def record_latency(client: redis.Redis, seconds: float, events: int = 1) -> None:
    """Observe ``events`` events that took ``seconds`` from enqueue to applied decisions (one round trip)."""
    if events <= 0:
        return
    seconds = max(0.0, seconds)
    pipe = client.pipeline(transaction=False)
    key = latency_key()
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            pipe.hincrby(key, f"le:{bound}", events)
    pipe.hincrby(key, "count", events)
    pipe.hincrbyfloat(key, "sum", seconds * events)
    pipe.execute()


def oldest_enqueued_at(client: redis.Redis, queue: str = QUEUE) -> float | None:
    """Enqueue time of the oldest message waiting in the Celery queue (kombu LPUSHes, workers BRPOP the tail)."""
    raw = client.lindex(queue, -1)
    if raw is None:
        return None
    try:
        headers = json.loads(raw).get("headers") or {}
        return float(headers[ENQUEUED_AT_HEADER])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _split(field: str) -> tuple[str, str, str] | None:
    """``decisions_fires:rule-a`` -> ("decisions", "fires", "rule-a"); fields without a label -> None."""
    head, sep, label = field.partition(":")
    family, under, kind = head.partition("_")
    if not sep or not under or not label:
        return None
    return family, kind, label


class PipelineCollector(Collector):
    """Reads the pipeline's Redis state at scrape time (see module docstring)."""

    def __init__(self, client: Callable[[], redis.Redis], queue: str = QUEUE) -> None:
        self._client = client
        self._queue = queue

    def describe(self) -> list[Any]:
        """Nothing at registration time (collecting needs Redis)."""
        return []

    def collect(self) -> Iterator[Any]:
        """The metric families; a scrape error if Redis is down (``ehr_alerts_redis_up`` says why)."""
        up = GaugeMetricFamily("ehr_alerts_redis_up", "1 if the pipeline metrics could be read from Redis")
        try:
            families = list(self._families(self._client()))
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, client: redis.Redis) -> Iterator[Any]:
        now = time.time()
        settings = get_settings()
        counters = {k: int(v) for k, v in client.hgetall(keys.counters()).items()}
        events = CounterMetricFamily(
            "ehr_alerts_worker_events",
            "Events processed by the workers, by resource type and storage status (stored, duplicate, stale)",
            labels=["resource_type", "status"],
        )
        decisions = CounterMetricFamily(
            "ehr_alerts_rule_decisions",
            "Rule decisions on the stream by rule and outcome (fires, not-fires, indeterminate)",
            labels=["rule", "outcome"],
        )
        transitions = CounterMetricFamily(
            "ehr_alerts_alert_transitions", "Alert transitions by kind and rule", labels=["kind", "rule"]
        )
        for field, value in sorted(counters.items()):
            parts = _split(field)
            if parts is None:
                continue
            family, kind, label = parts
            if family == "events":
                events.add_metric([label, kind], value)
            elif family == "decisions":
                decisions.add_metric([label, kind], value)
            elif family == "alerts":
                transitions.add_metric([kind, label], value)
        yield events
        yield decisions
        yield transitions
        dead = CounterMetricFamily("ehr_alerts_events_dead_lettered", "Events moved to the dead-letter list")
        dead.add_metric([], counters.get("events_dead_lettered", 0))
        yield dead

        latency = {k: float(v) for k, v in client.hgetall(latency_key()).items()}
        histogram = HistogramMetricFamily(
            "ehr_alerts_processing_latency_seconds",
            "Seconds from enqueueing an event to its rule decisions being applied",
        )
        count = latency.get("count", 0.0)
        buckets = [(str(b), latency.get(f"le:{b}", 0.0)) for b in LATENCY_BUCKETS] + [("+Inf", count)]
        histogram.add_metric([], buckets, sum_value=latency.get("sum", 0.0))
        yield histogram

        depth = GaugeMetricFamily("ehr_alerts_queue_depth", "Batches waiting in the Celery queue", labels=["queue"])
        depth.add_metric([self._queue], client.llen(self._queue))
        yield depth
        oldest = oldest_enqueued_at(client, self._queue)
        age = GaugeMetricFamily(
            "ehr_alerts_queue_oldest_age_seconds",
            "Age of the oldest batch waiting in the queue (0 when empty)",
            labels=["queue"],
        )
        age.add_metric([self._queue], max(0.0, now - oldest) if oldest is not None else 0.0)
        yield age

        alive = GaugeMetricFamily(
            "ehr_alerts_workers_alive", "Workers whose heartbeat is younger than EHR_ALERTS_WORKER_HEARTBEAT_MAX_AGE"
        )
        alive.add_metric([], client.zcount(heartbeat_key(), now - settings.worker_heartbeat_max_age, "+inf"))
        yield alive

        gaps = CounterMetricFamily(
            "ehr_alerts_subscription_event_gaps",
            "FHIR subscription notifications missing (eventNumber gaps), by subscription",
            labels=["subscription"],
        )
        for subscription, missing in sorted(client.hgetall(subscription_gaps_key()).items()):
            gaps.add_metric([subscription], int(missing))
        yield gaps
