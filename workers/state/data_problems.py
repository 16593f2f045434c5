"""The data-problems queue: why decisions were indeterminate, as a list a lab-interface analyst can work.

An indeterminate decision (DESIGN.md invariant 6) has a cause in the data: a unit the value sets do not know
(``mg%``), a unit whose dimension contradicts the LOINC code, an implausible value, an unparseable value, a
result dated in the future. Each cause becomes one *item*, identified by (patient, reason, the versioned
resources): every later evaluation that hits the same cause counts an occurrence and adds the rule, it never
opens a second item. A corrected resource (a new version) is a new item. People resolve an item (with a note
of what was done) or reopen it; both go into the item's history, which the audit export includes.

Record shape (what the pipeline passes to :meth:`DataProblems.record`; :meth:`DataProblem.from_fact` builds
one from a fact with a problem)::

    {"patient": "p1", "reason": "unknown-unit", "detail": "unknown unit 'mg%' for magnesium",
     "resources": ["Observation/mg-1/_history/2"], "as_of": "2024-03-12T08:00:00Z",
     "rule_id": "arrhythmia-with-low-magnesium", "concept": "magnesium", "reported": "1.9 mg%"}

Redis keys (hash tag ``{dataproblems}``): ``items`` (id -> item json), and ``z:open``, ``z:resolved``,
``z:all`` (ids by the epoch last seen). Items hold PHI-adjacent data (patient id, values): they are shown to
authorised users only and never logged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from config.settings import get_settings
from rules.facts import Fact
from workers.state.review_index import decode_cursor, encode_cursor
from workers.state.scripts import load_script

Reason = Literal[
    "unknown-unit",
    "missing-unit",
    "unit-contradicts-code",
    "implausible-value",
    "unparseable-value",
    "future-date",
    "other",
]
#: reason code -> what the list shows, and what a lab-interface analyst usually does about it
REASONS: dict[str, tuple[str, str]] = {
    "unknown-unit": ("Unknown unit", "map the unit in the interface engine or add it to rules/valuesets/units.yaml"),
    "missing-unit": ("Missing unit", "have the interface send the UCUM unit with the value"),
    "unit-contradicts-code": (
        "Unit contradicts the test code",
        "fix the LOINC code or the unit: a molar code needs mmol/L or mEq/L, a mass code mg/dL",
    ),
    "implausible-value": ("Implausible value", "check the result for a unit or transcription error with the lab"),
    "unparseable-value": ("Unreadable value", "have the interface send a number (valueQuantity)"),
    "future-date": ("Dated in the future", "check the sending system's clock and time zone"),
    "other": ("Other data problem", "look at the source resource"),
}
STATUSES = ("open", "resolved")
_KEYWORDS = (  # problem texts of rules/normalize.py and rules/units.py -> reason (first match wins)
    ("contradict", "unit-contradicts-code"),
    ("unknown unit", "unknown-unit"),
    ("missing unit", "missing-unit"),
    ("implausible", "implausible-value"),
    ("unparseable", "unparseable-value"),
    ("not a finite number", "unparseable-value"),
    ("cannot be converted", "unparseable-value"),
    ("future", "future-date"),
)


def classify(detail: str) -> str:
    """The reason code of a fact's problem text (``other`` when none matches)."""
    text = detail.casefold()
    return next((reason for word, reason in _KEYWORDS if word in text), "other")


def _utc_text(value: str | datetime) -> str:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class DataProblem(BaseModel):
    """One cause of an indeterminate decision, as the pipeline records it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patient: str = Field(min_length=1, max_length=64)
    reason: Reason
    detail: str = Field(min_length=1, max_length=500, description="what is wrong, in words")
    resources: tuple[str, ...] = Field(min_length=1, description="versioned references of the source resources")
    as_of: str = Field(description="the decision's instant (ISO UTC)")
    rule_id: str | None = None
    concept: str | None = None
    reported: str | None = Field(None, max_length=200, description="value and unit as the source sent them")

    @field_validator("as_of", mode="before")
    @classmethod
    def _utc(cls, value: Any) -> str:
        return _utc_text(value)

    @field_validator("resources")
    @classmethod
    def _sorted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(value)))

    @property
    def id(self) -> str:
        """Stable id: the same cause (patient, reason, resource versions) is one item."""
        key = json.dumps([self.patient, self.reason, list(self.resources)], separators=(",", ":"))
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    @classmethod
    def from_fact(
        cls, fact: Fact, *, as_of: str | datetime, rule_id: str | None = None, reason: str | None = None
    ) -> DataProblem:
        """The problem of a fact that has one (``fact.problem``); the reason is read from its text unless given."""
        detail = fact.problem or "indeterminate"
        reported = f"{fact.comparator or ''}{fact.reported_value} {fact.reported_unit or ''}".strip()
        return cls(
            patient=fact.patient,
            reason=reason or classify(detail),  # type: ignore[arg-type]
            detail=detail,
            resources=(fact.reference,),
            as_of=as_of,  # type: ignore[arg-type]
            rule_id=rule_id,
            concept=fact.concept,
            reported=reported if fact.reported_value is not None else None,
        )


class DataProblemError(Exception):
    """A transition that cannot be made: ``code`` is not-found, illegal, conflict or invalid."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class ProblemQuery:
    """A list request: status (``open``, ``resolved``, ``all``), reason, patient ids; the cursor binds to it."""

    status: str = "open"
    reason: str | None = None
    patients: frozenset[str] | None = None
    limit: int = 50

    def signature(self) -> str:
        """What a cursor is bound to."""
        patients = sorted(self.patients) if self.patients is not None else None
        return json.dumps(["data-problems", self.status, self.reason, patients])

    def matches(self, item: dict[str, Any]) -> bool:
        """Filters applied while walking the set."""
        if self.reason and item.get("reason") != self.reason:
            return False
        return self.patients is None or item.get("patient") in self.patients


@dataclass
class ProblemPage:
    """A page of items, newest seen first, and the cursor of the next page (None: last page)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def _prefix() -> str:
    return f"{get_settings().key_prefix}:{{dataproblems}}"


def items_key() -> str:
    """Hash: item id -> item json."""
    return f"{_prefix()}:items"


def set_key(status: str) -> str:
    """Sorted set of item ids (``open``, ``resolved`` or ``all``) by the epoch last seen."""
    return f"{_prefix()}:z:{status}"


class DataProblems:
    """The queue on one Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._record = load_script(client, "data_problem_record.lua")
        self._transition = load_script(client, "data_problem_transition.lua")

    def record(self, problem: DataProblem | dict[str, Any], now: datetime | None = None) -> bool:
        """Record one problem; True when it opened a new item."""
        return self.record_many([problem], now)[0]

    def record_many(self, problems: list[DataProblem | dict[str, Any]], now: datetime | None = None) -> list[bool]:
        """Record several problems in one round trip (the pipeline's batch); True per new item."""
        moment = now or datetime.now(UTC)
        at, score = _utc_text(moment), repr(moment.timestamp())
        pipe = self.client.pipeline(transaction=False)
        for raw in problems:
            problem = raw if isinstance(raw, DataProblem) else DataProblem.model_validate(raw)
            self._record(
                keys=[items_key(), set_key("open"), set_key("resolved"), set_key("all")],
                args=[problem.id, problem.model_dump_json(), at, score],
                client=pipe,
            )
        return [bool(created) for created in pipe.execute()] if problems else []

    def get(self, item_id: str) -> dict[str, Any] | None:
        """One item by id."""
        raw = self.client.hget(items_key(), item_id)
        return _read(raw) if raw else None

    def counts(self) -> dict[str, int]:
        """Items per status, and all."""
        pipe = self.client.pipeline(transaction=False)
        for status in (*STATUSES, "all"):
            pipe.zcard(set_key(status))
        return dict(zip((*STATUSES, "all"), (int(n) for n in pipe.execute()), strict=True))

    def list(self, query: ProblemQuery, cursor: str | None = None) -> ProblemPage:
        """Items of ``query.status`` matching the query, last seen newest first, after ``cursor``."""
        after = decode_cursor(query, cursor) if cursor else None
        key = set_key(query.status)
        high = "+inf" if after is None else repr(after[0])
        items: list[dict[str, Any]] = []
        last: tuple[float, str] | None = None
        offset = 0
        while True:
            rows = self.client.zrevrangebyscore(key, high, "-inf", start=offset, num=200, withscores=True)
            if not rows:
                return ProblemPage(items, None)
            offset += len(rows)
            rows = [(m, s) for m, s in rows if after is None or s < after[0] or (s == after[0] and m < after[1])]
            raws = self.client.hmget(items_key(), [m for m, _ in rows]) if rows else []
            for (member, score), raw in zip(rows, raws, strict=True):
                item = _read(raw) if raw else None
                if item is None or not query.matches(item):
                    continue
                if len(items) == query.limit and last is not None:
                    return ProblemPage(items, encode_cursor(query, *last))
                items.append(item)
                last = (score, member)

    def transition(
        self, item_id: str, action: str, actor: str, *, revision: int | None, comment: str | None, at: datetime
    ) -> dict[str, Any]:
        """Resolve or reopen an item (revision-checked); DataProblemError when that cannot be done."""
        if action not in ("resolve", "reopen"):
            raise DataProblemError("invalid", f"unknown action {action!r}; expected resolve or reopen")
        code, body = self._transition(
            keys=[items_key(), set_key("open"), set_key("resolved")],
            args=[item_id, action, actor, _utc_text(at), "" if revision is None else str(revision), comment or ""],
        )
        if code != "ok":
            raise DataProblemError(code, body)
        return _read(body)

    def iter_all(self, chunk: int = 500) -> Any:
        """Every item (for the audit export), in pipelined chunks."""
        cursor = 0
        while True:
            cursor, batch = self.client.hscan(items_key(), cursor, count=chunk)
            for raw in batch.values():
                yield _read(raw)
            if cursor == 0:
                return


def _read(raw: str) -> dict[str, Any]:
    item = json.loads(raw)
    for name in ("history", "rules", "resources"):  # Lua's cjson writes empty arrays as {}
        if item.get(name) == {}:
            item[name] = []
    return item
