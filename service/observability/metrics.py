"""Prometheus metrics of the API process, plus the pipeline's cluster-wide metrics read from Redis.

Labels are low-cardinality by construction: resource types and auth failure reasons from fixed
vocabularies (anything else is ``other``), route templates (never raw paths), CDS service ids only once
the service answered successfully. Never patient ids.
"""

from __future__ import annotations

import re
import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from service.security.failures import REASONS as SECURITY_REASONS
from workers.observability.metrics import PipelineCollector

RESOURCE_TYPES = frozenset(
    {
        "Observation",
        "MedicationStatement",
        "MedicationRequest",
        "MedicationAdministration",
        "Condition",
        "Procedure",
        "Patient",
        "Encounter",
        "Bundle",
        "Parameters",
    }
)
#: Reasons ``record_auth_failure`` keeps as labels (anything else is counted as ``other``): the security
#: module's vocabulary (``service.security.failures.REASONS``).
AUTH_FAILURE_REASONS = frozenset(SECURITY_REASONS)
AUTH_SCHEMES = frozenset({"cds", "review", "feed", "metrics"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LABEL = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")

registry = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=registry)
platform_collector.PlatformCollector(registry=registry)
gc_collector.GCCollector(registry=registry)

EVENTS_RECEIVED = Counter(
    "ehr_alerts_events_received",
    "FHIR resources received at the edge, by resource type and outcome (accepted, ignored, rejected)",
    ["resource_type", "outcome"],
    registry=registry,
)
FUTURE_DATED = Counter(
    "ehr_alerts_future_dated_events",
    "Events dated more than EHR_ALERTS_FUTURE_TOLERANCE_HOURS after their receipt (stored; they move no clock)",
    ["resource_type"],
    registry=registry,
)
HTTP_DURATION = Histogram(
    "ehr_alerts_http_request_duration_seconds",
    "HTTP request latency by method, route template and status",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=registry,
)
CDS_DURATION = Histogram(
    "ehr_alerts_cds_hooks_request_duration_seconds",
    "CDS Hooks request latency by service id (discovery for the list), endpoint and status",
    ["service", "endpoint", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=registry,
)
AUTH_FAILURES = Counter(
    "ehr_alerts_auth_failures",
    "Rejected bearer tokens by scheme (cds, review, feed, metrics) and reason (never the token)",
    ["scheme", "reason"],
    registry=registry,
)

_pipeline_lock = threading.Lock()
_pipeline_registered = False


def record_event(resource_type: str | None, outcome: str) -> None:
    """Count one received resource (resource types outside the known set are ``other``)."""
    kind = resource_type if resource_type in RESOURCE_TYPES else "other"
    EVENTS_RECEIVED.labels(kind, outcome if outcome in ("accepted", "ignored", "rejected") else "other").inc()


def record_future_dated(resource_type: str | None) -> None:
    """Count one event dated beyond the future tolerance after its receipt (stored, not moving any clock)."""
    FUTURE_DATED.labels(resource_type if resource_type in RESOURCE_TYPES else "other").inc()


def record_auth_failure(scheme: str, reason: str) -> None:
    """Count a rejected token. ``scheme``: cds | review; ``reason``: one of :data:`AUTH_FAILURE_REASONS`."""
    AUTH_FAILURES.labels(
        scheme if scheme in AUTH_SCHEMES else "other", reason if reason in AUTH_FAILURE_REASONS else "other"
    ).inc()


def safe_label(value: str | None) -> str:
    """A client-supplied value usable as a label, else ``unknown``."""
    return value if value and _LABEL.match(value) else "unknown"


def register_pipeline_metrics() -> None:
    """Add the Redis-backed pipeline collector (once per process)."""
    global _pipeline_registered
    from service.observability.health import probe_client

    with _pipeline_lock:
        if not _pipeline_registered:
            registry.register(PipelineCollector(probe_client))
            _pipeline_registered = True


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
