"""Per-rule alert analytics and the audit trail, computed from the alerts' append-only histories.

Definitions (also in docs/review.md and on the analytics page):

* *fired*: alerts raised for the rule version (an alert counts under the version it carries now; a rule
  update that changes an open alert moves it to the new version); the time window selects alerts by when
  they were *raised* (written by the pipeline, wall clock; ``created_at``).
* *user action*: a history entry not written by ``system`` (a pharmacist on the review page or an EHR user
  through CDS Hooks feedback).
* each alert gets one *outcome*, from its first decisive user action (accept, override, resolve):
  ``accepted`` (the recommendation was taken: a card suggestion accepted in the EHR, or a pharmacist's
  *Accept*), ``overridden`` (with a reason), ``resolved_by_hand`` (a person closed it without accepting or
  overriding); with no decisive action, ``acknowledged`` (a person saw it, nothing decided), else ``ignored``
  when nobody acted and it closed by itself or has been raised longer than ``review_ignored_after_hours``,
  else ``pending``. Acknowledging is *not* acceptance.
* rates are outcome counts divided by fired; *per 1,000 patients* divides by the patients seen by the
  pipeline (``keys.patients()``: every patient still stored; inactive patients leave it with their data,
  ``retention_inactive_patient_days``).
* *time to first action*: from when the alert was raised to the first user action of any kind (both wall
  clock), median over alerts with one, in seconds.
* *closed*: how the closed ones closed (resolved, retracted, expired, withdrawn); *escalated*: alerts that
  escalated at least once; *from the EHR*: alerts a CDS Hooks call raised (``source`` ``cds-hooks``) and
  alerts with at least one action through CDS Hooks feedback.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from workers.state import keys
from workers.state.review_index import ReviewIndex, epoch, is_user_entry, order_key, raised_at
from workers.state.statuses import CLOSED

ACTION_NAMES = {
    "acknowledged": "acknowledge",
    "overridden": "override",
    "snoozed": "snooze",
    "accepted": "accept",
    "reopened": "reopen",
    "resolved": "resolve",
}
DECISIVE = {"accept": "accepted", "override": "overridden", "resolve": "resolved_by_hand"}
OUTCOMES = ("accepted", "overridden", "resolved_by_hand", "acknowledged", "ignored", "pending")
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
    "record_type",
    "record_id",
)


def action_name(entry: dict[str, Any]) -> str:
    """A history entry's action in the imperative (``overridden`` -> ``override``)."""
    action = str(entry.get("action") or "")
    return ACTION_NAMES.get(action, action)


def reason_code(entry: dict[str, Any]) -> str | None:
    """The override reason code of a history entry (plain text or a Coding-like mapping)."""
    reason = entry.get("reason")
    if isinstance(reason, dict):
        return reason.get("code")
    return str(reason) if reason else None


def outcome(alert: dict[str, Any], now: datetime, ignored_after: timedelta) -> str:
    """accepted | overridden | resolved_by_hand | acknowledged | ignored | pending (module docstring)."""
    acknowledged = False
    for entry in alert.get("history") or []:
        if not is_user_entry(entry):
            continue
        action = action_name(entry)
        if action in DECISIVE:
            return DECISIVE[action]
        acknowledged = acknowledged or action == "acknowledge"
    if acknowledged:
        return "acknowledged"
    closed = alert.get("status") in CLOSED
    if closed or now.timestamp() - epoch(raised_at(alert)) >= ignored_after.total_seconds():
        return "ignored"
    return "pending"


def first_action_seconds(alert: dict[str, Any]) -> float | None:
    """Seconds from raising to the first user action (any kind), or None."""
    for entry in alert.get("history") or []:
        if is_user_entry(entry):
            return max(epoch(entry.get("at")) - epoch(raised_at(alert)), 0.0)
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
    return [
        _figures(rule_id, version, members, patients_seen, now, ignored_after)
        for (rule_id, version), members in sorted(groups.items())
    ]


def _figures(
    rule_id: str,
    version: str,
    members: list[dict[str, Any]],
    patients_seen: int,
    now: datetime,
    ignored_after: timedelta,
) -> dict[str, Any]:
    fired = len(members)
    outcomes = Counter(outcome(a, now, ignored_after) for a in members)
    reasons: Counter[str] = Counter()
    for alert in members:
        for entry in alert.get("history") or []:
            if is_user_entry(entry) and action_name(entry) == "override":
                reasons[reason_code(entry) or "(none)"] += 1
    waits = [w for w in (first_action_seconds(a) for a in members) if w is not None]
    histories = [a.get("history") or [] for a in members]
    return {
        "rule_id": rule_id,
        "rule_version": version,
        "fired": fired,
        "per_1000_patients": round(1000 * fired / patients_seen, 2) if patients_seen else None,
        **{name: outcomes[name] for name in OUTCOMES},
        **{f"{name}_rate": round(outcomes[name] / fired, 4) for name in OUTCOMES if name != "pending"},
        "override_reasons": dict(sorted(reasons.items())),
        "median_seconds_to_first_action": statistics.median(waits) if waits else None,
        "alerts_with_action": len(waits),
        "closed": {status: sum(a.get("status") == status for a in members) for status in CLOSED},
        "escalated": sum(any(e.get("action") == "escalated" for e in h) for h in histories),
        "raised_by_cds_hooks": sum(a.get("source") == "cds-hooks" for a in members),
        "acted_on_in_ehr": sum(any(is_user_entry(e) and e.get("source") == "cds-hooks" for e in h) for h in histories),
    }


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
                record_type="alert",
                record_id=alert["id"],
            )
            yield row


def problem_audit_rows(problems: Iterable[dict[str, Any]], start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
    """The history entries of data-problem items (``workers.state.data_problems``) in ``[start, end)``, in
    the audit export's columns (``record_type`` ``data-problem``; ``rule_id`` lists the rules it affected)."""
    low, high = start.timestamp(), end.timestamp()
    for item in problems:
        for entry in item.get("history") or []:
            if not low <= epoch(entry.get("at")) < high:
                continue
            row = {name: entry.get(name) for name in AUDIT_COLUMNS}
            row.update(
                alert_id=None,
                patient=item.get("patient"),
                rule_id=" ".join(item.get("rules") or []) or None,
                rule_version=None,
                reason=item.get("reason"),
                record_type="data-problem",
                record_id=item["id"],
            )
            yield row
