"""The review JSON API under ``/api/review``: worklist, detail, transitions, analytics, audit export."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import StreamingResponse

from config.settings import get_settings
from service.review import core, problems
from service.review.auth import Principal, admin, pharmacist, reader
from service.review.models import (
    AlertDetail,
    AlertPage,
    Analytics,
    Bucket,
    BulkAcknowledge,
    BulkResult,
    DataProblemItem,
    DataProblemPage,
    DataProblemTransition,
    PatientPage,
    Problem,
    Severity,
    Sort,
    TransitionRequest,
    Updates,
)
from workers.analytics import AUDIT_COLUMNS, audit_rows, iter_alerts, problem_audit_rows, rule_analytics
from workers.pipeline import get_catalog
from workers.state import keys
from workers.state import review_index as rq
from workers.state.data_problems import REASONS, ProblemQuery

PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "bad input (the issue names the field)"},
    401: {"description": "no or invalid token"},
    403: {"description": "the token's roles do not allow this"},
}
ALERT_ID = r"^[A-Za-z0-9\-]{1,64}$"
TEXT_ID = r"^[A-Za-z0-9\-.]{1,64}$"

router = APIRouter(prefix="/api/review", tags=["review"], responses=PROBLEMS)


def _query(
    status: Bucket,
    rule: str | None,
    severity: Severity | None,
    patient: str | None,
    q: str | None,
    opened_from: str | None,
    opened_to: str | None,
    sort: Sort,
    limit: int | None,
    ward: str | None = None,
    encounter_class: str | None = None,
    group: bool = False,
) -> rq.Query:
    return core.build_query(
        status,
        rule=rule,
        severity=severity,
        patient=(patient or "").strip(),
        text=(q or "").strip(),
        opened_from=opened_from,
        opened_to=opened_to,
        sort=sort,
        limit=limit,
        ward=ward,
        encounter_class=encounter_class,
        group=group,
    )


PatientText = Annotated[
    str | None, Query(max_length=100, description="patient: FHIR id, MRN, or part of the name (when known)")
]
WardText = Annotated[str | None, Query(max_length=64, description="current ward (when patient context is known)")]
ClassCode = Annotated[
    str | None, Query(pattern=r"^[A-Za-z_\-]{1,16}$", description="encounter class (HL7 v3 ActCode: IMP, EMER, AMB)")
]
RaisedFrom = Annotated[str | None, Query(description="raised at or after (ISO time; no zone: the display time zone)")]
RaisedTo = Annotated[str | None, Query(description="raised at or before (ISO time; no zone: the display time zone)")]


@router.get("/alerts", response_model=AlertPage)
def list_alerts(
    _: Annotated[Principal, Depends(reader)],
    status: Bucket = "todo",
    rule: Annotated[str | None, Query(pattern=TEXT_ID)] = None,
    severity: Severity | None = None,
    patient: PatientText = None,
    ward: WardText = None,
    encounter_class: ClassCode = None,
    q: Annotated[str | None, Query(max_length=100, description="text in the summary, rule, patient or id")] = None,
    opened_from: RaisedFrom = None,
    opened_to: RaisedTo = None,
    sort: Sort = "severity",
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> dict[str, Any]:
    """The hospital-wide worklist.

    Default: the to-do list (active + acknowledged), escalated alerts nobody has acted on first, then most
    severe, then longest waiting (by when raised). ``status`` takes one status or a group: ``todo``, ``open``
    (every open status), ``closed``, ``all``; ``sort`` is ``severity`` | ``oldest`` | ``newest``. Pages are
    cursor based: pass ``next_cursor`` back as ``cursor`` with the same filters. ``counts`` gives the number of
    alerts per status and group for the filter bar. Each row carries ``patient_context`` (null while patient
    context is not available) and ``display`` (local times, age)."""
    query = _query(status, rule, severity, patient, q, opened_from, opened_to, sort, limit, ward, encounter_class)
    return core.list_alerts(query, cursor)


@router.get("/patients", response_model=PatientPage)
def list_patients(
    _: Annotated[Principal, Depends(reader)],
    status: Bucket = "todo",
    rule: Annotated[str | None, Query(pattern=TEXT_ID)] = None,
    severity: Severity | None = None,
    patient: PatientText = None,
    ward: WardText = None,
    encounter_class: ClassCode = None,
    q: Annotated[str | None, Query(max_length=100)] = None,
    opened_from: RaisedFrom = None,
    opened_to: RaisedTo = None,
    sort: Sort = "severity",
    limit: Annotated[int | None, Query(ge=1, le=500, description="patients per page")] = None,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> dict[str, Any]:
    """The worklist grouped by patient: one entry per patient with all its alerts that match the filters, in
    the order of each patient's most pressing alert (same filters and order as ``/alerts``)."""
    query = _query(
        status, rule, severity, patient, q, opened_from, opened_to, sort, limit, ward, encounter_class, group=True
    )
    return core.list_patients(query, cursor)


@router.get("/updates", response_model=Updates)
def updates(
    _: Annotated[Principal, Depends(reader)],
    since: Annotated[float, Query(ge=0, description="epoch seconds: the page's render time or a previous now")],
    status: Bucket = "todo",
    rule: Annotated[str | None, Query(pattern=TEXT_ID)] = None,
    severity: Severity | None = None,
    patient: PatientText = None,
    ward: WardText = None,
    encounter_class: ClassCode = None,
    q: Annotated[str | None, Query(max_length=100)] = None,
) -> dict[str, Any]:
    """Alerts matching the filters that were raised, or escalated and not acted on, after ``since``: what an
    open worklist page polls for its "n new" cue."""
    query = _query(status, rule, severity, patient, q, None, None, "severity", 1, ward, encounter_class)
    return core.updates(query, since)


@router.get("/alerts/{alert_id}", response_model=AlertDetail, responses={404: {"model": Problem}})
def get_alert(alert_id: str, _: Annotated[Principal, Depends(reader)]) -> dict[str, Any]:
    """One alert: card, evidence, K/Mg trend, rule id and version, explanation, citations, override
    reasons, the full history (pipeline, pharmacists and EHR users via CDS Hooks feedback) and ``readable``
    (why it fired, evidence and medications in clinical words and local time)."""
    _check_id(alert_id)
    return core.alert_detail(alert_id)


@router.post(
    "/alerts/{alert_id}/transitions",
    response_model=AlertDetail,
    responses={
        404: {"model": Problem},
        409: {"model": Problem, "description": "illegal from the current status, or the revision is stale"},
        428: {"model": Problem, "description": "no revision sent (If-Match or body)"},
    },
)
def transition(
    alert_id: str,
    body: TransitionRequest,
    principal: Annotated[Principal, Depends(pharmacist)],
    if_match: Annotated[str | None, Header(description='the revision the client saw, e.g. "3"')] = None,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> dict[str, Any]:
    """Acknowledge, accept (the recommendation is being followed), override (reason from the rule's override
    reasons, optional comment), snooze until a time, resolve by hand, or reopen. The revision the client saw
    is required (``If-Match`` header or ``revision``); a different current revision is a 409, so two
    pharmacists cannot overwrite each other. The actor recorded in the history is the token's subject."""
    _check_id(alert_id)
    header_revision = core.parse_if_match(if_match)
    if header_revision is not None and body.revision is not None and header_revision != body.revision:
        raise core.ReviewError(400, "If-Match and revision disagree", "revision")
    revision = body.revision if body.revision is not None else header_revision
    return core.act(
        alert_id,
        body.action,
        principal.actor,
        revision=revision,
        reason=body.reason,
        comment=body.comment,
        until=body.until,
        idempotency_key=idempotency_key,
    )


@router.post("/patients/{patient_id}/acknowledge", response_model=list[BulkResult])
def acknowledge_patient(
    patient_id: Annotated[str, Path(pattern=TEXT_ID)],
    body: BulkAcknowledge,
    principal: Annotated[Principal, Depends(pharmacist)],
) -> list[dict[str, Any]]:
    """Acknowledge several alerts of one patient, each at the revision the client saw. Each alert is its own
    transition: one that changed since (409, stale revision) or is not active any more is reported in its
    entry and left alone; the others are acknowledged."""
    for alert_id in body.alerts:
        _check_id(alert_id)
    return core.acknowledge_patient(patient_id, body.alerts, principal.actor, body.comment)


def _check_id(alert_id: str) -> None:
    if not re.match(ALERT_ID, alert_id):
        raise core.ReviewError(400, f"invalid alert id {alert_id!r}", "alert_id")


@router.get("/analytics", response_model=Analytics)
def analytics(
    _: Annotated[Principal, Depends(admin)],
    opened_from: RaisedFrom = None,
    opened_to: RaisedTo = None,
) -> dict[str, Any]:
    """Per rule and version, for the alerts raised in the window: fired, per 1,000 patients seen, outcomes
    (accepted / overridden / resolved by hand / acknowledged only / ignored / pending) and their rates,
    override reasons with their names, median time to first action, how closed alerts closed, escalations,
    and what came from or was done in the EHR. Admins only."""
    return compute_analytics(core.parse_opened(opened_from, "opened_from"), core.parse_opened(opened_to, "opened_to"))


def compute_analytics(start: datetime | None, end: datetime | None) -> dict[str, Any]:
    """The analytics body for alerts raised in [start, end) (either open-ended)."""
    index = core.get_index()
    now = rq.utcnow()
    settings = get_settings()
    alerts = (
        a
        for a in iter_alerts(index)
        if (start is None or rq.epoch(rq.raised_at(a)) >= start.timestamp())
        and (end is None or rq.epoch(rq.raised_at(a)) < end.timestamp())
    )
    patients = int(index.client.scard(keys.patients()))
    ignored_after = timedelta(hours=settings.review_ignored_after_hours)
    rules = rule_analytics(alerts, patients, now, ignored_after)
    catalog = get_catalog()
    for figures in rules:
        rule = catalog.get(figures["rule_id"])
        names = {c.code: c.display for c in rule.card.override_reasons} if rule else {}
        figures["override_reason_names"] = {code: names.get(code, code) for code in figures["override_reasons"]}
    return {
        "generated_at": now.isoformat().replace("+00:00", "Z"),
        "patients_seen": patients,
        "opened_from": start and start.isoformat(),
        "opened_to": end and end.isoformat(),
        "ignored_after_hours": settings.review_ignored_after_hours,
        "definitions": DEFINITIONS,
        "rules": rules,
    }


DEFINITIONS = {
    "fired": "alerts raised in the window (by when they were raised, wall clock), counted under the rule "
    "version the alert carries now",
    "per_1000_patients": "fired x 1000 / patients the pipeline has seen (any event used by the rules, all time)",
    "accepted": "the first decisive action (accept, override or resolve) was accept: the recommendation was "
    "taken, as a card suggestion accepted in the EHR or Accept on the review page",
    "overridden": "the first decisive action was override (with a reason)",
    "resolved_by_hand": "the first decisive action was resolving it by hand",
    "acknowledged": "someone acknowledged it but nobody accepted, overrode or resolved it; acknowledging is "
    "not acceptance",
    "ignored": "no user action (snoozes aside) and the alert closed by itself or was raised more than "
    "ignored_after_hours ago",
    "pending": "no user action yet and raised less than ignored_after_hours ago",
    "median_seconds_to_first_action": "median over alerts with a user action of the seconds from when the alert "
    "was raised to the first user action of any kind (both wall clock)",
    "closed": "alerts closed by the pipeline or by hand, by how they closed: resolved, retracted (source entered "
    "in error or deleted), expired (evidence aged out), withdrawn (rule stopped firing otherwise)",
    "escalated": "alerts that escalated at least once (became active again after a person had acted)",
    "raised_by_cds_hooks": "alerts raised by a CDS Hooks call before (or without) the stream",
    "acted_on_in_ehr": "alerts with at least one action by an EHR user through CDS Hooks feedback",
}


@router.get(
    "/audit",
    responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}, "description": "streamed rows"}},
)
def audit(
    _: Annotated[Principal, Depends(admin)],
    start: Annotated[str, Query(alias="from", description="entries at or after this time (ISO)")],
    end: Annotated[str, Query(alias="to", description="entries before this time (ISO)")],
    format: Literal["csv", "ndjson"] = "csv",
) -> StreamingResponse:
    """The audit trail for a time range, streamed as CSV or ndjson: every history entry of every alert (who,
    when, what, why; pharmacists, the pipeline and EHR users through CDS Hooks feedback), alert by alert and
    time-ordered within an alert, then every entry of the data-problems queue (``record_type``
    ``data-problem``). Times are ISO UTC. Admins only."""
    low = core.parse_opened(start, "from")
    high = core.parse_opened(end, "to")
    if low is None or high is None or high <= low:
        raise core.ReviewError(400, "'to' must be after 'from'", "to")
    alert_rows = audit_rows(iter_alerts(core.get_index()), low, high)
    rows = itertools.chain(alert_rows, problem_audit_rows(problems.queue().iter_all(), low, high))
    stamp = f"{low:%Y%m%dT%H%M%SZ}-{high:%Y%m%dT%H%M%SZ}"
    if format == "ndjson":
        body: Iterator[str] = (json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
        media = "application/x-ndjson"
    else:
        body = _csv_lines(rows)
        media = "text/csv; charset=utf-8"
    headers = {"Content-Disposition": f'attachment; filename="ehr-alerts-audit-{stamp}.{format}"'}
    return StreamingResponse(body, media_type=media, headers=headers)


def _csv_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=AUDIT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
        if buffer.tell() > 16384:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _cell(value: Any) -> Any:
    """CSV cell; text that a spreadsheet would run as a formula is prefixed with a quote."""
    if isinstance(value, list | dict):
        value = json.dumps(value)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


# --- data problems ----------------------------------------------------------------------------------------------

ProblemId = Annotated[str, Path(pattern=r"^[0-9a-f]{24}$")]


@router.get("/data-problems", response_model=DataProblemPage)
def list_data_problems(
    _: Annotated[Principal, Depends(reader)],
    status: Literal["open", "resolved", "all"] = "open",
    reason: Annotated[str | None, Query(description=f"one of {', '.join(REASONS)}")] = None,
    patient: PatientText = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> dict[str, Any]:
    """The data-problems queue: why decisions were indeterminate (unknown unit, unit contradicting the test
    code, implausible or unreadable value, future date), one item per cause, last seen first, with what to
    do about it, the resources, the rules it affected and how often it was seen."""
    if reason is not None and reason not in REASONS:
        raise core.ReviewError(400, f"reason must be one of {', '.join(REASONS)}", "reason")
    query = ProblemQuery(
        status=status,
        reason=reason,
        patients=core.resolve_patients(patient, None, None),
        limit=limit or get_settings().review_page_size,
    )
    return problems.list_problems(query, cursor)


@router.post(
    "/data-problems/{item_id}/transitions",
    response_model=DataProblemItem,
    responses={404: {"model": Problem}, 409: {"model": Problem}, 428: {"model": Problem}},
)
def data_problem_transition(
    item_id: ProblemId,
    body: DataProblemTransition,
    principal: Annotated[Principal, Depends(pharmacist)],
    if_match: Annotated[str | None, Header(description='the revision the client saw, e.g. "3"')] = None,
) -> dict[str, Any]:
    """Resolve a data problem (``comment``: what was done, required; it is the audit record) or reopen it.
    Revision-checked like alert transitions. Pharmacists (and admins)."""
    header_revision = core.parse_if_match(if_match)
    revision = body.revision if body.revision is not None else header_revision
    return problems.act(item_id, body.action, principal.actor, revision=revision, comment=body.comment)
