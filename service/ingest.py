"""FHIR event ingestion: validate and normalise at the edge, answer per entry, enqueue in batches.

Used by the HTTP endpoints and by ``ehr-alerts replay`` (same code path).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from config.settings import get_settings
from rules.normalize import NormalizeOptions, NormalizeResult, normalize_resource, reference_index
from service.observability.metrics import record_event, record_future_dated
from workers import inbox
from workers.events import Event, dump_batch, events_from, tombstone
from workers.pipeline import get_store
from workers.state import keys
from workers.state.connection import get_redis


@dataclass
class EntryOutcome:
    """What happened to one entry of a request."""

    location: str  # FHIRPath-like: "Bundle.entry[3].resource" or "line 12"
    outcome: str  # accepted | ignored | rejected | duplicate-in-request
    resource: str | None = None
    issues: list[tuple[str, str, str]] = field(default_factory=list)  # (severity, expression, message)


@dataclass
class Ingested:
    """The answer to one ingestion request."""

    entries: list[EntryOutcome] = field(default_factory=list)
    notes: list[tuple[str, str, str]] = field(default_factory=list)  # request-level (severity, expr, msg)
    events: int = 0

    def counts(self) -> Counter[str]:
        """Entries per outcome."""
        return Counter(e.outcome for e in self.entries)


class Enqueuer:
    """Collects events and submits them in batches (one inbox batch and one task per ``batch_size`` events)."""

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size or get_settings().batch_size
        self.pending: list[Event] = []
        self.sent = 0
        self.patients: set[str] = set()
        self.received: dict[str, str] = {}  # "Type/id" -> patient of every resource this request queued

    def add(self, event: Event) -> None:
        """Queue one event, flushing a full batch."""
        self.pending.append(event)
        self.patients.add(event.patient)
        if event.kind == "resource":
            self.received[event.resource] = event.patient
        if len(self.pending) >= self.batch_size:
            self.flush()

    def accept(self, event: Event) -> str | None:
        """Queue an event received now; returns a warning for the answer when it is dated in the future."""
        self.add(event)
        if event.is_future(get_settings().future_tolerance_hours):
            record_future_dated(event.resource.split("/")[0])
            return _future_message(event)
        return None

    def patient_of(self, resource: str) -> str | None:
        """The patient of a resource queued by this request or received before (for a delete)."""
        return self.received.get(resource) or get_store().patient_of(resource)

    def flush(self) -> None:
        """Submit what is pending as one batch (kept in the inbox until a worker has finished it). The resources'
        patients are indexed first, so a DELETE that follows at once finds them before any worker ran."""
        if self.pending:
            client = get_redis()
            resources = {e.resource: e.patient for e in self.pending if e.kind == "resource"}
            if resources:
                client.hset(keys.resource_patients(), mapping=resources)
            inbox.submit(client, dump_batch(self.pending), get_settings().redelivery_timeout)
            self.sent += len(self.pending)
            self.pending = []


def options() -> NormalizeOptions:
    """Normalisation options from the settings."""
    return NormalizeOptions(include_preliminary=get_settings().include_preliminary)


def ingest_one(
    data: Any,
    location: str,
    enqueuer: Enqueuer,
    answer: Ingested,
    *,
    resolve: Mapping[str, Mapping[str, Any]] | None = None,
    received: datetime | None = None,
) -> NormalizeResult:
    """Validate + normalise one resource, record its outcome, queue its event."""
    # Let other threads have the interpreter between resources: a 500-line $import is ~0.1 s of CPU on an ingest
    # lane thread, and a CDS lane thread waiting for the GIL would otherwise wait a whole switch interval (5 ms)
    # each time it is ready to run (bench/bench_isolation.py, single-process shape).
    time.sleep(0)
    result = normalize_resource(data, options(), resolve=resolve)
    received = received or datetime.now(UTC)
    entry = EntryOutcome(location, result.outcome, f"{result.resource_type}/{result.resource_id}")
    for issue in result.issues:
        entry.issues.append((issue.severity, _expression(location, result.resource_type, issue.path), issue.message))
    for fact in result.facts:
        if fact.problem:
            entry.issues.append(
                ("warning", location, f"{fact.concept}: {fact.problem} (decision will be indeterminate)")
            )
    if result.outcome == "ignored" and result.reason:
        entry.issues.append(("information", location, result.reason))
    answer.entries.append(entry)
    record_event(result.resource_type, result.outcome)
    event = events_from(result, received)
    if event is not None:
        warning = enqueuer.accept(event)
        if warning:
            entry.issues.append(("warning", location, warning))
        answer.events += 1
    return result


def _future_message(event: Event) -> str:
    hours = get_settings().future_tolerance_hours
    return (
        f"dated {event.event_time.isoformat().replace('+00:00', 'Z')}, more than {hours:g} h after it was received: "
        "stored, but it does not move the patient's clock and counts only once the patient's time reaches it"
    )


def _expression(location: str, resource_type: str, path: str) -> str:
    """FHIRPath of an issue: ``Bundle.entry[1].resource.status`` rather than ``...resource.Observation.status``."""
    if location == resource_type:
        return path
    if path.startswith(f"{resource_type}."):
        path = path[len(resource_type) + 1 :]
    return f"{location}.{path}" if path and path != resource_type else location


#: Resource types accepted one at a time (``/fhir/<type>``) and deletable by id.
RESOURCE_TYPES = (
    "Observation",
    "MedicationStatement",
    "MedicationRequest",
    "MedicationAdministration",
    "Condition",
    "Procedure",
    "Patient",
    "Encounter",
)
_DELETE = "__delete__"
_DELETABLE = re.compile(rf"^({'|'.join(RESOURCE_TYPES)})/([A-Za-z0-9\-.]{{1,64}})$")
_NOT_DELETABLE = f"only a delete of {', '.join(RESOURCE_TYPES[:-1])} or {RESOURCE_TYPES[-1]} by id applies"


def ingest_delete(
    reference: str, location: str, enqueuer: Enqueuer, answer: Ingested, received: datetime | None = None
) -> None:
    """A delete of ``Type/id``: its facts leave the patient's timeline and the alerts they supported are
    retracted (as for entered-in-error). Unknown resources and conditional deletes are reported, not applied."""
    record_event("delete", "received")
    if not _DELETABLE.match(reference):
        answer.entries.append(EntryOutcome(location, "ignored", "DELETE", [("warning", location, _NOT_DELETABLE)]))
        return
    patient = enqueuer.patient_of(reference)
    if patient is None:
        message = "not in any timeline (never received, or already expired): nothing to retract"
        answer.entries.append(EntryOutcome(location, "ignored", reference, [("information", location, message)]))
        return
    enqueuer.add(tombstone(patient, reference, received))
    answer.events += 1
    message = "deleted: its facts are retracted, and so are the alerts they supported"
    answer.entries.append(EntryOutcome(location, "accepted", reference, [("information", location, message)]))


def ingest_bundle_entries(
    bundle: Mapping[str, Any], enqueuer: Enqueuer, answer: Ingested, received: datetime | None = None
) -> None:
    """Every entry of a transaction / batch / collection / history Bundle (nested Bundles walked)."""
    entries = bundle.get("entry")
    if entries is not None and not isinstance(entries, list):
        answer.notes.append(("error", "Bundle.entry", "Bundle.entry must be an array"))
        return
    pairs: list[tuple[str, str | None, Any]] = []
    _walk(bundle, "Bundle", pairs)
    index = reference_index((full_url, resource) for _, full_url, resource in pairs)
    received = received or datetime.now(UTC)
    for location, _, resource in pairs:
        if isinstance(resource, Mapping) and _DELETE in resource:
            ingest_delete(str(resource[_DELETE]).split("/_history/")[0], location, enqueuer, answer, received)
            continue
        if isinstance(resource, Mapping) and resource.get("resourceType") in (
            "Parameters",
            "SubscriptionStatus",
            "OperationOutcome",
            "Patient",
        ):
            answer.entries.append(EntryOutcome(location, "ignored", str(resource.get("resourceType"))))
            record_event(str(resource.get("resourceType")), "ignored")
            continue
        ingest_one(resource, location, enqueuer, answer, resolve=index, received=received)


def _walk(bundle: Mapping[str, Any], prefix: str, out: list[tuple[str, str | None, Any]]) -> None:
    for i, entry in enumerate(bundle.get("entry") or []):
        location = f"{prefix}.entry[{i}]"
        if not isinstance(entry, Mapping):
            out.append((location, None, entry))
            continue
        resource = entry.get("resource")
        if resource is None:
            request = entry.get("request") if isinstance(entry.get("request"), Mapping) else {}
            if request.get("method") == "DELETE":  # applied as a retraction (ingest_delete)
                out.append((f"{location}.request", None, {_DELETE: str(request.get("url") or "?")}))
                continue
            out.append((location, None, {"resourceType": None}))
            continue
        if isinstance(resource, Mapping) and resource.get("resourceType") == "Bundle":
            _walk(resource, f"{location}.resource", out)
        else:
            out.append((f"{location}.resource", entry.get("fullUrl"), resource))


def ingest_items(
    items: Iterable[tuple[str, Any]], enqueuer: Enqueuer, answer: Ingested, received: datetime | None = None
) -> None:
    """Resources or Bundles one after another (ndjson lines, files): each validated on its own. ``received``:
    the receipt time to record (default: now; a replay declares its feed's own clock)."""
    for location, data in items:
        if isinstance(data, Mapping) and data.get("resourceType") == "Bundle":
            sub = Ingested()
            ingest_bundle_entries(data, enqueuer, sub, received)
            for entry in sub.entries:
                entry.location = f"{location}: {entry.location}"
            answer.entries.extend(sub.entries)
            answer.notes.extend(sub.notes)
            answer.events += sub.events
        else:
            ingest_one(data, location, enqueuer, answer, received=received)


def operation_outcome(answer: Ingested) -> dict[str, Any]:
    """FHIR OperationOutcome listing every entry's outcome and issues."""
    issues: list[dict[str, Any]] = []
    for severity, expression, message in answer.notes:
        issues.append(_issue(severity, expression, message))
    for entry in answer.entries:
        if entry.outcome == "accepted":
            issues.append(_issue("information", entry.location, f"{entry.resource}: accepted"))
        elif entry.outcome == "rejected" and not entry.issues:
            issues.append(_issue("error", entry.location, f"{entry.resource}: rejected"))
        for severity, expression, message in entry.issues:
            prefix = f"{entry.resource}: " if entry.resource and not entry.resource.startswith("?") else ""
            issues.append(_issue(severity, expression, prefix + message))
    counts = answer.counts()
    summary = (
        f"{counts['accepted']} accepted, {counts['ignored']} ignored (not used by the rules), "
        f"{counts['rejected']} rejected; {answer.events} events queued"
    )
    issues.insert(0, _issue("information", "", summary))
    return {"resourceType": "OperationOutcome", "issue": issues}


def _issue(severity: str, expression: str, message: str) -> dict[str, Any]:
    code = {"error": "invalid", "warning": "value", "information": "informational"}.get(severity, "processing")
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = [expression]
    return issue


def error_outcome(message: str, expression: str | None = None, code: str = "invalid") -> dict[str, Any]:
    """OperationOutcome for a request-level error."""
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}
