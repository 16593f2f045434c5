"""The unit of work on the queue: one FHIR resource version (or a delete, or a clock tick) for one patient,
already validated and normalised at the edge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, field_validator

from config.settings import Settings
from rules.facts import Fact, version_rank
from rules.normalize import NormalizeResult

CLOCK_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
FOREVER = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def clock_text(value: datetime) -> str:
    """Fixed-width UTC text that sorts like the instants it names (used inside Lua)."""
    return value.strftime(CLOCK_FORMAT)


def parse_clock(text: str) -> datetime:
    """The instant of a :func:`clock_text` (or any ISO 8601 UTC text)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))  # strptime is 10x slower


def later(start: datetime | None, hours: float) -> datetime:
    """``start + hours``, saturating at :data:`FOREVER` (an open-ended 9999-12-31 never overflows)."""
    if start is None:
        return FOREVER
    try:
        return min(start + timedelta(hours=hours), FOREVER)
    except OverflowError:
        return FOREVER


def stdlib_times(fact: Fact) -> Fact:
    """``fact`` with its times in ``datetime.timezone`` zones (same instants and offsets): pydantic parses them with
    its own ``TzInfo``, which the engine compares several times slower than ``timezone.utc``."""
    update: dict[str, Any] = {}
    for name in ("start", "end", "updated"):
        value = getattr(fact, name)
        if value is not None and value.tzinfo is not None and type(value.tzinfo) is not timezone:
            update[name] = value.replace(tzinfo=timezone(value.utcoffset() or timedelta(0)))
    info = fact.patient_info
    died = info.deceased if info is not None else None
    if died is not None and died.tzinfo is not None and type(died.tzinfo) is not timezone:
        died = died.replace(tzinfo=timezone(died.utcoffset() or timedelta(0)))
        update["patient_info"] = info.model_copy(update={"deceased": died})  # type: ignore[union-attr]
    return fact.model_copy(update=update) if update else fact


class Event(BaseModel):
    """One resource version for one patient, with the facts it yields.

    ``event_time`` is when it happened clinically (effective time, else receipt); ``received`` when the
    service accepted it (for a replay: the time the extract's own clock declares). A tick carries no
    resource: it asks the worker to let the patient's time run up to ``received`` (see ``workers.due``).
    """

    patient: str
    resource: str  # "Type/id" ("" for a tick)
    facts: list[Fact]
    event_time: datetime
    received: datetime | None = None  # None in batches written by older releases: taken as event_time
    kind: Literal["resource", "delete", "tick"] = "resource"
    tombstone: bool = False  # kept for batches written by older releases (kind "delete")

    @field_validator("facts", mode="after")
    @classmethod
    def _stdlib_times(cls, facts: list[Fact]) -> list[Fact]:
        return [stdlib_times(fact) for fact in facts]

    @property
    def context_only(self) -> bool:
        """A Patient resource: demographics carry no clinical time, so they never move the patient's clock (a
        backfill of 2024 results with today's Patient must still be evaluated in 2024)."""
        return bool(self.facts) and all(f.kind == "patient" for f in self.facts)

    @property
    def is_delete(self) -> bool:
        """A delete: outranks every version of the resource."""
        return self.kind == "delete" or self.tombstone

    def clock_time(self, future_tolerance_hours: float) -> datetime | None:
        """The time this event moves the patient's clock to, or None: a delete, a tick, or a result dated more
        than the tolerance after its receipt (a future date never moves the clock; the fact still counts once
        the patient's time reaches it)."""
        if self.kind != "resource" or self.is_delete or self.context_only or self.is_future(future_tolerance_hours):
            return None
        return self.event_time

    def is_future(self, future_tolerance_hours: float) -> bool:
        """A resource dated more than the tolerance after its receipt."""
        if self.kind != "resource" or self.is_delete:
            return False
        return self.event_time > later(self.received or self.event_time, future_tolerance_hours)

    def rank(self) -> str:
        """Sortable text of the version order (numeric versionId, lastUpdated, retraction)."""
        if self.is_delete:
            return "2"
        if not self.facts:
            return "0"
        numeric, number, updated, retracted = version_rank(self.facts[0])
        return f"{numeric}|{number:020d}|{clock_text(updated)}|{retracted}"

    def expires(self, settings: Settings) -> datetime:
        """When this resource may leave the timeline: the latest expiry of its facts (retention per kind).

        A medication without an end is kept ``retention_open_medication_hours`` after its start or its last
        update, whichever is later (a medication list entry nobody has touched for that long is no longer
        evidence of exposure); a delete is kept as long as a lab result, so a late copy of the deleted version
        is still recognised as stale."""
        received = self.received or self.event_time
        if self.is_delete:
            return later(received, settings.retention_lab_hours)
        ends = [_fact_expiry(fact, received, settings) for fact in self.facts]
        return max(ends) if ends else later(received, settings.retention_lab_hours)


def _fact_expiry(fact: Fact, received: datetime, settings: Settings) -> datetime:
    if fact.kind == "patient":
        return FOREVER  # who the patient is matters to every evaluation (age, deceased) and to the worklist
    if fact.kind == "encounter":  # kept while in progress, then long enough to tell the patient's setting
        return FOREVER if fact.end is None else later(fact.end, settings.retention_encounter_hours)
    if fact.kind == "medication":
        if fact.end is not None:
            return later(fact.end, settings.retention_medication_hours)
        touched = max(t for t in (fact.start, fact.updated, received) if t is not None)
        return later(touched, settings.retention_open_medication_hours)
    if fact.kind == "condition":
        if fact.end is not None:
            return later(fact.end, settings.retention_condition_hours)
        return FOREVER  # an active problem stays until it abates or is retracted
    anchor = fact.start or received  # lab, finding, order
    return later(anchor, settings.retention_lab_hours)


def events_from(result: NormalizeResult, received: datetime) -> Event | None:
    """The queue event for an accepted normalisation result (None if it produced no facts)."""
    if result.outcome != "accepted" or not result.facts or result.patient is None:
        return None
    # when it happened: its start, or an end that has already come (a completion), never a planned end
    times = [f.start for f in result.facts if f.start is not None]
    times += [f.end for f in result.facts if f.end is not None and f.end <= received]
    if not times and all(f.kind == "patient" for f in result.facts):  # when the record was written, not received
        times = [f.updated for f in result.facts if f.updated is not None and f.updated <= received]
    event_time = max(times) if times else received
    return Event(
        patient=result.patient,
        resource=f"{result.resource_type}/{result.resource_id}",
        facts=result.facts,
        event_time=event_time,
        received=received,
    )


def tombstone(patient: str, resource: str, received: datetime | None = None) -> Event:
    """The event of a delete: one retracted fact for the resource, so its facts leave the patient's timeline
    and the alerts they supported are retracted. It never moves the patient's clock."""
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
    now = received or datetime.now(UTC)
    return Event(patient=patient, resource=resource, facts=[fact], event_time=_EPOCH, received=now, kind="delete")


def tick(patient: str, until: datetime) -> Event:
    """A clock tick: let the patient's time run up to ``until`` (evaluating at every due time on the way)."""
    return Event(patient=patient, resource="", facts=[], event_time=until, received=until, kind="tick")


def dump_batch(events: list[Event]) -> list[dict[str, Any]]:
    """JSON-ready batch for a Celery task."""
    return [e.model_dump(mode="json", exclude_defaults=False) for e in events]
