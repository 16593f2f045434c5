"""A patient's timeline in Redis: the newest version of every resource, indexed by time so an event reads only
the facts its rules can see (``store_events.lua``), and pruned by retention with bounded work per call."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, lru_cache
from typing import Any

import redis

from config.settings import Settings, get_settings
from rules.facts import Fact
from workers.events import Event, clock_text, parse_clock
from workers.state import keys, schema_upgrade
from workers.state.scripts import load_script, run_pipelined

#: Expired resources one call may prune (retention is also applied logically when facts are read).
PRUNE_LIMIT = 100
_RECORD, _FIELD = "\x1e", "\x1f"


def parse_facts(payload: str) -> tuple[Fact, ...]:
    """The facts of one stored resource version, upgraded to the current format, parsed once per process (the
    latest ``fact_cache_size`` versions are kept; Fact is frozen, so they are shared safely)."""
    return _parser()(payload, schema_upgrade.FACT_SCHEMA_VERSION)


@cache
def _parser() -> Callable[[str, int], tuple[Fact, ...]]:
    size = get_settings().fact_cache_size
    return lru_cache(maxsize=size)(_parse_facts) if size else _parse_facts


_TIMES = ("start", "end", "updated")


def _parse_facts(payload: str, schema_version: int) -> tuple[Fact, ...]:
    facts = []
    for item in json.loads(payload):
        record = schema_upgrade.upgrade_fact(item)
        for name in _TIMES:  # datetime.timezone.utc, not pydantic's TzInfo: the engine compares many times
            if isinstance(record.get(name), str):
                record[name] = parse_clock(record[name])
        info = record.get("patient_info")
        if isinstance(info, dict) and isinstance(info.get("deceased"), str):
            record["patient_info"] = {**info, "deceased": parse_clock(info["deceased"])}
        facts.append(Fact.model_validate(record))
    return tuple(facts)


def epoch(value: datetime) -> float:
    """Seconds since the epoch (a sorted-set score)."""
    return value.timestamp()


def readable_until(facts: list[Fact]) -> float:
    """The latest instant at which a window can still include one of these facts: a point's time, an
    interval's end, +inf while an interval is open or the time is unknown, and +inf for patient context
    (Patient, Encounter: the engine reads them at every evaluation while retention keeps them)."""
    latest = -math.inf
    for fact in facts:
        if fact.kind in ("patient", "encounter"):
            return math.inf  # patient context is read by every evaluation while it is kept (retention decides)
        if fact.kind in ("lab", "finding"):
            moment = fact.start
        else:
            moment = fact.end
            if fact.end is None:
                return math.inf
        if moment is None:
            return math.inf
        latest = max(latest, epoch(moment))
    return latest


def _score(value: float) -> str:
    return "+inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)


@dataclass
class StoredResource:
    """The stored newest version of one resource: its rank (version order), expiry and facts."""

    rank: str
    expires: datetime
    facts: tuple[Fact, ...]


@dataclass
class PatientWindow:
    """What ``store_events`` returned for one patient: the resources that can matter to the batch's
    evaluations as they were BEFORE the batch, the status of each event, and the patient's state."""

    patient: str
    version: int
    clock: datetime | None
    due: datetime | None
    resources: dict[str, StoredResource]
    statuses: list[str]
    open_alerts: dict[str, str]  # rule id -> open alert id
    pruned: list[str] = field(default_factory=list)


def _stored_value(event: Event, settings: Settings) -> tuple[str, str]:
    payload = json.dumps([f.model_dump(mode="json") for f in event.facts], separators=(",", ":"))
    expires = event.expires(settings)
    return f"{clock_text(expires)}\t{payload}", _score(epoch(expires))


def _parse_value(value: str) -> StoredResource:
    rank, expires, payload = value.split("\t", 2)
    return StoredResource(rank, parse_clock(expires), parse_facts(payload))


class TimelineStore:
    """Stores batches of events and reads timelines, one atomic script per patient."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._store = load_script(client, "store_events.lua")
        self._migrate = load_script(client, "migrate_timeline.lua")

    def store_many(self, by_patient: dict[str, list[Event]], window_pad_hours: float) -> dict[str, Any]:
        """Store every patient's events (arrival order) in one round trip; per patient a
        :class:`PatientWindow` or the error that patient's script (or its arguments) raised."""
        out: dict[str, Any] = {}
        calls, order = [], []
        for patient, events in by_patient.items():
            try:
                calls.append(self._store_call(patient, events, window_pad_hours))
                order.append(patient)
            except Exception as exc:  # one poison event (odd dates, ...) never takes other patients along
                out[patient] = exc
        results = run_pipelined(self.client, self._store, calls)
        retry = []
        for patient, result in zip(order, results, strict=True):
            if isinstance(result, Exception):
                out[patient] = result
            elif result[0] == "migrate":
                retry.append(patient)
            else:
                out[patient] = self._window(patient, result)
        for patient in retry:  # stored by an older release: index it once, then store as usual
            try:
                self.migrate(patient)
                [result] = run_pipelined(
                    self.client, self._store, [self._store_call(patient, by_patient[patient], window_pad_hours)]
                )
                out[patient] = result if isinstance(result, Exception) else self._window(patient, result)
            except redis.ConnectionError:
                raise
            except Exception as exc:
                out[patient] = exc
        return out

    def _store_call(self, patient: str, events: list[Event], window_pad_hours: float) -> tuple[list[str], list[Any]]:
        k = keys.patient_keys(patient)
        tolerance = self.settings.future_tolerance_hours
        times = [e.clock_time(tolerance) for e in events]
        first = next((t for t in times if t is not None), None)
        pad = "inf" if math.isinf(window_pad_hours) else repr(window_pad_hours * 3600)
        seen = repr(time.time()) if any(e.kind != "tick" for e in events) else ""
        args: list[Any] = [pad, PRUNE_LIMIT, repr(epoch(first)) if first is not None else "", seen]
        for event, at in zip(events, times, strict=True):
            clock = f"{clock_text(at)}\t{epoch(at)!r}" if at is not None else ""
            if event.kind == "tick":
                args += ["", "", "", "", "", clock]
                continue
            value, expires = _stored_value(event, self.settings)
            readable = readable_until(event.facts) if not event.is_delete else math.inf
            args += [event.resource, event.rank(), value, _score(readable), expires, clock]
        return [k["facts"], k["meta"], k["tl"], k["exp"], k["open"]], args

    @staticmethod
    def _window(patient: str, result: list[Any]) -> PatientWindow:
        _, version, clock, due, joined, statuses, open_pairs, pruned = result
        resources = {}
        for record in joined.split(_RECORD) if joined else []:
            name, value = record.split(_FIELD, 1)
            resources[name] = _parse_value(value)
        return PatientWindow(
            patient=patient,
            version=int(version),
            clock=parse_clock(clock) if clock else None,
            due=parse_clock(due) if due else None,
            resources=resources,
            statuses=list(statuses),
            open_alerts=dict(zip(open_pairs[::2], open_pairs[1::2], strict=True)),
            pruned=list(pruned),
        )

    def migrate(self, patient: str) -> None:
        """Build the time and expiry indexes of a timeline stored by a release without them (idempotent)."""
        k = keys.patient_keys(patient)
        entries = self.client.hgetall(k["facts"])
        args: list[Any] = []
        for name, value in entries.items():
            stored = _parse_value(value)
            args += [name, _score(readable_until(list(stored.facts))), _score(epoch(stored.expires))]
        clock = self.client.hget(k["meta"], "clock")
        self._migrate(keys=[k["facts"], k["meta"], k["tl"], k["exp"]], args=[_clock_epoch(clock), *args])

    def facts(self, patient: str, as_of: datetime | None = None) -> list[Fact]:
        """The facts stored for a patient (read only), without those retention has expired at ``as_of``
        (default: the patient's clock)."""
        k = keys.patient_keys(patient)
        pipe = self.client.pipeline(transaction=False)
        pipe.hvals(k["facts"])
        pipe.hget(k["meta"], "clock")
        values, clock = pipe.execute()
        limit = as_of or (parse_clock(clock) if clock else None)
        out = []
        for value in values:
            stored = _parse_value(value)
            if limit is None or stored.expires >= limit:
                out.extend(stored.facts)
        return out

    def clock(self, patient: str) -> datetime | None:
        """The patient's clock: the latest time the patient was evaluated at."""
        text = self.client.hget(keys.patient_keys(patient)["meta"], "clock")
        return parse_clock(text) if text else None


def _clock_epoch(text: str | None) -> str:
    return repr(epoch(parse_clock(text))) if text else ""
