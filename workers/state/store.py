"""Patient timeline and alert store in Redis, written only through atomic Lua scripts."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis

from config.settings import Settings
from rules.engine import Decision
from rules.facts import Fact
from workers.events import Event, clock_text
from workers.state import keys, schema_upgrade
from workers.state.schema_upgrade import upgrade_alert, upgrade_fact

_LUA_DIR = Path(__file__).with_name("lua")
FACT_CACHE_SIZE = 50_000  # resource versions; Fact is frozen, so parsed facts are shared safely


def parse_facts(payload: str) -> tuple[Fact, ...]:
    """The facts of one stored resource version (upgraded to the current format), parsed once per process
    and format: every event of a patient returns the patient's whole timeline, and parsing all of it again
    for every event was the largest cost of a worker after the rule evaluation."""
    return _parse_facts(payload, schema_upgrade.FACT_SCHEMA_VERSION)


@lru_cache(maxsize=FACT_CACHE_SIZE)
def _parse_facts(payload: str, schema_version: int) -> tuple[Fact, ...]:
    return tuple(Fact.model_validate(upgrade_fact(item)) for item in json.loads(payload))


ALERT_SCHEMA_VERSION = 1
#: Metric kind (``ehr_alerts_alert_transitions_total{kind}``) of each user / EHR action.
TRANSITION_KINDS = {
    "acknowledge": "acknowledged",
    "override": "overridden",
    "snooze": "snoozed",
    "accept": "accepted",
    "resolve": "resolved-by-user",
    "reopen": "reopened",
}


def _script(client: redis.Redis, name: str) -> Any:
    return client.register_script((_LUA_DIR / name).read_text(encoding="utf-8"))


@dataclass
class Timeline:
    """A patient's facts after an upsert, and the version and clock they correspond to (``previous_clock``:
    the clock before the upsert, None for a new patient)."""

    patient: str
    version: int
    clock: datetime
    statuses: list[str]
    facts: list[Fact]
    previous_clock: datetime | None = None


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
        result = self.upsert_many({patient: events})[patient]
        if isinstance(result, Exception):
            raise result
        return result

    def upsert_many(self, by_patient: dict[str, list[Event]]) -> dict[str, Timeline | Exception]:
        """``upsert`` for several patients in one round trip (one atomic script per patient, pipelined).

        A patient whose script failed gets the error in place of a timeline; connection errors raise."""
        calls = []
        for patient, events in by_patient.items():
            k = keys.patient_keys(patient)
            args: list[str] = [clock_text(max(e.event_time for e in events))]
            for event in events:
                payload = json.dumps([f.model_dump(mode="json") for f in event.facts], separators=(",", ":"))
                args += [event.resource, event.rank(), f"{event.expires(self.settings)}\t{payload}"]
            calls.append(([k["facts"], k["meta"]], args))
        out: dict[str, Timeline | Exception] = {}
        for patient, result in zip(by_patient, self._run_pipelined(self._store_facts, calls), strict=True):
            if isinstance(result, Exception):
                out[patient] = result
                continue
            version, clock, statuses, joined, previous = result
            facts = [fact for payload in joined.split("\n") if payload for fact in parse_facts(payload)]
            before = _clock(previous) if previous else None
            out[patient] = Timeline(patient, int(version), _clock(clock), list(statuses), facts, before)
        return out

    def _run_pipelined(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """EVALSHA ``script`` once per (keys, args) in one pipeline; loads the script if the server lost it."""
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for script_keys, args in calls:
                pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)
            results = pipe.execute(raise_on_error=False)
            for result in results:
                if isinstance(result, redis.ConnectionError | redis.TimeoutError):
                    raise result
            if attempt == 1 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                script.sha = self.client.script_load(script.script)  # e.g. the server restarted; retry all
                continue  # (each script is idempotent, so re-running the ones that did run is harmless)
            return results
        raise AssertionError("unreachable")

    def timeline(self, patient: str) -> list[Fact]:
        """The facts stored for a patient (read only)."""
        values = self.client.hvals(keys.patient_keys(patient)["facts"])
        return [fact for value in values for fact in parse_facts(value.split("\t", 2)[2])]

    # --- alerts ----------------------------------------------------------------------------------------

    def apply(self, timeline: Timeline, decisions: list[Decision]) -> list[tuple[str, str, str]]:
        """Apply decisions computed from ``timeline``; returns (rule id, action, alert id) per decision."""
        result = self.apply_many([(timeline, decisions)])[0]
        if isinstance(result, Exception):
            raise result
        self.record({alert_id: timeline.patient for _, action, alert_id in result if _changed(action, alert_id)})
        return result

    def apply_many(
        self, planned: list[tuple[Timeline, list[Decision]]]
    ) -> list[list[tuple[str, str, str]] | Exception]:
        """Apply several decision sets in one round trip, in order (one atomic script each, pipelined);
        ``timeline.clock`` is the time the decisions were made as of (the alert history's time).

        Returns, per planned entry, (rule id, action, alert id) per decision, or the error of a failed
        script. The caller indexes the changed alerts with ``record``."""
        calls = []
        positions = []
        out: list[list[tuple[str, str, str]] | Exception] = [[] for _ in planned]
        for position, (timeline, decisions) in enumerate(planned):
            body = [_decision_body(d) for d in decisions if d.rule_status == "active"]
            if not body:
                continue
            k = keys.patient_keys(timeline.patient)
            retracted = sorted({f"{f.resource_type}/{f.resource_id}" for f in timeline.facts if f.retracted})
            calls.append(
                (
                    [k["alerts"], k["open"], k["applied"], k["closed"]],
                    [
                        timeline.version,
                        clock_text(timeline.clock),
                        json.dumps(body),
                        json.dumps(retracted),
                        clock_text(datetime.now(UTC)),
                    ],
                )
            )
            positions.append(position)
        for position, result in zip(positions, self._run_pipelined(self._apply, calls), strict=True):
            out[position] = result if isinstance(result, Exception) else [tuple(r) for r in result]
        return out

    def record(
        self,
        changed: dict[str, str],
        *,
        patients: set[str] | frozenset[str] = frozenset(),
        counts: dict[str, int] | None = None,
        resources: dict[str, str] | None = None,
    ) -> None:
        """One round trip of bookkeeping: index changed alerts (alert id -> patient) by update time, add
        the patients seen and the resources stored ("Type/id" -> patient, for deletes), add to the counters."""
        pipe = self.client.pipeline(transaction=False)
        if changed:
            score = datetime.now(UTC).timestamp()
            pipe.zadd(keys.alert_index(), {f"{patient}|{a}": score for a, patient in changed.items()})
            pipe.hset(keys.alert_patients(), mapping=changed)
        if patients:
            pipe.sadd(keys.patients(), *patients)
        if resources:
            pipe.hset(keys.resource_patients(), mapping=resources)
        for name, value in (counts or {}).items():
            if value:
                pipe.hincrby(keys.counters(), name, value)
        pipe.execute()

    def patient_of(self, resource: str) -> str | None:
        """The patient whose timeline holds ``Type/id`` (None: never stored here)."""
        return self.client.hget(keys.resource_patients(), resource)

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
        alert = _read_alert(body)
        last = alert["history"][-1] if alert["history"] else {}
        if not idempotency_key or (last.get("key") == idempotency_key and last.get("at") == clock_text(at)):
            self.count(**{f"alerts_{TRANSITION_KINDS.get(action, action)}:{alert['rule_id']}": 1})  # metrics
        return alert

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


def _clock(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))  # strptime is 10x slower


def _changed(action: str, alert_id: str) -> bool:
    return bool(alert_id) and action not in ("none", "stale", "suppressed")


def _read_alert(raw: str) -> dict[str, Any]:
    alert = upgrade_alert(json.loads(raw))
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
    body: dict[str, Any] = {
        "rule_id": decision.rule_id,
        "outcome": decision.outcome,
        "resolves": decision.resolves,
        "explanation": decision.explanation,
    }
    if decision.outcome != "fires":  # the alert body is only read to open or update an alert
        return body
    evidence = [e.model_dump(mode="json") for e in decision.evidence]
    fingerprint_source = json.dumps([decision.severity, decision.card, evidence], sort_keys=True)
    body["alert"] = {
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
    }
    return body
