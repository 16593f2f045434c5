"""The review JSON API under ``/api/review``: worklist, detail, transitions, analytics, audit export."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from config.settings import get_settings
from service.review import core
from service.review.auth import Principal, admin, pharmacist, reader
from service.review.models import (
    AlertDetail,
    AlertPage,
    Analytics,
    Bucket,
    Problem,
    Severity,
    Sort,
    TransitionRequest,
)
from workers.analytics import AUDIT_COLUMNS, audit_rows, iter_alerts, rule_analytics
from workers.state import keys
from workers.state import review_index as rq

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
) -> rq.Query:
    return rq.Query(
        status=status,
        rule=rule or None,
        severity=severity,
        patient=patient or None,
        text=(q or "").strip() or None,
        opened_from=core.parse_opened(opened_from, "opened_from"),
        opened_to=core.parse_opened(opened_to, "opened_to"),
        sort=sort,
        limit=limit or get_settings().review_page_size,
    )


@router.get("/alerts", response_model=AlertPage)
def list_alerts(
    _: Annotated[Principal, Depends(reader)],
    status: Bucket = "open",
    rule: Annotated[str | None, Query(pattern=TEXT_ID)] = None,
    severity: Severity | None = None,
    patient: Annotated[str | None, Query(pattern=TEXT_ID)] = None,
    q: Annotated[str | None, Query(max_length=100, description="text in the summary, rule, patient or id")] = None,
    opened_from: Annotated[str | None, Query(description="opened at or after (ISO time, UTC if no zone)")] = None,
    opened_to: Annotated[str | None, Query(description="opened at or before (ISO time)")] = None,
    sort: Sort = "severity",
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> dict[str, Any]:
    """The hospital-wide worklist.

    Default: open alerts (active + acknowledged), most severe first, then longest waiting first. ``status``
    takes one status or the buckets ``open`` / ``all``; ``sort`` is ``severity`` | ``oldest`` | ``newest``
    (by opening time). Pages are cursor based: pass ``next_cursor`` back as ``cursor`` with the same
    filters. ``counts`` gives the number of alerts per status for the filter bar.
    """
    query = _query(status, rule, severity, patient, q, opened_from, opened_to, sort, limit)
    return core.list_alerts(query, cursor)


@router.get("/alerts/{alert_id}", response_model=AlertDetail, responses={404: {"model": Problem}})
def get_alert(alert_id: str, _: Annotated[Principal, Depends(reader)]) -> dict[str, Any]:
    """One alert: card, evidence, K/Mg trend, rule id and version, explanation, citations, override
    reasons and the full history (pipeline, pharmacists and EHR users via CDS Hooks feedback)."""
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
    """Acknowledge, override (reason from the rule's override reasons, optional comment), snooze until a
    time, resolve by hand, or reopen. The revision the client saw is required (``If-Match`` header or
    ``revision``); a different current revision is a 409, so two pharmacists cannot overwrite each other.
    The actor recorded in the history is the token's subject. Pharmacists only."""
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


def _check_id(alert_id: str) -> None:
    if not re.match(ALERT_ID, alert_id):
        raise core.ReviewError(400, f"invalid alert id {alert_id!r}", "alert_id")


@router.get("/analytics", response_model=Analytics)
def analytics(
    _: Annotated[Principal, Depends(admin)],
    opened_from: Annotated[str | None, Query(description="only alerts opened at or after (ISO time)")] = None,
    opened_to: Annotated[str | None, Query(description="only alerts opened before (ISO time)")] = None,
) -> dict[str, Any]:
    """Per rule and version: alerts fired, per 1,000 patients seen, accepted / overridden / ignored rates,
    override reasons, median time to first action. Admins only."""
    return compute_analytics(core.parse_opened(opened_from, "opened_from"), core.parse_opened(opened_to, "opened_to"))


def compute_analytics(start: datetime | None, end: datetime | None) -> dict[str, Any]:
    """The analytics body for alerts opened in [start, end) (either open-ended)."""
    index = core.get_index()
    now = rq.utcnow()
    settings = get_settings()
    alerts = (
        a
        for a in iter_alerts(index)
        if (start is None or rq.epoch(a.get("opened_at")) >= start.timestamp())
        and (end is None or rq.epoch(a.get("opened_at")) < end.timestamp())
    )
    patients = int(index.client.scard(keys.patients()))
    ignored_after = timedelta(hours=settings.review_ignored_after_hours)
    return {
        "generated_at": now.isoformat().replace("+00:00", "Z"),
        "patients_seen": patients,
        "opened_from": start and start.isoformat(),
        "opened_to": end and end.isoformat(),
        "ignored_after_hours": settings.review_ignored_after_hours,
        "definitions": DEFINITIONS,
        "rules": rule_analytics(alerts, patients, now, ignored_after),
    }


DEFINITIONS = {
    "fired": "alerts opened, counted under the rule version the alert carries now",
    "per_1000_patients": "fired x 1000 / patients the pipeline has seen (any event used by the rules)",
    "accepted": "first user action (snoozes aside) was accept (CDS suggestion), acknowledge or resolve by hand",
    "overridden": "first user action (snoozes aside) was override",
    "ignored": "no user action (snoozes aside) and the alert is closed automatically or open longer than "
    "ignored_after_hours",
    "pending": "no user action yet and open for less than ignored_after_hours",
    "median_seconds_to_first_action": "median over alerts with a user action of the seconds from opened_at "
    "(clinical time that opened the alert) to the first user action of any kind",
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
    """The audit trail (every history entry of every alert: who, when, what, why) for a time range,
    streamed as CSV or ndjson, alert by alert, time-ordered within an alert. Admins only."""
    low = core.parse_opened(start, "from")
    high = core.parse_opened(end, "to")
    if low is None or high is None or high <= low:
        raise core.ReviewError(400, "'to' must be after 'from'", "to")
    rows = audit_rows(iter_alerts(core.get_index()), low, high)
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
