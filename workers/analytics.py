"""Per-rule alert analytics and the audit trail, computed from the alerts' append-only histories.

Definitions (also in the README):

* *fired*: alerts opened for the rule version (an alert counts under the version it carries now; a rule
  update that changes an open alert moves it to the new version).
* *user action*: a history entry not written by ``system`` (a pharmacist on the review page or an EHR
  user through CDS Hooks feedback).
* each alert gets one *outcome* from its first user action that is not a snooze:
  ``accepted`` (accept a suggestion, acknowledge, or resolve by hand), ``overridden`` (override), else
  ``ignored`` when nobody acted on it and it is closed (resolved / retracted automatically) or has been open
  longer than ``review_ignored_after_hours``, else ``pending`` (still inside that window).
* rates are outcome counts divided by fired; *per 1,000 patients* divides by the patients seen by the
  pipeline (``keys.patients()``).
* *time to first action*: from ``opened_at`` (the clinical time that opened the alert) to the first user
  action of any kind, median over alerts with one, in seconds.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from workers.state import keys
from workers.state.review_index import ReviewIndex, epoch, order_key

ACTION_NAMES = {
    "acknowledged": "acknowledge",
    "overridden": "override",
    "snoozed": "snooze",
    "accepted": "accept",
    "reopened": "reopen",
    "resolved": "resolve",
}
ACCEPTING = ("accept", "acknowledge", "resolve")
AUDIT_COLUMNS = (
    "at",
    "alert_id",
    "patient",
    "rule_id",
    "rule_version",
    "action",
    "from",
    "to",
    "by",
    "source",
    "reason",
    "comment",
    "until",
    "why",
)


def action_name(entry: dict[str, Any]) -> str:
    """A history entry's action in the imperative (``overridden`` -> ``override``)."""
    action = str(entry.get("action") or "")
    return ACTION_NAMES.get(action, action)


def is_user_entry(entry: dict[str, Any]) -> bool:
    """True for entries written by a person (review page or EHR user), not by the pipeline."""
    by = str(entry.get("by") or "system")
    return by != "system" and not by.startswith("system:")


def reason_code(entry: dict[str, Any]) -> str | None:
    """The override reason code of a history entry (plain text or a Coding-like mapping)."""
    reason = entry.get("reason")
    if isinstance(reason, dict):
        return reason.get("code")
    return str(reason) if reason else None


def outcome(alert: dict[str, Any], now: datetime, ignored_after: timedelta) -> str:
    """accepted | overridden | ignored | pending (see the module docstring)."""
    for entry in alert.get("history") or []:
        if not is_user_entry(entry):
            continue
        action = action_name(entry)
        if action == "override":
            return "overridden"
        if action in ACCEPTING:
            return "accepted"
    closed = alert.get("status") in ("resolved", "retracted")
    opened = epoch(alert.get("opened_at"))
    if closed or now.timestamp() - opened >= ignored_after.total_seconds():
        return "ignored"
    return "pending"


def first_action_seconds(alert: dict[str, Any]) -> float | None:
    """Seconds from opening to the first user action (any kind), or None."""
    for entry in alert.get("history") or []:
        if is_user_entry(entry):
            return max(epoch(entry.get("at")) - epoch(alert.get("opened_at")), 0.0)
    return None


def iter_alerts(index: ReviewIndex, chunk: int = 500) -> Iterator[dict[str, Any]]:
    """Every alert in the index (full JSON with history), read in pipelined chunks."""
    index.sync()
    client = index.client
    total = client.zcard(order_key("all", "time"))
    for start in range(0, total, chunk):
        ids = client.zrange(order_key("all", "time"), start, start + chunk - 1)
        summaries = index.summaries(ids)
        pipe = client.pipeline(transaction=False)
        refs = [s for s in summaries if s]
        for s in refs:
            pipe.hget(keys.patient_keys(s["patient"])["alerts"], s["id"])
        for raw in pipe.execute():
            if raw:
                alert = json.loads(raw)
                if alert.get("history") == {}:
                    alert["history"] = []
                yield alert


def rule_analytics(
    alerts: Iterable[dict[str, Any]], patients_seen: int, now: datetime, ignored_after: timedelta
) -> list[dict[str, Any]]:
    """Figures per (rule id, rule version), sorted by rule then version."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for alert in alerts:
        groups[(alert["rule_id"], str(alert.get("rule_version") or ""))].append(alert)
    result = []
    for (rule_id, version), members in sorted(groups.items()):
        fired = len(members)
        outcomes = Counter(outcome(a, now, ignored_after) for a in members)
        reasons: Counter[str] = Counter()
        for alert in members:
            for entry in alert.get("history") or []:
                if is_user_entry(entry) and action_name(entry) == "override":
                    reasons[reason_code(entry) or "(none)"] += 1
        waits = [w for w in (first_action_seconds(a) for a in members) if w is not None]
        result.append(
            {
                "rule_id": rule_id,
                "rule_version": version,
                "fired": fired,
                "per_1000_patients": round(1000 * fired / patients_seen, 2) if patients_seen else None,
                "accepted": outcomes["accepted"],
                "overridden": outcomes["overridden"],
                "ignored": outcomes["ignored"],
                "pending": outcomes["pending"],
                "accepted_rate": round(outcomes["accepted"] / fired, 4),
                "overridden_rate": round(outcomes["overridden"] / fired, 4),
                "ignored_rate": round(outcomes["ignored"] / fired, 4),
                "override_reasons": dict(sorted(reasons.items())),
                "median_seconds_to_first_action": statistics.median(waits) if waits else None,
                "alerts_with_action": len(waits),
            }
        )
    return result


def audit_rows(alerts: Iterable[dict[str, Any]], start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
    """History entries with ``start <= at < end``, one row each, alert by alert (time order within an alert)."""
    low, high = start.timestamp(), end.timestamp()
    for alert in alerts:
        for entry in alert.get("history") or []:
            at = epoch(entry.get("at"))
            if not low <= at < high:
                continue
            row = {name: entry.get(name) for name in AUDIT_COLUMNS}
            row.update(
                alert_id=alert["id"],
                patient=alert.get("patient"),
                rule_id=alert["rule_id"],
                rule_version=alert.get("rule_version"),
                action=entry.get("action"),
                reason=reason_code(entry),
            )
            yield row
