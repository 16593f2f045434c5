"""Request and response models of the review API (they document the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Status = Literal["active", "acknowledged", "snoozed", "overridden", "accepted", "resolved", "retracted"]
Bucket = Literal["open", "all", "active", "acknowledged", "snoozed", "overridden", "accepted", "resolved", "retracted"]
Severity = Literal["critical", "warning", "info"]
Sort = Literal["severity", "oldest", "newest"]
Action = Literal["acknowledge", "override", "snooze", "resolve", "reopen"]


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


class AlertSummary(BaseModel):
    """One worklist row."""

    id: str
    patient: str
    rule_id: str
    rule_version: str | None
    severity: str | None
    status: str
    summary: str
    opened_at: str | None
    updated_at: str | None
    closed_at: str | None = None
    snoozed_until: str | None = None
    revision: int = Field(description="bumped on every change; send it back (If-Match) when acting")
    last_action: str | None = None
    latest: LatestLabs | None = None


class StatusCounts(BaseModel):
    """Alerts per status bucket (``open`` = active + acknowledged), for the filter bar."""

    model_config = ConfigDict(extra="allow")

    open: int = 0
    all: int = 0
    active: int = 0
    acknowledged: int = 0
    snoozed: int = 0
    overridden: int = 0
    accepted: int = 0
    resolved: int = 0
    retracted: int = 0


class AlertPage(BaseModel):
    """A page of the worklist."""

    items: list[AlertSummary]
    next_cursor: str | None = Field(description="opaque; pass as ?cursor= with the same filters; null on the last page")
    counts: StatusCounts = Field(description="alerts per status bucket, for the rule filter when one is given")
    scanned: int = Field(description="index entries walked for this page")


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
    ignored: int
    pending: int
    accepted_rate: float
    overridden_rate: float
    ignored_rate: float
    override_reasons: dict[str, int]
    median_seconds_to_first_action: float | None
    alerts_with_action: int


class Analytics(BaseModel):
    """Per-rule analytics."""

    generated_at: str
    patients_seen: int
    opened_from: str | None
    opened_to: str | None
    ignored_after_hours: float
    definitions: dict[str, str]
    rules: list[RuleFigures]


class Problem(BaseModel):
    """FHIR OperationOutcome returned on every error of the review API."""

    model_config = ConfigDict(extra="allow")

    resourceType: Literal["OperationOutcome"] = "OperationOutcome"
    issue: list[dict[str, Any]]
