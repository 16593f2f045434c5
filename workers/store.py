"""Patient timeline and alert store in Redis, written only through atomic Lua scripts."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from rules.engine import Decision
from rules.facts import Fact
from workers import keys
from workers.events import CLOCK_FORMAT, Event, clock_text
from workers.settings import Settings

_LUA_DIR = Path(__file__).with_name("lua")
ALERT_SCHEMA_VERSION = 1


def _script(client: redis.Redis, name: str) -> Any:
    return client.register_script((_LUA_DIR / name).read_text(encoding="utf-8"))


@dataclass
class Timeline:
    """A patient's facts after an upsert, and the version and clock they correspond to."""

    patient: str
    version: int
    clock: datetime
    statuses: list[str]
    facts: list[Fact]


TRANSITIONS = ("acknowledge", "override", "snooze", "accept", "resolve", "reopen")


class TransitionError(Exception):
    """A transition that cannot be made: ``code`` is not-found, illegal, conflict or invalid."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Store:
    """Timeline upserts, decision application and alert reads for one Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._store_facts = _script(client, "store_facts.lua")
        self._apply = _script(client, "apply_decisions.lua")
        self._transition = _script(client, "transition_alert.lua")

    # --- timeline --------------------------------------------------------------------------------------

    def upsert(self, patient: str, events: list[Event]) -> Timeline:
        """Store a patient's events (idempotent, version-ordered) and return the whole timeline."""
        k = keys.patient_keys(patient)
        args: list[str] = [clock_text(max(e.event_time for e in events))]
        for event in events:
            payload = json.dumps([f.model_dump(mode="json") for f in event.facts], separators=(",", ":"))
            args += [event.resource, event.rank(), f"{event.expires(self.settings)}\t{payload}"]
        version, clock, statuses, payloads = self._store_facts(keys=[k["facts"], k["meta"]], args=args)
        facts = [Fact.model_validate(item) for payload in payloads for item in json.loads(payload)]
        when = datetime.strptime(clock, CLOCK_FORMAT).replace(tzinfo=UTC)
        return Timeline(patient, int(version), when, list(statuses), facts)

    def timeline(self, patient: str) -> list[Fact]:
        """The facts stored for a patient (read only)."""
        values = self.client.hvals(keys.patient_keys(patient)["facts"])
        return [Fact.model_validate(item) for value in values for item in json.loads(value.split("\t", 2)[2])]

    # --- alerts ----------------------------------------------------------------------------------------

    def apply(self, timeline: Timeline, decisions: list[Decision]) -> list[tuple[str, str, str]]:
        """Apply decisions computed from ``timeline``; returns (rule id, action, alert id) per decision."""
        k = keys.patient_keys(timeline.patient)
        retracted = sorted({f"{f.resource_type}/{f.resource_id}" for f in timeline.facts if f.retracted})
        body = [_decision_body(d) for d in decisions if d.rule_status == "active"]
        if not body:
            return []
        results = self._apply(
            keys=[k["alerts"], k["open"], k["applied"], k["closed"]],
            args=[timeline.version, clock_text(timeline.clock), json.dumps(body), json.dumps(retracted)],
        )
        touched = [(rule, action, alert_id) for rule, action, alert_id in results]
        changed = [alert_id for _, action, alert_id in touched if action not in ("none", "stale") and alert_id]
        if changed:
            score = datetime.now(UTC).timestamp()
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(keys.alert_index(), {f"{timeline.patient}|{a}": score for a in changed})
            pipe.hset(keys.alert_patients(), mapping=dict.fromkeys(changed, timeline.patient))
            pipe.execute()
        return touched

    def alerts_for_patient(self, patient: str, *, open_only: bool = False) -> list[dict[str, Any]]:
        """A patient's alerts (open only: the current episode per rule, whatever a user did with it)."""
        k = keys.patient_keys(patient)
        if open_only:
            ids = list(self.client.hvals(k["open"]))
            raw = self.client.hmget(k["alerts"], ids) if ids else []
        else:
            raw = list(self.client.hvals(k["alerts"]))
        return sorted((_read_alert(r) for r in raw if r), key=lambda a: a["opened_at"])

    def get_alert(self, patient: str, alert_id: str) -> dict[str, Any] | None:
        """One alert by patient and id."""
        raw = self.client.hget(keys.patient_keys(patient)["alerts"], alert_id)
        return _read_alert(raw) if raw else None

    def find_alert(self, alert_id: str) -> dict[str, Any] | None:
        """One alert by id alone (a CDS Hooks card uuid is the alert id)."""
        patient = self.client.hget(keys.alert_patients(), alert_id)
        return self.get_alert(patient, alert_id) if patient else None

    def transition(
        self,
        alert_id: str,
        action: str,
        actor: str,
        at: datetime,
        *,
        expected_revision: int | None = None,
        reason: dict[str, Any] | None = None,
        comment: str | None = None,
        until: datetime | None = None,
        accepted_suggestions: list[str] | None = None,
        idempotency_key: str | None = None,
        source: str = "review",
    ) -> dict[str, Any]:
        """Move an alert through a user or EHR transition; appends to its history and bumps its revision.

        Raises TransitionError: not-found, illegal (not allowed from the current status), conflict (the
        alert's revision is not ``expected_revision``) or invalid (bad arguments). Repeating an
        ``idempotency_key`` already in the history returns the alert unchanged.
        """
        if action not in TRANSITIONS:
            raise TransitionError("invalid", f"unknown action {action!r}; expected one of {', '.join(TRANSITIONS)}")
        if action == "snooze" and (until is None or until <= at):
            raise TransitionError("invalid", "snooze needs an 'until' time in the future")
        patient = self.client.hget(keys.alert_patients(), alert_id)
        if not patient:
            raise TransitionError("not-found", f"no alert {alert_id}")
        extra: dict[str, Any] = {"source": source}
        for name, value in (("reason", reason), ("comment", comment), ("accepted_suggestions", accepted_suggestions)):
            if value:
                extra[name] = value
        if until is not None:
            extra["until"] = clock_text(until)
        if reason and reason.get("display"):
            extra["why"] = reason["display"] + (f": {comment}" if comment else "")
        elif comment:
            extra["why"] = comment
        k = keys.patient_keys(patient)
        code, body = self._transition(
            keys=[k["alerts"], k["open"], k["closed"]],
            args=[
                alert_id,
                action,
                actor,
                clock_text(at),
                "" if expected_revision is None else str(expected_revision),
                json.dumps(extra),
                idempotency_key or "",
            ],
        )
        if code != "ok":
            raise TransitionError(code, body)
        self.client.zadd(keys.alert_index(), {f"{patient}|{alert_id}": datetime.now(UTC).timestamp()})
        return _read_alert(body)

    def list_alerts(
        self, *, status: str | None = None, rule: str | None = None, limit: int = 50, cursor: int = 0
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Hospital-wide alerts, most recently updated first, filtered; returns (page, next cursor)."""
        page: list[dict[str, Any]] = []
        position = cursor
        chunk = max(limit * 2, 100)
        while len(page) < limit:
            members = self.client.zrevrange(keys.alert_index(), position, position + chunk - 1)
            if not members:
                return page, None
            for offset, member in enumerate(members):
                patient, alert_id = member.split("|", 1)
                alert = self.get_alert(patient, alert_id)
                if (
                    alert
                    and (status is None or alert["status"] == status)
                    and (rule is None or alert["rule_id"] == rule)
                ):
                    page.append(alert)
                    if len(page) == limit:
                        return page, position + offset + 1
            position += len(members)
        return page, position

    def dead_letter(self, reason: str, events: list[dict[str, Any]], task_id: str | None = None) -> None:
        """Keep events that cannot be processed, with the reason, for `ehr-alerts dead-letters`."""
        record = {"task_id": task_id, "failed_at": datetime.now(UTC).isoformat(), "reason": reason, "events": events}
        self.client.rpush(keys.dead_letters(), json.dumps(record))

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead-lettered record, oldest first."""
        return [json.loads(r) for r in self.client.lrange(keys.dead_letters(), 0, -1)]

    def counters(self) -> dict[str, int]:
        """Pipeline counters."""
        return {k: int(v) for k, v in self.client.hgetall(keys.counters()).items()}

    def count(self, **increments: int) -> None:
        """Add to pipeline counters (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for name, value in increments.items():
            if value:
                pipe.hincrby(keys.counters(), name, value)
        pipe.execute()


def _read_alert(raw: str) -> dict[str, Any]:
    alert = json.loads(raw)
    for key in ("evidence", "history"):  # Lua's cjson writes empty arrays as {}
        if alert.get(key) == {}:
            alert[key] = []
    return alert


def effective_status(alert: dict[str, Any], now: datetime) -> str:
    """The alert's status as of ``now``: a snooze that has run out counts as active again."""
    until = alert.get("snoozed_until")
    if alert.get("status") == "snoozed" and until and until <= clock_text(now):
        return "active"
    return str(alert.get("status"))


def _decision_body(decision: Decision) -> dict[str, Any]:
    evidence = [e.model_dump(mode="json") for e in decision.evidence]
    fingerprint_source = json.dumps([decision.severity, decision.card, evidence], sort_keys=True)
    return {
        "rule_id": decision.rule_id,
        "outcome": decision.outcome,
        "resolves": decision.resolves,
        "explanation": decision.explanation,
        "alert": {
            "schema_version": ALERT_SCHEMA_VERSION,
            "id": str(uuid.uuid4()),
            "rule_id": decision.rule_id,
            "rule_version": decision.rule_version,
            "patient": decision.patient,
            "severity": decision.severity,
            "card": decision.card,
            "evidence": evidence,
            "explanation": decision.explanation,
            "as_of": decision.as_of,
            "fingerprint": hashlib.sha256(fingerprint_source.encode()).hexdigest()[:16],
        },
    }
