"""The state one Redis holds for the pipeline and the service: patient timelines (``timeline``), alerts
(``alerts``), and the hospital-wide bookkeeping (alert index, resource -> patient, due times, counters, dead
letters). Every per-patient write is an atomic Lua script."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from config.settings import Settings
from rules.facts import Fact
from workers.events import clock_text
from workers.state import keys
from workers.state.alerts import (
    ALERT_SCHEMA_VERSION,
    CLOSED_STATUSES,
    OPEN_STATUSES,
    TRANSITION_KINDS,
    TRANSITIONS,
    AlertStore,
    TransitionError,
    effective_status,
)
from workers.state.scripts import load_script, run_pipelined
from workers.state.timeline import TimelineStore, parse_facts

__all__ = [
    "ALERT_SCHEMA_VERSION",
    "CLOSED_STATUSES",
    "OPEN_STATUSES",
    "TRANSITIONS",
    "Store",
    "TransitionError",
    "effective_status",
    "parse_facts",
]


class Store:
    """Timelines, alerts and bookkeeping on one Redis."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.timelines = TimelineStore(client, settings)
        self.alerts = AlertStore(client)
        self._forget = load_script(client, "forget_alert.lua")
        self._retire = load_script(client, "retire_patient.lua")

    # --- timeline --------------------------------------------------------------------------------------

    def timeline(self, patient: str) -> list[Fact]:
        """The facts stored for a patient (read only; retention applied at the patient's clock)."""
        return self.timelines.facts(patient)

    def clock(self, patient: str) -> datetime | None:
        """The patient's clock: the latest time the patient was evaluated at."""
        return self.timelines.clock(patient)

    def patient_of(self, resource: str) -> str | None:
        """The patient whose timeline holds ``Type/id`` (None: never received here)."""
        return self.client.hget(keys.resource_patients(), resource)

    # --- alerts ----------------------------------------------------------------------------------------

    def alerts_for_patient(self, patient: str, *, open_only: bool = False) -> list[dict[str, Any]]:
        """A patient's alerts, oldest first (open only: the current episode per rule, whatever a person did)."""
        return self.alerts.for_patient(patient, open_only=open_only)

    def get_alert(self, patient: str, alert_id: str) -> dict[str, Any] | None:
        """One alert by patient and id, with its whole history."""
        return self.alerts.get(patient, alert_id)

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
        alert = self.alerts.transition(
            patient,
            alert_id,
            action,
            actor,
            at,
            expected_revision=expected_revision,
            extra=extra,
            idempotency_key=idempotency_key,
        )
        now = datetime.now(UTC).timestamp()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(keys.alert_index(), {f"{patient}|{alert_id}": now})
        if alert["status"] in CLOSED_STATUSES:  # resolved by hand: retention counts from now
            pipe.zadd(keys.closed_alerts(), {f"{patient}|{alert_id}": now})
        else:  # reopened (or any open status): never pruned while open
            pipe.zrem(keys.closed_alerts(), f"{patient}|{alert_id}")
        pipe.execute()
        last = alert["history"][-1] if alert["history"] else {}
        if not idempotency_key or (last.get("key") == idempotency_key and last.get("at") == clock_text(at)):
            self.count(**{f"alerts_{TRANSITION_KINDS.get(action, action)}:{alert['rule_id']}": 1})  # metrics
        if alert.get("history_count", 0) > len(alert["history"]):
            return self.get_alert(patient, alert_id) or alert
        return alert

    def open_external(
        self, alert: dict[str, Any], at: datetime, *, source: str, why: str, as_open: bool = True
    ) -> tuple[dict[str, Any], bool]:
        """Store an alert raised outside the stream (a CDS Hooks card an EHR user acted on before the stream had
        an alert for that episode) so the worklist, audit export and analytics see it and transitions apply;
        as the rule's open alert when ``as_open`` (the stream then updates or closes it like its own). See
        ``AlertStore.open_external``; returns (the alert, created)."""
        stored, created = self.alerts.open_external(alert, at, source=source, why=why, as_open=as_open)
        if created:
            self.record({stored["id"]: stored["patient"]})
        return stored, created

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

    # --- bookkeeping -----------------------------------------------------------------------------------

    def record(
        self,
        changed: dict[str, str],
        *,
        patients: set[str] | frozenset[str] = frozenset(),
        counts: dict[str, int] | None = None,
        resources: dict[str, str] | None = None,
        forgotten: list[str] | None = None,
        due: dict[str, datetime | None] | None = None,
        closed: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """One round trip of bookkeeping: index changed alerts (alert id -> patient) by update time and those
        of them that ``closed`` by close time (for their retention), add the patients seen and the resources
        received ("Type/id" -> patient, for deletes), drop pruned resources, set the patients' due times, add
        to the counters."""
        pipe = self.client.pipeline(transaction=False)
        score = datetime.now(UTC).timestamp()
        if changed:
            pipe.zadd(keys.alert_index(), {f"{patient}|{a}": score for a, patient in changed.items()})
            pipe.hset(keys.alert_patients(), mapping=changed)
        if closed:
            pipe.zadd(keys.closed_alerts(), {f"{changed[a]}|{a}": score for a in closed})
        if patients:
            pipe.sadd(keys.patients(), *patients)
            pipe.zadd(keys.patients_seen(), dict.fromkeys(patients, score))
        if resources:
            pipe.hset(keys.resource_patients(), mapping=resources)
        if forgotten:
            pipe.hdel(keys.resource_patients(), *forgotten)
        for patient, when in (due or {}).items():
            if when is None:
                pipe.zrem(keys.due_patients(), patient)
            else:
                pipe.zadd(keys.due_patients(), {patient: when.timestamp()})
        for name, value in (counts or {}).items():
            if value:
                pipe.hincrby(keys.counters(), name, value)
        pipe.execute()

    def prune_closed_alerts(self, now: datetime, limit: int = 100) -> list[tuple[str, str]]:
        """Remove at most ``limit`` alerts closed more than ``retention_closed_alert_days`` before ``now``: the
        record, its history list, its ``alert_index`` and ``alert_patients`` entries (the review index is
        cleaned by its caller, ``workers.due``). Bounded work per call: one range read, one script per alert,
        one pipeline. Returns the (patient, alert id) pairs removed."""
        cutoff = now.timestamp() - self.settings.retention_closed_alert_days * 86_400
        members = self.client.zrangebyscore(keys.closed_alerts(), "-inf", cutoff, start=0, num=limit)
        if not members:
            return []
        refs = [tuple(m.split("|", 1)) for m in members]
        calls = [([keys.patient_keys(p)["alerts"], keys.alert_history(p, a)], [a, *CLOSED_STATUSES]) for p, a in refs]
        results = run_pipelined(self.client, self._forget, calls)
        gone = [ref for ref, result in zip(refs, results, strict=True) if result == 1]
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(keys.closed_alerts(), *members)  # an alert reopened since is open: not in this index any more
        if gone:
            pipe.zrem(keys.alert_index(), *(f"{p}|{a}" for p, a in gone))
            pipe.hdel(keys.alert_patients(), *(a for _, a in gone))
        pipe.execute()
        return gone

    def retire_inactive_patients(self, now: datetime, limit: int = 100) -> list[str]:
        """Forget patients with no resource or delete for ``retention_inactive_patient_days`` (wall clock) and no
        alert left in Redis: their timeline (expired or not: open conditions, open medications, the Patient
        resource), meta, and their entries in the patients-seen set, the worklist context, the due index and the
        resource -> patient index. Bounded work per call: at most ``limit`` patients, ``limit`` resources each;
        a patient with more is finished by the next calls. Returns the patients forgotten completely."""
        cutoff = now.timestamp() - self.settings.retention_inactive_patient_days * 86_400
        patients = self.client.zrangebyscore(keys.patients_seen(), "-inf", cutoff, start=0, num=limit)
        if not patients:
            return []
        calls = []
        for patient in patients:
            k = keys.patient_keys(patient)
            names = ("facts", "meta", "tl", "exp", "alerts", "open", "applied", "closed")
            calls.append(([k[name] for name in names], [limit, repr(cutoff)]))
        retired, forgotten, kept = [], [], []
        for patient, result in zip(patients, run_pipelined(self.client, self._retire, calls), strict=True):
            if isinstance(result, Exception):
                raise result
            outcome, fields = result
            forgotten += fields
            if outcome == "retired":
                retired.append(patient)
            elif outcome == "kept":
                kept.append(patient)
        pipe = self.client.pipeline(transaction=False)
        if forgotten:
            pipe.hdel(keys.resource_patients(), *forgotten)
        if retired:
            pipe.zrem(keys.patients_seen(), *retired)
            pipe.srem(keys.patients(), *retired)
            pipe.hdel(keys.patient_context(), *retired)
            pipe.zrem(keys.due_patients(), *retired)
        if kept:  # alerts still stored (or written since: then its newer score stays): looked at again in a day
            pipe.zadd(keys.patients_seen(), dict.fromkeys(kept, cutoff + 86_400), xx=True, gt=True)
        pipe.execute()
        return retired

    def backfill_retention_indexes(self, now: datetime, count: int = 100) -> bool:
        """One bounded step (a ZSCAN / SSCAN page of about ``count``) of indexing what a release before the
        retention indexes stored: closed alerts into ``closed_alerts`` (scored by their last update, about when
        they closed) and known patients into ``patients_seen`` (scored ``now``: their inactivity counts from the
        upgrade). Idempotent (ZADD NX); returns True once both scans have finished."""
        key = keys.retention_backfill()
        state = self.client.hgetall(key)
        update: dict[str, int] = {}
        for name, step in (("alerts", self._backfill_closed), ("patients", self._backfill_seen)):
            if state.get(f"{name}_done") != "1":
                cursor = step(int(state.get(name, 0)), count, now)
                update |= {name: cursor, f"{name}_done": int(cursor == 0)}
        if update:
            self.client.hset(key, mapping=update)
        return all(update.get(f"{n}_done", int(state.get(f"{n}_done") == "1")) for n in ("alerts", "patients"))

    def _backfill_closed(self, cursor: int, count: int, now: datetime) -> int:
        cursor, members = self.client.zscan(keys.alert_index(), cursor, count=count)
        if not members:
            return cursor
        refs = [(member, *member.split("|", 1), score) for member, score in members]
        pipe = self.client.pipeline(transaction=False)
        for _, patient, alert_id, _ in refs:
            pipe.hget(keys.patient_keys(patient)["alerts"], alert_id)
        closed = {
            member: score
            for (member, _, _, score), raw in zip(refs, pipe.execute(), strict=True)
            if raw and json.loads(raw).get("status") in CLOSED_STATUSES
        }
        if closed:
            self.client.zadd(keys.closed_alerts(), closed, nx=True)
        return cursor

    def _backfill_seen(self, cursor: int, count: int, now: datetime) -> int:
        cursor, patients = self.client.sscan(keys.patients(), cursor, count=count)
        if patients:
            self.client.zadd(keys.patients_seen(), dict.fromkeys(patients, now.timestamp()), nx=True)
        return cursor

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
