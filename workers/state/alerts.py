"""The alert store in Redis: alerts opened, updated, escalated and closed by the rules' decisions
(``apply_steps.lua``), moved by people (``transition_alert.lua``), and read back.

An alert record has a fixed size: it keeps the latest ``HISTORY_KEPT`` history entries, and every entry is also
appended to the alert's own history list, which readers merge back when asked for the whole history.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import redis

from rules.engine import Decision
from workers.events import clock_text
from workers.state import keys, statuses
from workers.state.schema_upgrade import upgrade_alert
from workers.state.scripts import load_script, run_pipelined

ALERT_SCHEMA_VERSION = 1
#: History entries kept inside an alert record (the whole history is in the alert's history list).
HISTORY_KEPT = 20
OPEN_STATUSES = statuses.OPEN
CLOSED_STATUSES = statuses.CLOSED
#: Metric kind (``ehr_alerts_alert_transitions_total{kind}``) of each user / EHR action.
TRANSITION_KINDS = {
    "acknowledge": "acknowledged",
    "override": "overridden",
    "snooze": "snoozed",
    "accept": "accepted",
    "resolve": "resolved-by-user",
    "reopen": "reopened",
}
TRANSITIONS = tuple(TRANSITION_KINDS)
_ARRAYS = ("evidence", "history", "escalators", "acted_escalators")


class TransitionError(Exception):
    """A transition that cannot be made: ``code`` is not-found, illegal, conflict or invalid."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def read_alert(raw: str) -> dict[str, Any]:
    """An alert record as stored (upgraded to the current format; Lua's cjson writes empty arrays as {})."""
    alert = upgrade_alert(json.loads(raw))
    for key in _ARRAYS:
        if alert.get(key) == {}:
            alert[key] = []
    return alert


def effective_status(alert: dict[str, Any], now: datetime) -> str:
    """The alert's status as of ``now``: a snooze that has run out counts as active again."""
    until = alert.get("snoozed_until")
    if alert.get("status") == "snoozed" and until and until <= clock_text(now):
        return "active"
    return str(alert.get("status"))


def decision_body(decision: Decision, close: str | None = None) -> dict[str, Any]:
    """What the apply script needs of a decision (the alert only when it fires)."""
    body: dict[str, Any] = {
        "rule_id": decision.rule_id,
        "outcome": decision.outcome,
        "resolves": decision.resolves,
        "explanation": decision.explanation,
    }
    if close is not None:
        body["close"] = close
    if decision.outcome != "fires":
        return body
    evidence = [e.model_dump(mode="json") for e in decision.evidence]
    escalators = list(getattr(decision, "escalators", None) or [])
    fingerprint_source = json.dumps([decision.severity, decision.card, evidence, escalators], sort_keys=True)
    body["alert"] = {
        "schema_version": ALERT_SCHEMA_VERSION,
        "id": str(uuid.uuid4()),
        "rule_id": decision.rule_id,
        "rule_version": decision.rule_version,
        "patient": decision.patient,
        "severity": decision.severity,
        "card": decision.card,
        "evidence": evidence,
        "escalators": escalators,
        "explanation": decision.explanation,
        "parameters": dict(getattr(decision, "parameters", None) or {}),
        "as_of": decision.as_of,
        "fingerprint": hashlib.sha256(fingerprint_source.encode()).hexdigest()[:16],
    }
    return body


class AlertStore:
    """Applies decisions, moves alerts through transitions, reads them."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._apply = load_script(client, "apply_steps.lua")
        self._transition = load_script(client, "transition_alert.lua")
        self._open_external = load_script(client, "open_external_alert.lua")

    def apply_many(self, calls: list[tuple[str, int, list[dict[str, Any]], dict[str, str]]]) -> list[Any]:
        """Apply several patients' steps in one round trip (one atomic script each, pipelined).

        Each call is (patient, timeline version, steps, meta) with steps ``[{as_of, retracted, decisions}]`` and
        meta the patient's new ``clock`` / ``clock_s`` / ``due`` texts. Per call: a list of (rule id, action,
        alert id), or the error the script raised."""
        scripted = []
        for patient, version, steps, meta in calls:
            k = keys.patient_keys(patient)
            scripted.append(
                (
                    [k["alerts"], k["open"], k["closed"], k["meta"]],
                    [
                        version,
                        clock_text(datetime.now(UTC)),
                        json.dumps(steps, separators=(",", ":")),
                        meta.get("clock", ""),
                        meta.get("clock_s", ""),
                        meta.get("due", ""),
                        HISTORY_KEPT,
                        keys.alert_history(patient, ""),
                    ],
                )
            )
        results = run_pipelined(self.client, self._apply, scripted)
        return [r if isinstance(r, Exception) else [tuple(x) for x in r] for r in results]

    def transition(
        self,
        patient: str,
        alert_id: str,
        action: str,
        actor: str,
        at: datetime,
        *,
        expected_revision: int | None,
        extra: dict[str, Any],
        idempotency_key: str | None,
    ) -> dict[str, Any]:
        """Run the transition script; raises :class:`TransitionError` with its code."""
        k = keys.patient_keys(patient)
        code, body = self._transition(
            keys=[k["alerts"], k["open"], k["closed"], keys.alert_history(patient, alert_id)],
            args=[
                alert_id,
                action,
                actor,
                clock_text(at),
                "" if expected_revision is None else str(expected_revision),
                json.dumps(extra),
                idempotency_key or "",
                HISTORY_KEPT,
            ],
        )
        if code != "ok":
            raise TransitionError(code, body)
        return read_alert(body)

    def open_external(
        self, alert: dict[str, Any], at: datetime, *, source: str, why: str, as_open: bool
    ) -> tuple[dict[str, Any], bool]:
        """Store ``alert`` (the shape of ``decision_body(...)["alert"]``) as raised outside the stream: active,
        opened ``at`` with a history entry by ``system:<source>`` saying ``why``, and the open alert of its rule
        when ``as_open``. Returns (it, True), or (the alert already stored under its id, or the rule's open
        alert, False): nothing is stored then."""
        stamp = clock_text(at)
        entry = {"action": "opened", "by": f"system:{source}", "at": stamp, "why": why}
        record = {
            **alert,
            "status": "active",
            "source": source,
            "opened_at": stamp,
            "created_at": clock_text(datetime.now(UTC)),
            "updated_at": stamp,
            "revision": 1,
            "history": [entry],
            "history_count": 1,
        }
        k = keys.patient_keys(record["patient"])
        created, body = self._open_external(
            keys=[k["alerts"], k["open"], keys.alert_history(record["patient"], record["id"])],
            args=[json.dumps(record), "1" if as_open else "0"],
        )
        return read_alert(body), bool(created)

    # --- reads -----------------------------------------------------------------------------------------

    def for_patient(self, patient: str, *, open_only: bool = False, full_history: bool = True) -> list[dict[str, Any]]:
        """A patient's alerts, oldest first (open only: the current episode per rule, whatever a person did)."""
        k = keys.patient_keys(patient)
        if open_only:
            ids = list(self.client.hvals(k["open"]))
            raw = self.client.hmget(k["alerts"], ids) if ids else []
        else:
            raw = list(self.client.hvals(k["alerts"]))
        alerts = [read_alert(r) for r in raw if r]
        if full_history:
            self._with_history(patient, alerts)
        return sorted(alerts, key=lambda a: a["opened_at"])

    def get(self, patient: str, alert_id: str, *, full_history: bool = True) -> dict[str, Any] | None:
        """One alert by patient and id."""
        raw = self.client.hget(keys.patient_keys(patient)["alerts"], alert_id)
        if not raw:
            return None
        alert = read_alert(raw)
        if full_history:
            self._with_history(patient, [alert])
        return alert

    def _with_history(self, patient: str, alerts: list[dict[str, Any]]) -> None:
        """Put back the whole history of alerts whose record keeps only its latest entries."""
        longer = [a for a in alerts if int(a.get("history_count") or 0) > len(a.get("history") or [])]
        if not longer:
            return
        pipe = self.client.pipeline(transaction=False)
        for alert in longer:
            pipe.lrange(keys.alert_history(patient, alert["id"]), 0, -1)
        for alert, entries in zip(longer, pipe.execute(), strict=True):
            alert["history"] = [json.loads(e) for e in entries]
