"""The rule engine: ``evaluate(rules, facts, as_of)`` -> decisions.

Pure and deterministic: it reads only the facts and the instant it is given (never the wall clock),
so the stream, a replay and a CDS Hooks call reach the same decision from the same facts. Logic is
three-valued (Kleene): an unknown unit or an undecidable comparator makes a predicate *unknown*, and a
rule whose condition is unknown is *indeterminate*, never silently "normal".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel

from rules.cards import render_card
from rules.context import PatientContext, applicability
from rules.facts import Fact, format_decimal
from rules.fhirtime import isoformat
from rules.model import Compare, Condition, Equivalent, InputSpec, Parameter, Rule
from rules.units import unit_key

Outcome = Literal["fires", "not-fires", "indeterminate"]
_POINT_KINDS = frozenset({"lab", "finding"})
_TIMED_KINDS = frozenset({"lab", "finding", "order"})  # a single instant (an order: when it was placed)
_EPOCH = datetime.min.replace(tzinfo=UTC)
_TICK = timedelta(microseconds=1)  # the first instant after a window boundary


class Tri(Enum):
    """Three-valued truth."""

    TRUE = "true"
    FALSE = "false"
    UNKNOWN = "unknown"

    @staticmethod
    def of(flag: bool) -> Tri:
        """TRUE or FALSE from a bool."""
        return Tri.TRUE if flag else Tri.FALSE

    def negate(self) -> Tri:
        """Kleene NOT."""
        return {Tri.TRUE: Tri.FALSE, Tri.FALSE: Tri.TRUE}.get(self, Tri.UNKNOWN)


class Evidence(BaseModel):
    """One fact a decision rests on, as shown on cards and in the review page."""

    input: str
    reference: str
    resource_type: str
    resource_id: str
    version: str | None
    concept: str
    display: str | None
    value: str | None
    unit: str | None
    reported: str | None
    time: str | None
    notes: list[str] = []

    @staticmethod
    def of(input_name: str, fact: Fact) -> Evidence:
        """Evidence entry for a fact read through an input."""
        reported = None
        if fact.reported_value is not None:
            reported = f"{fact.comparator or ''}{fact.reported_value} {fact.reported_unit or ''}".strip()
        notes = [*fact.notes, *([fact.problem] if fact.problem else [])]
        return Evidence.model_construct(  # the fields come from a validated Fact: no second validation
            input=input_name,
            reference=fact.reference,
            resource_type=fact.resource_type,
            resource_id=fact.resource_id,
            version=fact.version,
            concept=fact.concept,
            display=fact.display,
            value=format_decimal(fact.value) if fact.value is not None else None,
            unit=fact.unit,
            reported=reported,
            time=isoformat(fact.start),
            notes=notes,
        )


class _DecisionRecord(BaseModel):
    """The serialised shape of a :class:`Decision` (``Decision.model_dump`` goes through it)."""

    rule_id: str
    rule_version: str
    rule_status: str
    patient: str
    as_of: str
    outcome: Outcome
    severity: str | None = None
    resolves: bool = False
    escalators: list[dict[str, str]] = []
    next_change: str | None = None
    evidence: list[Evidence] = []
    explanation: str
    card: dict[str, Any] | None = None
    parameters: dict[str, str] = {}


@dataclass(eq=False)
class Decision:
    """The result of one rule for one patient as of one instant.

    ``escalators`` lists the rule's named escalating evidence that holds (``[{"id", "label"}]``; only when it
    fires). ``next_change`` is the earliest instant after ``as_of`` at which the decision could change with
    no new data (a fact leaves or enters one of the rule's input windows), or None: the store's due time.

    ``evidence`` is built on first access: most decisions ("does not fire") are counted and dropped.
    (The explanation is worded at once: keeping what it is worded from alive until it is read made the
    stream's batches hold many more objects, and the garbage collector cost more than the wording saved.)
    """

    rule_id: str
    rule_version: str
    rule_status: str
    patient: str
    as_of: str
    outcome: Outcome
    severity: str | None = None
    resolves: bool = False
    escalators: list[dict[str, str]] = field(default_factory=list)
    next_change: datetime | None = None
    explanation: str = ""
    card: dict[str, Any] | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    _evidence_pairs: list[tuple[str, Fact]] = field(default_factory=list, repr=False)
    _evidence: list[Evidence] | None = field(default=None, repr=False)

    @property
    def evidence(self) -> list[Evidence]:
        """The facts the decision rests on (one entry per input and fact)."""
        if self._evidence is None:
            self._evidence = _evidence(self._evidence_pairs)
        return self._evidence

    @evidence.setter
    def evidence(self, entries: list[Evidence]) -> None:
        self._evidence = entries

    @property
    def fires(self) -> bool:
        """True when the rule fired."""
        return self.outcome == "fires"

    @property
    def problem_facts(self) -> list[Fact]:
        """The facts the decision rests on that cannot be judged (unknown unit, implausible value, ...): why an
        indeterminate decision is indeterminate. Each fact once."""
        seen: dict[str, Fact] = {}
        for _, fact in self._evidence_pairs:
            if fact.problem is not None:
                seen.setdefault(f"{fact.key}@{fact.version}", fact)
        return list(seen.values())

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The decision as a dict, with pydantic's ``model_dump`` options (``mode``, ``exclude_none``, ...)."""
        record = _DecisionRecord.model_construct(
            rule_id=self.rule_id,
            rule_version=self.rule_version,
            rule_status=self.rule_status,
            patient=self.patient,
            as_of=self.as_of,
            outcome=self.outcome,
            severity=self.severity,
            resolves=self.resolves,
            escalators=self.escalators,
            next_change=isoformat(self.next_change),
            evidence=self.evidence,
            explanation=self.explanation,
            card=self.card,
            parameters=self.parameters,
        )
        return record.model_dump(**kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self.model_dump() == other.model_dump()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle with the evidence built."""
        return {**self.__dict__, "_evidence": self.evidence, "_evidence_pairs": []}

    __hash__ = None  # type: ignore[assignment]  # mutable, like the pydantic model it replaced


@dataclass
class Selection:
    """The facts an input picked, plus the ones that may belong but could not be decided."""

    name: str
    spec: InputSpec
    facts: list[Fact]
    uncertain: list[Fact] = field(default_factory=list)
    window_start: datetime | None = None
    window_end: datetime | None = None
    same_time_count: int = 1
    next_change: datetime | None = None  # when the choice could change by time alone
    since: Selection | None = None  # the input a `since` window counts from

    @property
    def latest(self) -> Fact | None:
        """The chosen fact of a ``latest`` input (or the newest of the others)."""
        return self.facts[-1] if self.facts else None

    def describe_window(self) -> str:
        """``between <start> and <end>`` text for explanations."""
        if self.since is not None:
            origin = self.since.latest
            if origin is None:
                return f"(no {_label(self.since)} to count from)"
            return f"since {origin.describe()}"
        if self.window_start is None:
            return f"up to {isoformat(self.window_end)}"
        began = "begun (onset, recorded or given) " if self.spec.started_in_window else ""
        return f"{began}between {isoformat(self.window_start)} and {isoformat(self.window_end)}"


@dataclass
class Result:
    """A predicate's truth, why (in words, built only when read), and the facts it looked at."""

    value: Tri
    explain: Callable[[], str]
    evidence: list[tuple[str, Fact]] = field(default_factory=list)

    @property
    def why(self) -> str:
        """The explanation text."""
        return self.explain()


# --- comparisons --------------------------------------------------------------------------------------


def _values(fact: Fact, param: Parameter) -> tuple[Decimal, Decimal]:
    """(fact value, threshold) in one unit: the lab's own unit when the rule gives an equivalent for it."""
    key = unit_key(fact.reported_unit)
    for equivalent in param.equivalents:
        if key is not None and unit_key(equivalent.unit) == key and fact.reported_value is not None:
            return Decimal(fact.reported_value), equivalent.value
    assert fact.value is not None and param.value is not None
    return fact.value, param.value


def compare_below(fact: Fact, param: Parameter) -> Tri:
    """Is the true value below the threshold? Honours comparators (``<0.5`` is below 0.7)."""
    if not fact.determinate or fact.value is None:
        return Tri.UNKNOWN
    value, threshold = _values(fact, param)
    match fact.comparator:
        case None:
            return Tri.of(value < threshold)
        case "<":
            return Tri.TRUE if value <= threshold else Tri.UNKNOWN
        case "<=":
            return Tri.TRUE if value < threshold else Tri.UNKNOWN
        case _:  # > or >=: the true value is at least `value`
            return Tri.FALSE if value >= threshold else Tri.UNKNOWN


def compare_above(fact: Fact, param: Parameter) -> Tri:
    """Is the true value above the threshold? Honours comparators."""
    if not fact.determinate or fact.value is None:
        return Tri.UNKNOWN
    value, threshold = _values(fact, param)
    match fact.comparator:
        case None:
            return Tri.of(value > threshold)
        case ">":
            return Tri.TRUE if value >= threshold else Tri.UNKNOWN
        case ">=":
            return Tri.TRUE if value > threshold else Tri.UNKNOWN
        case _:  # < or <=: the true value is at most `value`
            return Tri.FALSE if value <= threshold else Tri.UNKNOWN


def threshold_for(fact: Fact, param: Parameter) -> Parameter:
    """The threshold a fact is compared with: the lab's own lower reference limit when the parameter says so and
    the result carries one (compared in the result's unit), else the parameter itself."""
    if not param.reference_low or fact.reference_low is None or fact.reference_low_reported is None:
        return param
    return Parameter.model_construct(
        value=fact.reference_low,
        unit=param.unit,
        equivalents=[Equivalent.model_construct(value=fact.reference_low_reported, unit=fact.reported_unit or "")],
        source="the lab's reference range",
        description="lab",
        reference_low=False,
    )


def from_lab(param: Parameter) -> bool:
    """True for a threshold taken from the lab's reference range (see :func:`threshold_for`)."""
    return param.description == "lab" and param.source == "the lab's reference range"


def _threshold_text(param: Parameter) -> str:
    if from_lab(param):
        shown = param.equivalents[0] if param.equivalents else None
        text = f"{format_decimal(shown.value, 4)} {shown.unit}" if shown else f"{format_decimal(param.value, 4)}"
        return text + " (the lab's lower reference limit)"
    return param.threshold_text()


# --- selection ----------------------------------------------------------------------------------------


def _in_window(fact: Fact, start: datetime | None, end: datetime, started: bool = False) -> bool:
    """Is the fact visible in the window [start, end]? Point facts (results, findings, orders) by their time;
    interval facts (medications, conditions) when active at some point in it, and with ``started`` only
    when they began inside it."""
    if fact.kind == "order":  # placed at authoredOn; a draft (no time yet) is being written now
        return fact.start is None or ((start is None or fact.start >= start) and fact.start <= end)
    if fact.kind in _POINT_KINDS:
        return fact.start is not None and (start is None or fact.start >= start) and fact.start <= end
    if started:
        began = fact.start is not None and (start is None or fact.start >= start) and fact.start <= end
    else:
        began = fact.start is None or fact.start <= end
    still = fact.end is None or start is None or fact.end >= start
    return began and still


def _fact_change(fact: Fact, as_of: datetime, sliding: timedelta | None, started: bool) -> datetime | None:
    """The earliest instant after ``as_of`` at which ``fact`` enters or leaves a window ending at the
    evaluation instant T; ``sliding`` is the look-back when the window starts at T - sliding (None: a fixed
    start). A fact dated after ``as_of`` enters at its time; a visible one leaves the first microsecond its
    time (point facts, or the start with ``started``) or its end (interval facts) is before the window."""
    start = fact.start
    if start is not None and start > as_of:
        return start
    if sliding is None:
        return None
    span = sliding + _TICK
    if fact.kind in _TIMED_KINDS:  # a single instant (results, findings, orders): it leaves after its time
        first = _after(start, span) if start is not None else None
    else:  # an interval: it leaves after its end (and with ``started``, after its start)
        leaves = [_after(edge, span) for edge in (fact.end, start if started else None) if edge is not None]
        first = min((t for t in leaves if t is not None), default=None)
    return first if first is not None and first > as_of else None


def _after(edge: datetime, span: timedelta) -> datetime | None:
    """``edge + span``, or None when that is beyond the calendar (an open-ended 9999-12-31 never leaves)."""
    try:
        return edge + span
    except OverflowError:
        return None


_NO_VALUE = Decimal("Infinity")


def _sort_key(fact: Fact) -> tuple[Any, ...]:
    """Chronological; among results at the same instant the most abnormal-low value sorts last, so
    ``latest`` takes it (a haemolysed duplicate cannot mask a low potassium). The order is total (then by
    source resource, concept and version), so it never depends on the order the facts were given in."""
    value = fact.value if fact.value is not None else _NO_VALUE
    return (
        fact.start or _EPOCH,
        int(fact.determinate),
        -value,
        fact.resource_type,
        fact.resource_id,
        fact.concept,
        fact.version or "",
        fact.updated or _EPOCH,
        fact.end or _EPOCH,
        fact.kind,
        fact.status or "",
        fact.reported_unit or "",
    )


class FactPool:
    """One patient's facts that can be evidence (counted, not retracted), sorted once for every input of
    every rule (in ``_sort_key`` order, a total order) and by concept."""

    def __init__(self, facts: Iterable[Fact], patient: str) -> None:
        self.ordered = sorted(
            (f for f in facts if f.patient == patient and f.counts and not f.retracted), key=_sort_key
        )
        self.by_concept: dict[str, list[Fact]] = {}
        for fact in self.ordered:
            self.by_concept.setdefault(fact.concept, []).append(fact)
        self._context: PatientContext | None = None

    def context(self, as_of: datetime) -> PatientContext:
        """The patient's context (age, encounter in progress) as of ``as_of``."""
        if self._context is None or self._context.as_of != as_of:
            facts = [*self.by_concept.get("patient", []), *self.by_concept.get("encounter", [])]
            self._context = PatientContext.of(facts, as_of)
        return self._context

    def of(self, concepts: tuple[str, ...], kinds: frozenset[str] | None = None) -> list[Fact]:
        """The facts of these concepts (and kinds), in order (filtering a sorted list keeps it sorted)."""
        if len(concepts) == 1:
            found = self.by_concept.get(concepts[0], [])
        else:
            found = [f for f in self.ordered if f.concept in concepts]
        return found if kinds is None else [f for f in found if f.kind in kinds]


def _window(
    rule: Rule, spec: InputSpec, as_of: datetime, chosen: dict[str, Selection]
) -> tuple[datetime | None, timedelta | None, bool]:
    """(window start, sliding look-back or None when the start does not move with as_of, usable)."""
    if spec.since:
        origin = chosen[spec.since].latest
        if origin is None or origin.start is None:
            return None, None, False  # nothing happened to count from
        return origin.start, None, True
    if spec.lookback:
        lookback = rule.parameters[spec.lookback].duration
        anchor = chosen[spec.anchor].latest if spec.anchor else None
        if anchor is not None and anchor.start is not None:
            return anchor.start - lookback, None, True
        return as_of - lookback, lookback, True
    if spec.select == "active":  # no lookback: active now
        return as_of, timedelta(0), True
    return None, None, True  # `latest` / `all` read the whole record


def select(rule: Rule, name: str, pool: FactPool, as_of: datetime, chosen: dict[str, Selection]) -> Selection:
    """Pick the facts of one input as of ``as_of`` (and when that choice could next change by time alone)."""
    spec = rule.inputs[name]
    window_start, sliding, usable = _window(rule, spec, as_of, chosen)
    started = spec.started_in_window
    candidates: list[Fact] = []
    next_change: datetime | None = None
    if usable:
        changes: list[datetime] = []
        point_leaves = later = False  # facts come sorted by time: the first of each kind of change is the earliest
        for fact in pool.of(spec.concepts, spec.kinds):
            if _in_window(fact, window_start, as_of, started):
                candidates.append(fact)
            start = fact.start
            if start is not None and start > as_of:
                if not later:
                    changes.append(start)
                    later = True
            elif sliding is None or (point_leaves and fact.kind in _TIMED_KINDS):
                continue  # a fixed window changes only when a later fact arrives
            else:
                change = _fact_change(fact, as_of, sliding, started)
                if change is not None:
                    changes.append(change)
                    point_leaves = point_leaves or fact.kind in _TIMED_KINDS
        next_change = min(changes, default=None)
    selection = Selection(name, spec, candidates, window_start=window_start, window_end=as_of)
    selection.next_change = next_change
    if spec.since:
        selection.since = chosen[spec.since]
    if spec.select == "latest" and candidates:
        newest = candidates[-1]
        selection.same_time_count = sum(1 for f in candidates if f.start == newest.start)
        selection.facts = [newest]
    if spec.where_below:
        param = rule.parameters[spec.where_below]
        verdicts = [(f, compare_below(f, threshold_for(f, param))) for f in selection.facts]
        selection.facts = [f for f, v in verdicts if v is Tri.TRUE]
        selection.uncertain = [f for f, v in verdicts if v is Tri.UNKNOWN]
    return selection


# --- predicates ---------------------------------------------------------------------------------------
# Each predicate decides its truth and evidence now and words its explanation only when it is read.


def _label(selection: Selection) -> str:
    return selection.name.replace("_", " ")


_COMPARE_WORDS = {"below": "below", "at_least": "at or above", "above": "above"}


def _compare(rule: Rule, chosen: dict[str, Selection], compare: Compare, op: str) -> Result:
    selection = chosen[compare.input]
    fact = selection.latest
    param = rule.parameters[compare.threshold]
    if fact is None:
        return Result(Tri.FALSE, lambda: f"no {_label(selection)} result {selection.describe_window()}")
    evidence = [(selection.name, fact)]
    param = threshold_for(fact, param)
    if not fact.determinate:
        return Result(
            Tri.UNKNOWN,
            lambda: f"{fact.describe()} cannot be compared with {_threshold_text(param)}: {fact.problem}",
            evidence,
        )
    if op == "above":
        truth = compare_above(fact, param)
    else:
        below = compare_below(fact, param)
        truth = below if op == "below" else below.negate()

    def why() -> str:
        words, threshold = _COMPARE_WORDS[op], _threshold_text(param)
        if truth is Tri.TRUE:
            text = f"{fact.describe()} is {words} {threshold}"
        elif truth is Tri.FALSE:
            text = f"{fact.describe()} is not {words} {threshold}"
        else:
            text = f"{fact.describe()} may or may not be {words} {threshold} (reported with a comparator)"
        if selection.same_time_count > 1:
            text += f" ({selection.same_time_count} results at that time; the lowest is used)"
        return text

    return Result(truth, why, evidence)


def _presence(chosen: dict[str, Selection], name: str, want_present: bool) -> Result:
    selection = chosen[name]
    if selection.facts:
        return Result(
            Tri.of(want_present),
            lambda: f"{_label(selection)}: " + "; ".join(f.describe() for f in selection.facts[-3:]),
            [(name, f) for f in selection.facts],
        )
    if selection.uncertain:
        return Result(
            Tri.UNKNOWN,
            lambda: f"{_label(selection)}: only results that cannot be judged {selection.describe_window()}",
            [(name, f) for f in selection.uncertain],
        )
    return Result(Tri.of(not want_present), lambda: f"no {_label(selection)} {selection.describe_window()}")


def _spaced_count(facts: Iterable[Fact], gap_seconds: float) -> int:
    count, last = 0, None
    for fact in facts:
        if fact.start is None:
            continue
        if last is None or (fact.start - last).total_seconds() >= gap_seconds:
            count, last = count + 1, fact.start
    return count


def _spaced(rule: Rule, chosen: dict[str, Selection], condition: Condition) -> Result:
    spaced = condition.spaced
    assert spaced is not None
    selection = chosen[spaced.input]
    needed = rule.parameters[spaced.count].count or 0
    gap = rule.parameters[spaced.min_gap].duration
    certain = _spaced_count(selection.facts, gap.total_seconds())
    evidence = [(selection.name, f) for f in selection.facts]

    def gap_hours() -> str:
        return format_decimal(Decimal(str(gap.total_seconds() / 3600)))

    if certain >= needed:
        return Result(
            Tri.TRUE,
            lambda: f"{certain} {_label(selection)} at least {gap_hours()} h apart {selection.describe_window()}",
            evidence,
        )
    if selection.uncertain:
        combined = sorted([*selection.facts, *selection.uncertain], key=_sort_key)
        if _spaced_count(combined, gap.total_seconds()) >= needed:
            return Result(
                Tri.UNKNOWN,
                lambda: (
                    f"{_label(selection)}: some results cannot be judged; {needed} at least {gap_hours()} h "
                    "apart cannot be ruled out"
                ),
                [(selection.name, f) for f in combined],
            )
    return Result(
        Tri.FALSE,
        lambda: (
            f"only {len(selection.facts)} {_label(selection)} {selection.describe_window()}, "
            f"{certain} of them at least {gap_hours()} h apart ({needed} needed)"
        ),
        evidence,
    )


def _combine(results: list[Result], mode: Literal["all", "any"]) -> Result:
    values = [r.value for r in results]
    if mode == "all":
        truth = Tri.FALSE if Tri.FALSE in values else Tri.UNKNOWN if Tri.UNKNOWN in values else Tri.TRUE
    else:
        truth = Tri.TRUE if Tri.TRUE in values else Tri.UNKNOWN if Tri.UNKNOWN in values else Tri.FALSE
    # Explain with the members that decided the outcome.
    deciding = [r for r in results if r.value is truth] or results
    evidence = [e for r in results for e in r.evidence]
    joiner = "; and " if mode == "all" else "; or "
    return Result(truth, lambda: joiner.join(r.why for r in deciding), evidence)


def check(rule: Rule, chosen: dict[str, Selection], condition: Condition) -> Result:
    """Evaluate a condition over the selected inputs."""
    if condition.all is not None:
        return _combine([check(rule, chosen, c) for c in condition.all], "all")
    if condition.any is not None:
        return _combine([check(rule, chosen, c) for c in condition.any], "any")
    if condition.not_ is not None:
        inner = check(rule, chosen, condition.not_)
        return Result(inner.value.negate(), lambda: f"not ({inner.why})", inner.evidence)
    if condition.possibly is not None:
        inner = check(rule, chosen, condition.possibly)
        truth = Tri.FALSE if inner.value is Tri.FALSE else Tri.TRUE
        return Result(truth, lambda: f"possibly ({inner.why})", inner.evidence)
    if condition.present is not None:
        return _presence(chosen, condition.present, want_present=True)
    if condition.absent is not None:
        return _presence(chosen, condition.absent, want_present=False)
    if condition.spaced is not None:
        return _spaced(rule, chosen, condition)
    for op in ("below", "at_least", "above"):
        compare = getattr(condition, op)
        if compare is not None:
            return _compare(rule, chosen, compare, op)
    raise AssertionError("unreachable: Condition validates that one member is set")


# --- decisions ----------------------------------------------------------------------------------------


def _severity(rule: Rule, chosen: dict[str, Selection]) -> tuple[str, Result | None]:
    """The first tier that applies, and the condition result when it applies only because it cannot be
    ruled out (unknown)."""
    for tier in rule.severity:
        if tier.when is None:
            return tier.level, None
        result = check(rule, chosen, tier.when)
        if result.value is Tri.TRUE:
            return tier.level, None
        if result.value is Tri.UNKNOWN:
            return tier.level, result
    raise AssertionError("unreachable: the last tier has no condition")


def _holds(rule: Rule, chosen: dict[str, Selection], condition: Condition) -> bool:
    """True when the condition is certainly true (unknown does not escalate or offer a suggestion)."""
    return check(rule, chosen, condition).value is Tri.TRUE


def _evidence(pairs: Iterable[tuple[str, Fact]]) -> list[Evidence]:
    seen: set[tuple[str, str]] = set()
    out: list[Evidence] = []
    for name, fact in pairs:
        if (name, fact.key) not in seen:
            seen.add((name, fact.key))
            out.append(Evidence.of(name, fact))
    return out


_OUTCOMES: dict[Tri, Outcome] = {Tri.TRUE: "fires", Tri.FALSE: "not-fires", Tri.UNKNOWN: "indeterminate"}
_PREFIXES: dict[Outcome, str] = {"fires": "Fires: ", "not-fires": "Does not fire: ", "indeterminate": "Indeterminate: "}


def _explanation(
    outcome: Outcome, result: Result, severity: tuple[str, Result | None] | None, resolved: Result | None
) -> str:
    """The decision's explanation: the outcome, why, and the severity or resolve condition's reason."""
    text = _PREFIXES[outcome] + result.why
    if severity is not None and severity[1] is not None:
        text += f". Severity {severity[0]} because it cannot be ruled out: {severity[1].why}"
    if outcome == "not-fires" and resolved is not None:
        met = resolved.value is Tri.TRUE
        text += (". Resolve condition met: " if met else ". Resolve condition not met: ") + resolved.why
    return text


def evaluate_rule(rule: Rule, facts: Sequence[Fact], as_of: datetime, patient: str) -> Decision:
    """Evaluate one rule for one patient's facts as of ``as_of``."""
    return _evaluate_rule(rule, FactPool(facts, patient), as_of, patient)


class _Chosen(dict[str, Selection]):
    """The inputs of one evaluation, each selected when a condition (or another input's window) first reads it:
    a rule that does not fire never selects the inputs only its card reads."""

    def __init__(self, rule: Rule, pool: FactPool, as_of: datetime) -> None:
        super().__init__()
        self.rule, self.pool, self.as_of = rule, pool, as_of

    def __missing__(self, name: str) -> Selection:
        selection = self[name] = select(self.rule, name, self.pool, self.as_of, self)
        return selection

    def select_all(self) -> None:
        """Select every input (in declaration order)."""
        for name in self.rule.inputs:
            self[name]


def _context_change(rule: Rule, context: PatientContext) -> datetime | None:
    """When the rule's applicability could next change by time alone (an encounter begins or ends, the patient
    comes of age or dies)."""
    app = rule.applicability
    return context.next_change(app.min_age_years, encounters=app.encounter_classes is not None)


def _evaluate_rule(rule: Rule, pool: FactPool, as_of: datetime, patient: str) -> Decision:
    context = pool.context(as_of)
    verdict = applicability(rule.applicability, context)
    context_change = _context_change(rule, context)
    decision = Decision(
        rule_id=rule.id,
        rule_version=rule.version,
        rule_status=rule.status,
        patient=patient,
        as_of=isoformat(as_of) or "",
        outcome="not-fires",
        next_change=context_change,
        parameters=rule.parameter_record(),
    )
    if not verdict.applies:
        decision.explanation = "Does not apply: " + verdict.why_not
        return decision
    chosen = _Chosen(rule, pool, as_of)
    result = check(rule, chosen, rule.when)
    outcome = _OUTCOMES[result.value]
    decision.outcome = outcome
    decision._evidence_pairs = result.evidence
    severity = resolved = None
    if outcome == "fires":
        chosen.select_all()  # the card, severity and suggestions may read every input
        severity = _severity(rule, chosen)
        decision.severity = severity[0]
        decision.escalators = [{"id": e.id, "label": e.label} for e in rule.escalation if _holds(rule, chosen, e.when)]
        offered = [s.id for s in rule.card.suggestions if s.when is None or _holds(rule, chosen, s.when)]
        decision.card = render_card(rule, decision, chosen, offered)
    else:
        resolved = check(rule, chosen, rule.resolve_when)
        decision.resolves = resolved.value is Tri.TRUE
    # Only the inputs the decision read can change it by time alone (an input not read, e.g. the renal function
    # a card shows, is selected when the rule fires).
    changes = [c.next_change for c in chosen.values() if c.next_change is not None]
    decision.next_change = min([*changes, *([context_change] if context_change else [])], default=None)
    decision.explanation = _explanation(outcome, result, severity, resolved)
    if verdict.unknown:
        decision.explanation += f". Applied although {verdict.unknown} (the rule's policy for an unknown context)"
    return decision


def evaluate(
    rules: Iterable[Rule], facts: Sequence[Fact], as_of: datetime, patient: str | None = None
) -> list[Decision]:
    """Evaluate every rule for every patient in ``facts`` (or only ``patient``) as of ``as_of``.

    ``as_of`` must be timezone-aware; facts after it are invisible, so a replay at event time gives the
    decisions the live stream gave.
    """
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware")
    patients = [patient] if patient is not None else sorted({f.patient for f in facts})
    rule_list = list(rules)
    decisions = []
    for p in patients:
        pool = FactPool(facts, p)
        decisions.extend(_evaluate_rule(rule, pool, as_of, p) for rule in rule_list)
    return decisions
