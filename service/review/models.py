"""Request and response models of the review API (they document the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.state.review_index import BUCKETS
from workers.state.statuses import STATUSES

Status = Literal[STATUSES]  # type: ignore[valid-type]  # the statuses of workers/state/statuses.py
Bucket = Literal[BUCKETS]  # type: ignore[valid-type]  # each status, and todo | open | closed | all
Severity = Literal["critical", "warning", "info"]
Sort = Literal["severity", "oldest", "newest"]
Action = Literal["acknowledge", "accept", "override", "snooze", "resolve", "reopen"]


class LabPoint(BaseModel):
    """One K or Mg result: value in the canonical unit, what the lab reported, when, and the resource."""

    concept: str
    time: str | None
    value: float | None
    unit: str | None
    reported: str | None = Field(None, description="value and unit as the lab reported them")
    reference: str = Field(description="versioned FHIR reference, e.g. Observation/k1/_history/2")


class LatestLabs(BaseModel):
    """The patient's latest K and Mg results (any age)."""

    potassium: LabPoint | None = None
    magnesium: LabPoint | None = None


class PatientContext(BaseModel):
    """Who and where the patient is (PHI: never logged). Null while patient context is not available."""

    id: str
    name: str | None = None
    mrn: str | None = None
    birth_date: str | None = None
    age: str | None = Field(None, description="e.g. 67 y (8 mo, 12 d for infants), on today's date")
    sex: str | None = Field(None, description="FHIR administrative gender")
    ward: str | None = None
    bed: str | None = None
    encounter_class: str | None = Field(None, description="HL7 v3 ActCode, e.g. IMP, EMER, AMB")
    encounter_class_display: str | None = None


class DisplayFields(BaseModel):
    """Times as people read them, in the display time zone (``EHR_ALERTS_DISPLAY_TIMEZONE``)."""

    timezone: str
    raised_at: str = Field(description="when the alert was raised, local time, e.g. 31 Mar 2024 03:30 CEST")
    opened_at: str = Field(description="clinical time of the data that opened it, local time")
    age: str | None = Field(None, description="time since it was raised (wall clock), e.g. 3 h 10 min")
    snoozed_until: str | None = None


class Escalation(BaseModel):
    """The escalation nobody has acted on yet (the alert is on top of the worklist until someone does)."""

    at: str | None
    why: str | None
    from_: str | None = Field(None, alias="from", description="the status it escalated from")


class AlertSummary(BaseModel):
    """One worklist row. Machine times are ISO UTC; ``display`` has them in local time."""

    id: str
    patient: str
    rule_id: str
    rule_version: str | None
    severity: str | None
    status: str
    summary: str
    source: str = Field("stream", description="who raised it: stream (the lab/medication feed) or cds-hooks")
    raised_at: str | None = Field(None, description="when the alert was raised (written), wall clock")
    opened_at: str | None = Field(None, description="clinical time of the data that opened it")
    updated_at: str | None
    closed_at: str | None = None
    snoozed_until: str | None = None
    escalated: Escalation | None = None
    revision: int = Field(description="bumped on every change; send it back (If-Match) when acting")
    last_action: str | None = None
    latest: LatestLabs | None = None
    patient_context: PatientContext | None = None
    display: DisplayFields | None = None


class StatusCounts(BaseModel):
    """Alerts per status and status group (``todo`` = active + acknowledged; ``open``, ``closed``, ``all``)."""

    model_config = ConfigDict(extra="allow")

    todo: int = 0
    open: int = 0
    closed: int = 0
    all: int = 0
    active: int = 0
    acknowledged: int = 0
    accepted: int = 0
    overridden: int = 0
    snoozed: int = 0
    resolved: int = 0
    retracted: int = 0
    expired: int = 0
    withdrawn: int = 0


class AlertPage(BaseModel):
    """A page of the worklist."""

    items: list[AlertSummary]
    next_cursor: str | None = Field(description="opaque; pass as ?cursor= with the same filters; null on the last page")
    counts: StatusCounts = Field(description="alerts per status bucket, for the rule filter when one is given")
    scanned: int = Field(description="index entries walked for this page")


class PatientGroup(BaseModel):
    """One patient of the grouped worklist with its matching alerts (most pressing first)."""

    patient: str
    patient_context: PatientContext | None = None
    latest: LatestLabs | None = None
    alerts: list[AlertSummary]


class PatientPage(BaseModel):
    """A page of the worklist grouped by patient."""

    groups: list[PatientGroup]
    next_cursor: str | None = Field(description="opaque; pass as ?cursor= with the same filters")
    counts: StatusCounts
    scanned: int


class Updates(BaseModel):
    """Alerts an open worklist page has not shown: raised, or escalated and not acted on, after ``since``."""

    since: float
    now: float = Field(description="pass back as since to count from now on")
    new: list[str]
    escalated: list[str]
    count: int


class BulkAcknowledge(BaseModel):
    """Acknowledge several alerts of one patient, each at the revision the client saw."""

    model_config = ConfigDict(extra="forbid")

    alerts: dict[str, int] = Field(min_length=1, max_length=100, description="alert id -> revision seen")
    comment: str | None = Field(None, max_length=2000)


class BulkResult(BaseModel):
    """The outcome per alert of a bulk acknowledge (200, or the status a single transition would get)."""

    id: str
    status: int
    message: str
    revision: int | None = None


class EvidenceItem(BaseModel):
    """A fact the alert rests on."""

    model_config = ConfigDict(extra="allow")

    input: str
    reference: str
    resource_type: str
    resource_id: str
    version: str | None = None
    concept: str
    display: str | None = None
    value: str | None = None
    unit: str | None = None
    reported: str | None = None
    time: str | None = None
    notes: list[str] = []


class HistoryEntry(BaseModel):
    """One transition: who, when, why (plus action-specific fields such as reason, comment, until)."""

    model_config = ConfigDict(extra="allow")

    action: str
    by: str
    at: str
    why: str | None = None


class CitationOut(BaseModel):
    """A source the rule rests on."""

    text: str
    url: str


class ReasonOut(BaseModel):
    """An override reason the rule accepts."""

    system: str
    code: str
    display: str


class Trend(BaseModel):
    """K and Mg results over the trend window, oldest first."""

    start: str
    end: str
    potassium: list[LabPoint]
    magnesium: list[LabPoint]


class EvidenceRow(BaseModel):
    """One evidence fact as people read it (no duplicates, no internal names, local time)."""

    model_config = ConfigDict(extra="allow")

    test: str
    what: str | None = None
    reported: str | None = Field(None, description="value and unit as the lab reported them")
    canonical: str | None = Field(None, description="in the rule's unit, when it differs")
    time: str
    before: str | None = Field(None, description="how long before the decision")
    reference: str | None = None


class MedicationRow(BaseModel):
    """A diuretic, K or Mg therapy or order active in the trend window."""

    model_config = ConfigDict(extra="allow")

    drug: str
    status: str
    start: str
    end: str
    order: bool


class Readable(BaseModel):
    """The detail in clinical words: why it fired, evidence table, medication context (display zone)."""

    why: list[str]
    evidence: list[EvidenceRow]
    medications: list[MedicationRow]
    as_of: str


class AlertDetail(AlertSummary):
    """An alert with its card, evidence, clinical context and full history."""

    rule_title: str | None = None
    card: dict[str, Any] | None = None
    evidence: list[EvidenceItem]
    explanation: str | None = None
    citations: list[CitationOut]
    override_reasons: list[ReasonOut]
    trend: Trend
    history: list[HistoryEntry]
    as_of: str | None = None
    readable: Readable


class TransitionRequest(BaseModel):
    """A pharmacist's action on an alert."""

    model_config = ConfigDict(extra="forbid")

    action: Action
    revision: int | None = Field(
        None, ge=0, description="the revision the client saw; or send it as If-Match; mismatch -> 409"
    )
    reason: str | None = Field(None, max_length=64, description="override only: a code of the rule's override reasons")
    comment: str | None = Field(None, max_length=2000, description="free text, kept in the history")
    until: datetime | None = Field(None, description="snooze only: when the alert comes back (with time zone)")

    @field_validator("until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("until must carry a time zone (e.g. 2024-05-01T12:00:00Z)")
        return value


class RuleFigures(BaseModel):
    """Analytics for one rule version (definitions in the README and ``definitions``)."""

    rule_id: str
    rule_version: str
    fired: int
    per_1000_patients: float | None
    accepted: int
    overridden: int
    resolved_by_hand: int
    acknowledged: int
    ignored: int
    pending: int
    accepted_rate: float
    overridden_rate: float
    resolved_by_hand_rate: float
    acknowledged_rate: float
    ignored_rate: float
    override_reasons: dict[str, int] = Field(description="override reason code -> count")
    override_reason_names: dict[str, str] = Field(description="override reason code -> its display name")
    median_seconds_to_first_action: float | None
    alerts_with_action: int
    closed: dict[str, int] = Field(description="closed alerts by how they closed (resolved, retracted, ...)")
    escalated: int
    raised_by_cds_hooks: int
    acted_on_in_ehr: int


class Analytics(BaseModel):
    """Per-rule analytics."""

    generated_at: str
    patients_seen: int
    opened_from: str | None
    opened_to: str | None
    ignored_after_hours: float
    definitions: dict[str, str]
    rules: list[RuleFigures]


class DataProblemItem(BaseModel):
    """One cause of indeterminate decisions (see workers/state/data_problems.py)."""

    model_config = ConfigDict(extra="allow")

    id: str
    patient: str
    reason: str
    reason_display: str | None = None
    advice: str | None = None
    detail: str
    resources: list[str]
    rules: list[str]
    concept: str | None = None
    reported: str | None = None
    as_of: str
    first_seen: str
    last_seen: str
    occurrences: int
    status: Literal["open", "resolved"]
    revision: int
    resolved_at: str | None = None
    resolved_by: str | None = None
    history: list[HistoryEntry]
    patient_context: PatientContext | None = None
    display: dict[str, str] | None = None


class DataProblemPage(BaseModel):
    """A page of the data-problems queue, last seen first."""

    items: list[DataProblemItem]
    next_cursor: str | None
    counts: dict[str, int]


class DataProblemTransition(BaseModel):
    """Resolve (with a note of what was done) or reopen a data problem."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["resolve", "reopen"]
    revision: int | None = Field(None, ge=0, description="the revision the client saw; or If-Match")
    comment: str | None = Field(None, max_length=2000, description="resolve: what was done (required)")


class Problem(BaseModel):
    """FHIR OperationOutcome returned on every error of the review API."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["OperationOutcome"] = "OperationOutcome"
    issue: list[dict[str, Any]]
