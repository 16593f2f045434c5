"""What the review API and the review page share: list, group, detail and act on alerts."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from config.localtime import display_zone, format_instant
from config.settings import get_settings
from rules.facts import Fact
from rules.fhirtime import parse_time
from service.review import patients as directory
from service.review.readable import duration, evidence_rows, medication_rows, why_lines
from service.review.trend import chart_spec, render_chart
from workers.pipeline import get_catalog, get_store
from workers.state import review_index as rq
from workers.state.review_index import CursorError, Query, ReviewIndex, epoch, lab_trend, latest_labs, summarize
from workers.state.store import TransitionError

_IF_MATCH = re.compile(r'^\s*(?:W/)?"?(\d{1,12})"?\s*$')
_LOCAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?")  # a datetime-local field: no zone
PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ACTIONS_BY_STATUS: dict[str, tuple[str, ...]] = {
    # what the page offers for each status (mirrors workers/state/lua/transition_alert.lua, which has the last word)
    "active": ("acknowledge", "accept", "override", "snooze", "resolve"),
    "acknowledged": ("accept", "override", "snooze", "resolve", "reopen"),
    "snoozed": ("accept", "override", "snooze", "resolve", "reopen"),
    "overridden": ("resolve", "reopen"),
    "accepted": ("resolve", "reopen"),
    "resolved": ("reopen",),
    "retracted": (),
    "expired": (),
    "withdrawn": (),
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


# --- patient filters ---------------------------------------------------------------------------------------------


def resolve_patients(patient: str | None, ward: str | None, encounter_class: str | None) -> frozenset[str] | None:
    """The patient ids the patient filters select (None: no patient filter). ``patient`` is a FHIR id, an MRN
    or part of a name (the directory answers the last two); ward and encounter class narrow it further."""
    selected: set[str] | None = None
    text = (patient or "").strip()
    if text:
        selected = set(directory.find_patients(text))
        if PATIENT_ID.match(text):
            selected.add(text)
    if ward or encounter_class:
        located = directory.patients_where(ward, encounter_class)
        selected = located if selected is None else selected & located
    return frozenset(selected) if selected is not None else None


def build_query(
    status: str,
    *,
    rule: str | None,
    severity: str | None,
    patient: str,
    text: str,
    opened_from: str | None,
    opened_to: str | None,
    sort: str,
    limit: int | None,
    ward: str | None,
    encounter_class: str | None,
    group: bool,
) -> Query:
    """The index query for the worklist filters (shared by the API and the page; ``patient`` and ``text`` come
    trimmed, empty filters may be "" or None, no ``limit`` is a page)."""
    return Query(
        status=status,
        rule=rule or None,
        severity=severity or None,
        patient=patient or None,
        text=text or None,
        opened_from=parse_opened(opened_from, "opened_from"),
        opened_to=parse_opened(opened_to, "opened_to"),
        sort=sort,
        limit=limit or get_settings().review_page_size,
        patients=resolve_patients(patient, ward, encounter_class),
        context=(ward or "", encounter_class or ""),
        group=group,
    )


# --- lists ---------------------------------------------------------------------------------------------------------


def list_alerts(query: Query, cursor: str | None) -> dict[str, Any]:
    """A worklist page with counts per status and each row's latest K and Mg, patient and display fields."""
    index = get_index()
    refresh(index)
    try:
        page = index.list(query, cursor)
    except CursorError as exc:
        raise ReviewError(400, str(exc), "cursor") from exc
    people = _people(index, {s["patient"] for s in page.items})
    items = [decorate(s, people) for s in page.items]
    counts = index.counts(query.rule)  # per status, for the rule the bar is filtered on
    return {"items": items, "next_cursor": page.next_cursor, "counts": counts, "scanned": page.scanned}


def list_patients(query: Query, cursor: str | None) -> dict[str, Any]:
    """A page of patients, each with its matching alerts, in the order of each one's most pressing alert."""
    index = get_index()
    refresh(index)
    try:
        page = index.list_patients(query, cursor)
    except CursorError as exc:
        raise ReviewError(400, str(exc), "cursor") from exc
    people = _people(index, {g["patient"] for g in page.groups})
    groups = []
    for group in page.groups:
        alerts = [decorate(s, people) for s in group["alerts"]]
        person = people[group["patient"]]
        groups.append({"patient": group["patient"], **person, "alerts": alerts})
    counts = index.counts(query.rule)
    return {"groups": groups, "next_cursor": page.next_cursor, "counts": counts, "scanned": page.scanned}


def updates(query: Query, since: float) -> dict[str, Any]:
    """What an open worklist page has not shown yet: alerts raised or escalated after ``since`` (epoch)."""
    index = get_index()
    refresh(index)
    changes = index.changes(query, since)
    return {"since": since, "now": rq.utcnow().timestamp(), **changes, "count": sum(map(len, changes.values()))}


def _people(
    index: ReviewIndex, patients: set[str], timelines: dict[str, list[Fact]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per patient: latest K and Mg, and who the patient is (``patient_context``, None while unknown).
    ``timelines``: facts the caller already read, by patient (the others are read from the store)."""
    known = directory.patient_contexts(patients)
    read = timelines or {}
    return {
        p: {
            "latest": latest_labs(read[p] if p in read else index.store.timeline(p)),
            "patient_context": known.get(p),
        }
        for p in sorted(patients)
    }


def decorate(summary: dict[str, Any], people: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A summary with its patient's latest labs and context, and the display fields (local times, age)."""
    person = people.get(summary["patient"]) or {}
    return {
        **{k: v for k, v in summary.items() if k != "buckets"},
        "latest": person.get("latest"),
        "patient_context": person.get("patient_context"),
        "display": display_fields(summary),
    }


def display_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """Times as people read them, in the display zone: raised (wall clock), clinical opening time, age."""
    now = rq.utcnow().timestamp()
    raised = summary.get("raised_at")
    return {
        "timezone": get_settings().display_timezone,
        "raised_at": format_instant(raised),
        "opened_at": format_instant(summary.get("opened_at")),
        "age": duration(now - epoch(raised)) if raised and epoch(raised) <= now else None,
        "snoozed_until": format_instant(summary.get("snoozed_until")) if summary.get("snoozed_until") else None,
    }


# --- detail --------------------------------------------------------------------------------------------------------


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
    people = _people(index, {patient}, {patient: facts})
    latest = people[patient]["latest"]
    end = _trend_end(alert, latest)
    start = end - timedelta(days=settings.review_trend_days)
    trend = lab_trend(facts, end, settings.review_trend_days)
    rule = get_catalog().get(alert["rule_id"])
    evidence = [_lists(e, "notes") for e in alert.get("evidence") or []]
    summary = decorate(summarize(patient, alert), people)
    return {
        **summary,
        "rule_title": rule.title if rule else None,
        "card": alert.get("card"),
        "evidence": evidence,
        "explanation": alert.get("explanation"),
        "citations": [c.model_dump() for c in rule.citations] if rule else [],
        "override_reasons": [c.model_dump() for c in rule.card.override_reasons] if rule else [],
        "trend": {"start": _z(start), "end": _z(end), **trend},
        "history": alert.get("history") or [],
        "as_of": alert.get("as_of"),
        "readable": {
            "why": why_lines(alert.get("explanation"), evidence),
            "evidence": evidence_rows(evidence, alert.get("as_of")),
            "medications": medication_rows(facts, start, end),
            "as_of": format_instant(alert.get("as_of")),
        },
    }


def trend_charts(detail: dict[str, Any]) -> dict[str, str]:
    """The detail's K and Mg charts (SVG), Mg in the site's unit."""
    trend, catalog = detail["trend"], get_catalog()
    units = {"potassium": "mmol/L", "magnesium": get_settings().display_mg_unit}
    return {
        concept: render_chart(trend[concept], trend["start"], trend["end"], chart_spec(concept, unit, catalog))
        for concept, unit in units.items()
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


def changes_since(alert: dict[str, Any], revision: int) -> list[dict[str, Any]]:
    """The history entries written after ``revision`` (each change appends one entry and bumps the revision
    by one), to tell someone whose form was stale who changed what."""
    history = alert.get("history") or []
    current = int(alert.get("revision") or 0)
    missed = max(current - revision, 0)
    return history[-missed:] if missed else []


# --- actions -------------------------------------------------------------------------------------------------------


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
    after = _apply(index, alert_id, action, actor, revision, reason, comment, until, idempotency_key)
    return detail_of(index, after)


def _apply(
    index: ReviewIndex,
    alert_id: str,
    action: str,
    actor: str,
    revision: int | None,
    reason: str | None,
    comment: str | None,
    until: datetime | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
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
    return after


def acknowledge_patient(patient: str, seen: dict[str, int], actor: str, comment: str | None) -> list[dict[str, Any]]:
    """Acknowledge the listed alerts of one patient (alert id -> revision seen), each on its own: one that
    changed since (stale revision) or is not active any more is reported and left alone. Per alert:
    ``{"id", "status": 200 | 4xx, "message", "revision"}``."""
    index = get_index()
    refresh(index)
    results = []
    for alert_id, revision in seen.items():
        alert = index.store.find_alert(alert_id)
        if alert is None or alert.get("patient") != patient:
            results.append({"id": alert_id, "status": 404, "message": f"no alert {alert_id} for this patient"})
            continue
        try:
            after = _apply(index, alert_id, "acknowledge", actor, revision, None, comment, None, None)
        except ReviewError as exc:
            results.append({"id": alert_id, "status": exc.status, "message": exc.message})
            continue
        results.append({"id": alert_id, "status": 200, "message": "acknowledged", "revision": after["revision"]})
    return results


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
    """A filter time (ISO with a zone; the page's ``YYYY-MM-DDTHH:MM`` is local time in the display zone);
    ReviewError if unreadable."""
    if not value:
        return None
    try:
        if _LOCAL_TIME.fullmatch(value.strip()):
            return datetime.fromisoformat(value.strip()).replace(tzinfo=display_zone())
        return parse_time(value)
    except ValueError as exc:
        raise ReviewError(400, f"{name}: {exc}", name) from exc
