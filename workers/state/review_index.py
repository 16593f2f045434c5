"""The review worklist's index and queries over the alert store.

Alerts live in per-patient hashes (``{p:<id>}:alerts``), written by the Lua apply script and by
``Store.transition``; every writer also scores the alert in ``keys.alert_index()`` with the time of the
change. The worklist needs hospital-wide filters and a stable order over tens of thousands of alerts, so
it keeps a *derived* index, rebuilt from those two sources at any time:

* ``<prefix>:{review}:a:<alert id>`` - a small JSON summary of the alert (status, rule, severity,
  times, revision, summary text), the unit the list reads;
* ``<prefix>:{review}:z:<bucket>:<order>`` and ``<prefix>:{review}:z:<bucket>:<order>:<rule>`` -
  sorted sets of alert ids per status bucket (each status, and the groups of ``workers.state.statuses``:
  ``todo`` = active + acknowledged, ``open``, ``closed``, ``all``), optionally per rule, in two orders:
  ``sev`` (score = band x 1e10 + raised epoch; the band is the severity rank, and escalated alerts that
  nobody has acted on since get the bands before all others, so a range is "escalated critical ... info
  newest last" and one severity is two score bands) and ``time`` (score = raised epoch);
* ``<prefix>:{review}:snoozed`` - snoozed alert ids by the epoch their snooze ends;
* ``<prefix>:{review}:synced`` - the ``alert_index`` score up to which the summaries are current;
* ``<prefix>:{review}:format`` - the index layout version; a different one (an upgrade) rebuilds the index.

Times: an alert is *raised* when the pipeline wrote it (``created_at``, wall clock); ``opened_at`` is the
clinical time of the data that opened it. Orders, time filters and ages use the raised time, so a replayed
historical extract does not show alerts as years old; the clinical time is shown beside it.

All review keys share the hash tag ``{review}`` (one slot on Redis Cluster). ``sync`` brings the index up
to date incrementally (alerts changed since the watermark minus an overlap, re-indexing is idempotent and
guarded by the alert revision), and is called before every read, so the index never serves a state older
than the request. Status, rule, severity and time-range filters are score ranges on one sorted set;
text filters are applied on the summaries while walking that set; a patient filter (a few patients: an
id, or the patients a name / MRN search or a ward filter found) reads those patients' hashes directly.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import redis

from config.settings import get_settings
from rules.facts import Fact
from rules.fhirtime import parse_time
from workers.state import keys, statuses
from workers.state.statuses import STATUSES
from workers.state.store import Store

_LUA_DIR = Path(__file__).with_name("lua")
INDEX_FORMAT = "2"  # bump when summaries or set memberships change meaning: the index is rebuilt on first use
OPEN_STATUSES = statuses.OPEN
BUCKETS = (*STATUSES, *statuses.GROUPS)
SEVERITIES = ("critical", "warning", "info")
SORTS = ("severity", "oldest", "newest")
_BAND = 1e10  # band width in the "sev" order; epoch seconds stay below it until the year 2286
_RANKS = len(SEVERITIES) + 1  # critical, warning, info, none: bands 0-3 escalated, 4-7 the others
DIRECT_PATIENTS = 200  # a patient filter naming at most this many patients reads their hashes directly
TREND_CONCEPTS = ("potassium", "magnesium")


class CursorError(ValueError):
    """A cursor that this server did not issue or that belongs to another query."""


def _prefix() -> str:
    return f"{get_settings().key_prefix}:{{review}}"


def summary_key(alert_id: str) -> str:
    """Key of one alert's summary JSON."""
    return f"{_prefix()}:a:{alert_id}"


def order_key(bucket: str, order: str, rule: str | None = None) -> str:
    """Sorted set of alert ids in ``bucket`` (a status, ``open`` or ``all``), ``order`` sev|time, per rule."""
    base = f"{_prefix()}:z:{bucket}:{order}"
    return f"{base}:{rule}" if rule else base


def snoozed_key() -> str:
    """Sorted set: snoozed alert id -> epoch its snooze ends."""
    return f"{_prefix()}:snoozed"


def seen_key() -> str:
    """Hash: alert id -> the ``alert_index`` score its summary was built from (what ``sync`` compares)."""
    return f"{_prefix()}:seen"


def synced_key() -> str:
    """Watermark: the ``alert_index`` score up to which summaries are current."""
    return f"{_prefix()}:synced"


def format_key() -> str:
    """The index layout version the sets were built with (``INDEX_FORMAT``)."""
    return f"{_prefix()}:format"


def epoch(text: str | None) -> float:
    """Epoch seconds of an ISO time text (0 when missing or unreadable)."""
    if not text:
        return 0.0
    try:
        return parse_time(text).timestamp()
    except ValueError:
        return 0.0


def severity_rank(severity: str | None) -> int:
    """0 critical, 1 warning, 2 info, 3 none/unknown."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


def effective_status(alert: dict[str, Any], now: datetime) -> str:
    """The alert's status as the worklist shows it: a snooze whose time has passed is ``active`` again
    (the transition script treats it the same way; escalation also ends a snooze)."""
    status = str(alert.get("status") or "active")
    if status == "snoozed" and epoch(alert.get("snoozed_until")) <= now.timestamp():
        return "active"
    return status


def is_user_entry(entry: dict[str, Any]) -> bool:
    """True for history entries written by a person (review page or EHR user), not by the pipeline."""
    by = str(entry.get("by") or "system")
    return by != "system" and not by.startswith("system:")


def escalation(alert: dict[str, Any], status: str) -> dict[str, Any] | None:
    """The escalation nobody has acted on yet: the last ``escalated`` history entry of an active alert when no
    person acted after it (``at``, ``why``, ``from``), else None."""
    if status != "active":
        return None
    for entry in reversed(alert.get("history") or []):
        if entry.get("action") == "escalated":
            return {"at": entry.get("at"), "why": entry.get("why"), "from": entry.get("from")}
        if is_user_entry(entry):
            return None
    return None


def raised_at(alert: dict[str, Any]) -> str | None:
    """When the alert was raised (written by the pipeline, wall clock); the clinical opening time for alerts
    written before ``created_at`` existed or by a writer that does not set it."""
    return alert.get("created_at") or alert.get("opened_at")


def summarize(patient: str, alert: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """The worklist summary of an alert (what the index stores and the list returns)."""
    card = alert.get("card") or {}
    history = alert.get("history") or []
    status = effective_status(alert, now or utcnow())
    return {
        "id": alert["id"],
        "patient": alert.get("patient") or patient,
        "rule_id": alert["rule_id"],
        "rule_version": alert.get("rule_version"),
        "severity": alert.get("severity"),
        "status": status,
        "summary": card.get("summary", ""),
        "source": alert.get("source") or "stream",
        "raised_at": raised_at(alert),
        "opened_at": alert.get("opened_at"),
        "updated_at": alert.get("updated_at"),
        "closed_at": alert.get("closed_at"),
        "snoozed_until": alert.get("snoozed_until") if status == "snoozed" else None,
        "escalated": escalation(alert, status),
        "revision": int(alert.get("revision") or 0),
        "last_action": history[-1].get("action") if history else None,
        "buckets": [status, *statuses.groups_of(status)],
    }


def sort_score(summary: dict[str, Any], order: str) -> float:
    """Score of a summary in the ``sev`` or ``time`` order (both by raised time within a band)."""
    raised = epoch(summary.get("raised_at") or summary.get("opened_at"))
    if order == "time":
        return raised
    band = severity_rank(summary.get("severity")) + (0 if summary.get("escalated") else _RANKS)
    return band * _BAND + raised


@dataclass
class Query:
    """A worklist query; every field optional (``status`` defaults to the to-do bucket).

    ``patient`` is what was asked for (an id, a name or an MRN: part of the cursor's binding); ``patients``
    the patient ids it and the other patient filters (ward, encounter class) resolved to, None when no
    patient filter applies. ``opened_from`` / ``opened_to`` bound the raised time."""

    status: str = "todo"
    rule: str | None = None
    severity: str | None = None
    patient: str | None = None
    text: str | None = None
    opened_from: datetime | None = None
    opened_to: datetime | None = None
    sort: str = "severity"
    limit: int = 50
    patients: frozenset[str] | None = None
    context: tuple[str, ...] = ()  # other patient filters as asked (ward, encounter class): cursor binding only
    group: bool = False  # one row per patient

    def signature(self) -> str:
        """What a cursor is bound to: the filters, sort and grouping (not the limit)."""
        parts = [self.status, self.rule, self.severity, self.patient, self.text, self.sort, *self.context]
        parts += [self.opened_from and self.opened_from.isoformat(), self.opened_to and self.opened_to.isoformat()]
        return json.dumps([*parts, self.group])

    def matches(self, summary: dict[str, Any]) -> bool:
        """Filters applied on a summary (used for the direct patient path and as a post-filter)."""
        status = str(summary.get("status"))
        if self.status != status and self.status not in statuses.groups_of(status):
            return False
        if self.rule and summary.get("rule_id") != self.rule:
            return False
        if self.severity and summary.get("severity") != self.severity:
            return False
        if self.patients is not None and summary.get("patient") not in self.patients:
            return False
        raised = epoch(summary.get("raised_at") or summary.get("opened_at"))
        if self.opened_from and raised < self.opened_from.timestamp():
            return False
        if self.opened_to and raised > self.opened_to.timestamp():
            return False
        if self.text:
            needle = self.text.casefold()
            haystack = " ".join(str(summary.get(k) or "") for k in ("summary", "rule_id", "patient", "id"))
            if needle not in haystack.casefold():
                return False
        return True


@dataclass
class Page:
    """One page of summaries and the cursor of the next page (None: last page)."""

    items: list[dict[str, Any]]
    next_cursor: str | None
    scanned: int = 0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class PatientPage:
    """One page of patients, each with its alerts that match the query (in the query's order)."""

    groups: list[dict[str, Any]]
    next_cursor: str | None
    scanned: int = 0


class Signed(Protocol):
    """Anything a cursor can be bound to: a query with a ``signature()`` of its filters."""

    def signature(self) -> str: ...


def encode_cursor(query: Signed, score: float, member: str) -> str:
    """Opaque cursor: the last item's position, bound to the query's filters."""
    raw = json.dumps({"q": query.signature(), "s": score, "m": member}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(query: Signed, cursor: str) -> tuple[float, str]:
    """Position encoded in ``cursor``; CursorError if malformed or issued for other filters."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        score, member, signature = float(data["s"]), str(data["m"]), data["q"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CursorError("cursor is not one this server issued") from exc
    if signature != query.signature():
        raise CursorError("cursor belongs to a query with other filters or sort; start again without it")
    return score, member


def forget(client: redis.Redis, alert_ids: list[str]) -> None:
    """Drop removed alerts (closed-alert retention) from the index: summaries, order sets, snoozes, seen marks.
    Two round trips whatever the number."""
    if not alert_ids:
        return
    pipe = client.pipeline(transaction=False)
    for alert_id, raw in zip(alert_ids, client.mget([summary_key(i) for i in alert_ids]), strict=True):
        if raw:
            summary = json.loads(raw)
            for bucket in summary.get("buckets") or [summary.get("status"), "all"]:
                for order in ("sev", "time"):
                    pipe.zrem(order_key(bucket, order), alert_id)
                    pipe.zrem(order_key(bucket, order, summary.get("rule_id")), alert_id)
        pipe.delete(summary_key(alert_id))
        pipe.zrem(snoozed_key(), alert_id)
        pipe.hdel(seen_key(), alert_id)
    pipe.execute()


class ReviewIndex:
    """Derived worklist index over a Store (see the module docstring)."""

    def __init__(self, store: Store, *, overlap_seconds: float = 30.0, scan_budget: int = 5000) -> None:
        self.store = store
        self.client: redis.Redis = store.client
        self.overlap = overlap_seconds
        self.scan_budget = scan_budget
        self._index = self.client.register_script((_LUA_DIR / "review_index.lua").read_text(encoding="utf-8"))

    # --- maintenance -------------------------------------------------------------------------------------

    def sync(self) -> int:
        """Re-index alerts whose change is newer than the watermark; returns how many were re-read.

        Writers score ``alert_index`` with their wall clock just before the ZADD lands, so a change scored
        ``s`` is visible by ``s + overlap`` at the latest. After a sync at time ``t`` everything scored before
        ``t - overlap`` is indexed: the next watermark is ``min(highest score seen, t - overlap)`` and the next
        sync reads only what is scored after it. Within that window an alert is re-read only when its score
        is newer than the one its summary was built from (``seen_key``, one HMGET per 500)."""
        started = time.time()
        self._check_format()
        raw_mark = self.client.get(synced_key())
        start = f"({float(raw_mark)!r}" if raw_mark else "-inf"
        members = self.client.zrangebyscore(keys.alert_index(), start, "+inf", withscores=True)
        reread = 0
        for chunk in _chunks(members, 500):
            refs = [(*member.split("|", 1), score) for member, score in chunk]
            seen = self.client.hmget(seen_key(), [alert_id for _, alert_id, _ in refs])
            todo = [ref for ref, mark in zip(refs, seen, strict=True) if mark is None or float(mark) < ref[2]]
            if not todo:
                continue
            pipe = self.client.pipeline(transaction=False)
            for patient, alert_id, _ in todo:
                pipe.hget(keys.patient_keys(patient)["alerts"], alert_id)
            rows = zip(todo, pipe.execute(), strict=True)
            alerts = [(patient, json.loads(raw), score) for (patient, _, score), raw in rows if raw]
            self.index_alerts(alerts)
            reread += len(alerts)
        highest = max((score for _, score in members), default=float(raw_mark or 0.0))
        mark = min(highest, started - self.overlap)
        if raw_mark is None or mark > float(raw_mark):
            self.client.set(synced_key(), repr(mark))
        return reread

    def rebuild(self) -> int:
        """Forget the watermark and what each summary was built from, and re-index every alert."""
        self.client.delete(synced_key(), seen_key())
        return self.sync()

    def _check_format(self) -> None:
        """An index built by an older layout (other buckets, other scores) is dropped and rebuilt by this sync."""
        if self.client.get(format_key()) == INDEX_FORMAT:
            return
        stale = [*self.client.scan_iter(match=f"{_prefix()}:z:*", count=1000), snoozed_key(), seen_key()]
        stale += [*self.client.scan_iter(match=f"{_prefix()}:a:*", count=1000), synced_key()]
        for chunk in _chunks(stale, 500):
            self.client.delete(*chunk)
        self.client.set(format_key(), INDEX_FORMAT)

    def index_alert(self, patient: str, alert: dict[str, Any]) -> None:
        """Put one alert's current state in the index (ignored if the index holds a newer revision)."""
        self.index_alerts([(patient, alert, 0.0)])

    def index_alerts(self, alerts: list[tuple[str, dict[str, Any], float]]) -> None:
        """Index (patient, alert, alert_index score it was read at) triples in one pipelined round trip."""
        pipe = self.client.pipeline(transaction=False)
        zprefix = f"{_prefix()}:z:"
        for patient, alert, seen in alerts:
            new = {**summarize(patient, alert), "seen": repr(seen)}  # text: Lua's cjson would round the number
            snooze = repr(epoch(new["snoozed_until"])) if new["snoozed_until"] else ""
            self._index(
                keys=[summary_key(new["id"]), snoozed_key(), seen_key()],
                args=[
                    json.dumps(new, separators=(",", ":")),
                    zprefix,
                    repr(sort_score(new, "sev")),
                    repr(sort_score(new, "time")),
                    snooze,
                ],
                client=pipe,
            )
        pipe.execute()

    def due_snoozes(self, now: datetime) -> list[str]:
        """Ids of snoozed alerts whose snooze has ended by ``now``."""
        return list(self.client.zrangebyscore(snoozed_key(), "-inf", now.timestamp()))

    # --- reads ---------------------------------------------------------------------------------------------

    def summaries(self, alert_ids: Iterable[str]) -> list[dict[str, Any] | None]:
        """Summaries by id (None where the index has none)."""
        ids = list(alert_ids)
        if not ids:
            return []
        return [json.loads(raw) if raw else None for raw in self.client.mget([summary_key(i) for i in ids])]

    def counts(self, rule: str | None = None) -> dict[str, int]:
        """Alerts per status bucket (optionally for one rule), for the filter bar."""
        pipe = self.client.pipeline(transaction=False)
        for bucket in BUCKETS:
            pipe.zcard(order_key(bucket, "time", rule))
        return dict(zip(BUCKETS, (int(n) for n in pipe.execute()), strict=True))

    def list(self, query: Query, cursor: str | None = None) -> Page:
        """One page of the worklist for ``query``, starting after ``cursor``."""
        after = decode_cursor(query, cursor) if cursor else None
        items: list[dict[str, Any]] = []
        scanned = 0
        last_item: tuple[float, str] | None = None  # position of the last item on the page
        for member, score, summary in self._candidates(query, after):
            scanned += 1
            if summary is not None and query.matches(summary):
                if len(items) == query.limit:  # one more match exists: there is a next page
                    return Page(items, encode_cursor(query, *last_item) if last_item else None, scanned)
                items.append(summary)
                last_item = (score, member)
            if scanned >= self.scan_budget:
                # walked enough: a possibly short page, and a cursor that goes on after what was walked
                position = last_item if len(items) == query.limit and last_item else (score, member)
                return Page(items, encode_cursor(query, *position), scanned)
        return Page(items, None, scanned)

    def list_patients(self, query: Query, cursor: str | None = None) -> PatientPage:
        """One page of patients (``query.limit`` of them) in the order of each one's first alert in the query's
        order, each with all its alerts that match. A patient's place is its first alert: a cursor is that
        alert's position, and a patient whose first alert lies before the cursor was on an earlier page."""
        after = decode_cursor(query, cursor) if cursor else None
        descending = query.sort == "newest"
        order = "sev" if query.sort == "severity" else "time"
        groups: list[dict[str, Any]] = []
        seen: set[str] = set()
        scanned = 0
        last: tuple[float, str] | None = None
        for member, score, summary in self._candidates(query, after):
            scanned += 1
            patient = summary.get("patient") if summary is not None and query.matches(summary) else None
            if patient and patient not in seen:
                seen.add(patient)
                alerts = self._patient_rows(query, patient, order, descending)
                first = (sort_score(alerts[0], order), alerts[0]["id"]) if alerts else None
                if first and (after is None or _is_after(first[1], first[0], after, descending)):
                    if len(groups) == query.limit:
                        return PatientPage(groups, encode_cursor(query, *last) if last else None, scanned)
                    groups.append({"patient": patient, "alerts": alerts})
                    last = first
            if scanned >= self.scan_budget:
                position = last if len(groups) == query.limit and last else (score, member)
                return PatientPage(groups, encode_cursor(query, *position), scanned)
        return PatientPage(groups, None, scanned)

    def changes(self, query: Query, since: float) -> dict[str, list[str]]:
        """Alerts matching ``query`` that were raised, or escalated and not acted on, after ``since`` (epoch):
        what an open worklist page has not shown yet. Reads only the alerts changed since then."""
        members = self.client.zrangebyscore(keys.alert_index(), f"({since!r}", "+inf")
        ids = sorted({member.split("|", 1)[1] for member in members})
        new: list[str] = []
        escalated: list[str] = []
        for summary in self.summaries(ids):
            if summary is None or not query.matches(summary):
                continue
            if epoch(summary.get("raised_at")) > since:
                new.append(summary["id"])
            elif summary.get("escalated"):
                escalated.append(summary["id"])
        return {"new": new, "escalated": escalated}

    def _candidates(
        self, query: Query, after: tuple[float, str] | None
    ) -> Iterator[tuple[str, float, dict[str, Any] | None]]:
        if query.patients is not None and len(query.patients) <= DIRECT_PATIENTS:
            return self._patient_candidates(query, after)
        return self._index_candidates(query, after)

    def _segments(self, query: Query) -> list[tuple[float, float]]:
        low = query.opened_from.timestamp() if query.opened_from else 0.0
        high = query.opened_to.timestamp() if query.opened_to else _BAND - 1
        if query.sort != "severity":
            return [(low, high)] if query.sort == "oldest" else [(high, low)]
        if query.severity:
            rank = severity_rank(query.severity)
            bands: Iterable[int] = (rank, rank + _RANKS)  # escalated, then the others
        else:
            bands = range(2 * _RANKS)
        return [(b * _BAND + low, b * _BAND + high) for b in bands]

    def _index_candidates(
        self, query: Query, after: tuple[float, str] | None
    ) -> Iterator[tuple[str, float, dict[str, Any] | None]]:
        order = "sev" if query.sort == "severity" else "time"
        key = order_key(query.status, order, query.rule)
        descending = query.sort == "newest"
        chunk = max(query.limit * 2, 100)
        for first, final in self._segments(query):
            start = first
            if after is not None:
                if (descending and after[0] < final) or (not descending and after[0] > final):
                    continue  # the whole segment lies before the cursor
                inside = after[0] < first if descending else after[0] > first
                start = after[0] if inside else first
            offset = 0
            while True:
                if descending:
                    rows = self.client.zrevrangebyscore(key, start, final, start=offset, num=chunk, withscores=True)
                else:
                    rows = self.client.zrangebyscore(key, start, final, start=offset, num=chunk, withscores=True)
                if not rows:
                    break
                offset += len(rows)
                rows = [(m, s) for m, s in rows if after is None or _is_after(m, s, after, descending)]
                for (member, score), summary in zip(rows, self.summaries(m for m, _ in rows), strict=True):
                    yield member, score, summary

    def _patient_candidates(
        self, query: Query, after: tuple[float, str] | None
    ) -> Iterator[tuple[str, float, dict[str, Any] | None]]:
        order = "sev" if query.sort == "severity" else "time"
        descending = query.sort == "newest"
        now = utcnow()
        rows = [
            summarize(patient, alert, now)
            for patient in sorted(query.patients or ())
            for alert in self.store.alerts_for_patient(patient)
        ]
        scored = sorted(((s["id"], sort_score(s, order), s) for s in rows), key=lambda r: (r[1], r[0]))
        if descending:
            scored.reverse()
        for member, score, summary in scored:
            if after is None or _is_after(member, score, after, descending):
                yield member, score, summary

    def _patient_rows(self, query: Query, patient: str, order: str, descending: bool) -> list[dict[str, Any]]:
        """A patient's alerts that match the query, in the query's order (read from the patient's hash)."""
        now = utcnow()
        rows = [summarize(patient, a, now) for a in self.store.alerts_for_patient(patient)]
        rows = [r for r in rows if query.matches(r)]
        rows.sort(key=lambda r: (sort_score(r, order), r["id"]), reverse=descending)
        return rows


def _is_after(member: str, score: float, after: tuple[float, str], descending: bool) -> bool:
    if descending:
        return score < after[0] or (score == after[0] and member < after[1])
    return score > after[0] or (score == after[0] and member > after[1])


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- clinical context for the detail view ------------------------------------------------------------------


def _lab_point(fact: Fact) -> dict[str, Any]:
    return {
        "concept": fact.concept,
        "time": fact.start.isoformat().replace("+00:00", "Z") if fact.start else None,
        "value": float(fact.value) if isinstance(fact.value, Decimal) else fact.value,
        "unit": fact.unit,
        "reported": f"{fact.comparator or ''}{fact.reported_value} {fact.reported_unit or ''}".strip()
        if fact.reported_value is not None
        else None,
        "reference": fact.reference,
    }


def lab_trend(facts: Iterable[Fact], end: datetime, days: float) -> dict[str, list[dict[str, Any]]]:
    """K and Mg results (canonical unit) from ``days`` before ``end`` up to ``end``, oldest first."""
    start = end - timedelta(days=days)
    trend: dict[str, list[dict[str, Any]]] = {c: [] for c in TREND_CONCEPTS}
    for fact in facts:
        usable = fact.concept in trend and fact.kind == "lab" and fact.counts and fact.value is not None
        if usable and fact.start and start <= fact.start <= end:
            trend[fact.concept].append(_lab_point(fact))
    for points in trend.values():
        points.sort(key=lambda p: (p["time"], p["reference"]))
    return trend


def latest_labs(facts: Iterable[Fact]) -> dict[str, dict[str, Any] | None]:
    """The latest counted K and Mg result of a timeline (lowest value wins at the same instant)."""
    best: dict[str, Fact] = {}
    for fact in facts:
        if fact.concept in TREND_CONCEPTS and fact.kind == "lab" and fact.counts and fact.start:
            current = best.get(fact.concept)
            if current is None or (fact.start, -(fact.value or 0)) > (current.start, -(current.value or 0)):
                best[fact.concept] = fact
    return {c: (_lab_point(best[c]) if c in best else None) for c in TREND_CONCEPTS}


def utcnow() -> datetime:
    """The wall clock (UTC); the only place the review code reads it, so tests can pin it."""
    return datetime.now(UTC)
