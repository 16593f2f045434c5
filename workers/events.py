"""The unit of work on the queue: one FHIR resource version, already validated and normalised at the edge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from config.settings import Settings
from rules.facts import Fact, version_rank
from rules.normalize import NormalizeResult

CLOCK_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_FOREVER = "9999-12-31T23:59:59.999999Z"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def clock_text(value: datetime) -> str:
    """Fixed-width UTC text that sorts like the instants it names (used inside Lua)."""
    return value.strftime(CLOCK_FORMAT)


class Event(BaseModel):
    """One resource version for one patient, with the facts it yields."""

    patient: str
    resource: str  # "Type/id"
    facts: list[Fact]
    event_time: datetime  # when it happened clinically (effective time), else when it was received

    tombstone: bool = False  # a delete: outranks every version of the resource

    def rank(self) -> str:
        """Sortable text of the version order (numeric versionId, lastUpdated, retraction)."""
        if self.tombstone:
            return "2"
        if not self.facts:
            return "0"
        numeric, number, updated, retracted = version_rank(self.facts[0])
        return f"{numeric}|{number:020d}|{clock_text(updated)}|{retracted}"

    def expires(self, settings: Settings) -> str:
        """When this resource may leave the timeline (retention per fact kind)."""
        ends: list[str] = []
        for fact in self.facts:
            if fact.kind in ("lab", "finding") or fact.kind == "order":
                hours, anchor = settings.retention_lab_hours, fact.start
            elif fact.kind == "medication":
                hours, anchor = settings.retention_medication_hours, fact.end
            else:
                hours, anchor = settings.retention_condition_hours, fact.end
            ends.append(_FOREVER if anchor is None else clock_text(anchor + timedelta(hours=hours)))
        return max(ends) if ends else _FOREVER


def events_from(result: NormalizeResult, received: datetime) -> Event | None:
    """The queue event for an accepted normalisation result (None if it produced no facts)."""
    if result.outcome != "accepted" or not result.facts or result.patient is None:
        return None
    times = [f.start for f in result.facts if f.kind in ("lab", "finding") and f.start is not None]
    times += [t for f in result.facts if f.kind not in ("lab", "finding") for t in (f.start,) if t is not None]
    event_time = max(times) if times else received
    return Event(
        patient=result.patient,
        resource=f"{result.resource_type}/{result.resource_id}",
        facts=result.facts,
        event_time=event_time,
    )


def tombstone(patient: str, resource: str) -> Event:
    """The event of a delete: one retracted fact for the resource, so its facts leave the timeline and the
    alerts they supported are retracted. Its time is the epoch, so it never moves the patient's clock."""
    resource_type, _, resource_id = resource.partition("/")
    fact = Fact(
        patient=patient,
        concept="deleted",
        kind="lab",
        resource_type=resource_type,
        resource_id=resource_id,
        status="deleted",
        counts=False,
        retracted=True,
    )
    return Event(patient=patient, resource=resource, facts=[fact], event_time=_EPOCH, tombstone=True)


def dump_batch(events: list[Event]) -> list[dict[str, Any]]:
    """JSON-ready batch for a Celery task."""
    return [e.model_dump(mode="json") for e in events]
