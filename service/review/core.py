"""What the review API and the review page share: list, detail and act on alerts."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from config.settings import get_settings
from rules.fhirtime import parse_time
from workers.pipeline import get_catalog, get_store
from workers.state import review_index as rq
from workers.state.review_index import CursorError, Query, ReviewIndex, epoch, lab_trend, latest_labs, summarize
from workers.state.store import TransitionError

_IF_MATCH = re.compile(r'^\s*(?:W/)?"?(\d{1,12})"?\s*$')
ACTIONS_BY_STATUS = {
    # what the page offers for each status (mirrors workers/state/lua/transition_alert.lua, which has the last word)
    "active": ("acknowledge", "override", "snooze", "resolve"),
    "acknowledged": ("override", "snooze", "resolve", "reopen"),
    "snoozed": ("override", "snooze", "resolve", "reopen"),
    "overridden": ("resolve", "reopen"),
    "accepted": ("resolve", "reopen"),
    "resolved": ("reopen",),
    "retracted": (),
}


class ReviewError(Exception):
    """An error answered as a FHIR OperationOutcome with this HTTP status."""

    def __init__(self, status: int, message: str, expression: str | None = None, code: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.message, self.expression, self.code = status, message, expression, code


def get_index() -> ReviewIndex:
    """The worklist index on this process's store."""
    settings = get_settings()
    return ReviewIndex(
        get_store(), overlap_seconds=settings.review_index_overlap_seconds, scan_budget=settings.review_scan_budget
    )


def refresh(index: ReviewIndex) -> None:
    """Bring the index up to date; a snooze whose time has passed shows as active again (lazily, on read:
    the alert keeps ``snoozed_until`` in the past, which the transition script also reads as active)."""
    index.sync()
    for alert_id in index.due_snoozes(rq.utcnow()):
        alert = index.store.find_alert(alert_id)
        if alert is not None:
            index.index_alert(alert["patient"], alert)


def list_alerts(query: Query, cursor: str | None) -> dict[str, Any]:
    """A worklist page with counts per status and each row's latest K and Mg."""
    index = get_index()
    refresh(index)
    try:
        page = index.list(query, cursor)
    except CursorError as exc:
        raise ReviewError(400, str(exc), "cursor") from exc
    latest = _latest_for(index, {s["patient"] for s in page.items})
    items = [{**s, "latest": latest.get(s["patient"])} for s in page.items]
    counts = index.counts(query.rule)  # per status, for the rule the bar is filtered on
    return {"items": items, "next_cursor": page.next_cursor, "counts": counts, "scanned": page.scanned}


def _latest_for(index: ReviewIndex, patients: set[str]) -> dict[str, dict[str, Any]]:
    return {patient: latest_labs(index.store.timeline(patient)) for patient in sorted(patients)}


def alert_detail(alert_id: str) -> dict[str, Any]:
    """The detail of one alert (404 ReviewError when unknown)."""
    index = get_index()
    refresh(index)
    alert = index.store.find_alert(alert_id)
    if alert is None:
        raise ReviewError(404, f"no alert with id {alert_id}", "alert_id", code="not-found")
    return detail_of(index, alert)


def detail_of(index: ReviewIndex, alert: dict[str, Any]) -> dict[str, Any]:
    """Detail fields of an alert read from the store."""
    patient = alert["patient"]
    facts = index.store.timeline(patient)
    settings = get_settings()
    latest = latest_labs(facts)
    end = _trend_end(alert, latest)
    trend = lab_trend(facts, end, settings.review_trend_days)
    rule = get_catalog().get(alert["rule_id"])
    return {
        **summarize(patient, alert),
        "latest": latest,
        "rule_title": rule.title if rule else None,
        "card": alert.get("card"),
        "evidence": [_lists(e, "notes") for e in alert.get("evidence") or []],
        "explanation": alert.get("explanation"),
        "citations": [c.model_dump() for c in rule.citations] if rule else [],
        "override_reasons": [c.model_dump() for c in rule.card.override_reasons] if rule else [],
        "trend": {
            "start": _z(end - timedelta(days=settings.review_trend_days)),
            "end": _z(end),
            **trend,
        },
        "history": alert.get("history") or [],
        "as_of": alert.get("as_of"),
    }


def _lists(item: dict[str, Any], *names: str) -> dict[str, Any]:
    """Lua's cjson writes an empty array as ``{}``: read those fields back as lists."""
    return {**item, **{n: [] for n in names if item.get(n) == {}}}


def _z(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _trend_end(alert: dict[str, Any], latest: dict[str, Any]) -> datetime:
    """The trend window ends at the patient's latest data (the alert's clinical clock or a later K/Mg result),
    not after now; never at ``updated_at``, which a user's action sets to the wall clock."""
    candidates = [epoch(alert.get("as_of"))]
    candidates += [epoch(p["time"]) for p in latest.values() if p and p.get("time")]
    now = rq.utcnow()
    best = max(candidates)
    return now if best <= 0 else min(now, datetime.fromtimestamp(best, now.tzinfo))


def parse_if_match(header: str | None) -> int | None:
    """The revision in an If-Match header (``"3"``, ``W/"3"`` or ``3``); ReviewError if unreadable."""
    if header is None:
        return None
    match = _IF_MATCH.match(header)
    if not match:
        raise ReviewError(400, 'If-Match must be the alert revision, e.g. "3"', "If-Match")
    return int(match.group(1))


def act(
    alert_id: str,
    action: str,
    actor: str,
    *,
    revision: int | None,
    reason: str | None = None,
    comment: str | None = None,
    until: datetime | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Validate and apply a pharmacist's transition; returns the alert detail after it."""
    index = get_index()
    refresh(index)
    store = index.store
    alert = store.find_alert(alert_id)
    if alert is None:
        raise ReviewError(404, f"no alert with id {alert_id}", "alert_id", code="not-found")
    if revision is None:
        raise ReviewError(
            428,
            "send the alert revision you saw (If-Match header or 'revision') so a concurrent change is not lost",
            "revision",
            code="required",
        )
    now = rq.utcnow()
    coding = _check_fields(alert, action, reason, comment, until, now)
    try:
        after = store.transition(
            alert_id,
            action,
            actor,
            now,
            expected_revision=revision,
            reason=coding,
            comment=comment or None,
            until=until,
            idempotency_key=idempotency_key,
            source="review",
        )
    except TransitionError as exc:
        status = {"not-found": 404, "illegal": 409, "conflict": 409, "invalid": 400}.get(exc.code, 409)
        code = {"not-found": "not-found", "conflict": "conflict"}.get(exc.code, "business-rule")
        raise ReviewError(status, exc.message, "action" if exc.code == "illegal" else "revision", code) from exc
    index.index_alert(after["patient"], after)
    return detail_of(index, after)


def _check_fields(
    alert: dict[str, Any], action: str, reason: str | None, comment: str | None, until: datetime | None, now: datetime
) -> dict[str, Any] | None:
    """Check the action's fields; returns the override reason as the rule's Coding."""
    coding = None
    if action == "override":
        rule = get_catalog().get(alert["rule_id"])
        allowed = {c.code: c.model_dump() for c in rule.card.override_reasons} if rule else {}
        if not reason:
            raise ReviewError(400, f"override needs a reason, one of: {', '.join(allowed)}", "reason", "required")
        if reason not in allowed:
            known = ", ".join(allowed)
            message = f"reason {reason!r} is not an override reason of {alert['rule_id']}: {known}"
            raise ReviewError(400, message, "reason")
        coding = allowed[reason]
    elif reason:
        raise ReviewError(400, f"a reason is only taken with override, not {action}", "reason")
    if action == "snooze":
        if until is None:
            raise ReviewError(400, "snooze needs 'until' (a time with time zone)", "until", "required")
        limit = get_settings().review_snooze_max_hours
        if until <= now:
            raise ReviewError(400, "until must be in the future", "until")
        if until - now > timedelta(hours=limit):
            raise ReviewError(400, f"a snooze may last at most {limit:g} hours", "until")
    elif until is not None:
        raise ReviewError(400, f"'until' is only taken with snooze, not {action}", "until")
    return coding


def parse_opened(value: str | None, name: str) -> datetime | None:
    """A filter time (ISO, or the page's ``YYYY-MM-DDTHH:MM`` taken as UTC); ReviewError if unreadable."""
    if not value:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise ReviewError(400, f"{name}: {exc}", name) from exc
