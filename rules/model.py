"""The rule file format: pydantic models for the YAML rule files in ``rules/catalog/``.

``ehr-alerts rules schema`` writes the JSON Schema generated from :class:`Rule` so editors can validate
rule files as they are typed. Cross-references (inputs, parameters, units) are checked here too, so a
rule that loads is a rule the engine can run.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from rules.datafiles import load_valueset
from rules.facts import FactKind, format_decimal
from rules.units import analyte_units, quantitative_concepts, unit_key

#: How far a threshold's equivalent (as labs write it) may be from its value after conversion: labs round
#: (0.70 mmol/L is written 1.7 mg/dL = 0.699 mmol/L; 0.5 mmol/L is 1.2 mg/dL = 0.494 mmol/L).
EQUIVALENT_TOLERANCE = Decimal("0.02")
SEMVER = r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$"
SLUG = r"^[a-z][a-z0-9-]{1,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Citation(_Strict):
    """A source the rule rests on."""

    text: str = Field(min_length=5)
    url: str = Field(pattern=r"^https?://")


class Equivalent(_Strict):
    """The same threshold as labs write it in another unit (compared in that unit, no conversion)."""

    value: Decimal
    unit: str


class Parameter(_Strict):
    """A tunable number: a threshold with a unit, or a time window in hours."""

    value: Decimal | None = None
    unit: str | None = None
    equivalents: list[Equivalent] = Field(default_factory=list)
    hours: float | None = Field(default=None, gt=0)
    count: int | None = Field(default=None, ge=1)
    reference_low: bool = Field(
        default=False,
        description="threshold only: compare with the lab's own lower reference limit (the result's "
        "referenceRange.low) when the result carries one, else with `value`",
    )
    description: str | None = None
    source: str = Field(min_length=3, description="Where the number comes from (citation or rationale).")

    @model_validator(mode="after")
    def _one_kind(self) -> Parameter:
        kinds = [self.value is not None, self.hours is not None, self.count is not None]
        if sum(kinds) != 1:
            raise ValueError("a parameter is exactly one of: a threshold (value + unit), hours, or count")
        if self.value is not None and not self.unit:
            raise ValueError("a threshold needs a unit")
        if self.reference_low and self.value is None:
            raise ValueError("reference_low applies to a threshold (value + unit) only")
        return self

    @property
    def kind(self) -> Literal["threshold", "hours", "count"]:
        """What the parameter is."""
        return "threshold" if self.value is not None else "hours" if self.hours is not None else "count"

    def threshold_text(self) -> str:
        """A threshold with its equivalents: ``3.5 mmol/L (1.7 mg/dL)``."""
        shown = f"{format_decimal(self.value, 4)} {self.unit}"
        if self.equivalents:
            shown += " (" + ", ".join(f"{format_decimal(e.value, 4)} {e.unit}" for e in self.equivalents) + ")"
        return shown

    def text(self) -> str:
        """The value as a decision records it: ``3.5 mmol/L (1.7 mg/dL)``, ``72 h``, ``2``."""
        if self.value is not None:
            lab = "; the lab's lower reference limit when given" if self.reference_low else ""
            return self.threshold_text() + lab
        if self.hours is not None:
            return f"{format_decimal(Decimal(str(self.hours)))} h"
        return str(self.count)

    @property
    def duration(self) -> timedelta:
        """The window length (for an ``hours`` parameter)."""
        if self.hours is None:
            raise ValueError("not a duration parameter")
        return timedelta(hours=self.hours)


ConceptName = str


class InputSpec(_Strict):
    """Which facts a rule reads and how it picks among them."""

    concept: ConceptName | list[ConceptName]
    select: Literal["latest", "all", "active"] = Field(
        description="latest: the most recent result in the window; all: every result in the window; "
        "active: medications / conditions active at some point in the window"
    )
    lookback: str | None = Field(
        default=None,
        description="hours parameter: window = [anchor - lookback, as_of]; without it `active` means active at "
        "as_of and `latest` / `all` read the whole record",
    )
    anchor: str | None = Field(default=None, description="an earlier input whose time the window counts back from")
    since: str | None = Field(
        default=None,
        description="an earlier input: the window runs from that input's chosen fact up to as_of (instead of a "
        "look-back); empty when that input chose nothing",
    )
    kind: FactKind | list[FactKind] | None = Field(
        default=None, description="keep only facts of this kind (e.g. finding: ECG; condition: a diagnosis)"
    )
    started_in_window: bool = Field(
        default=False,
        description="interval facts (medications, conditions) count only when they started inside the window "
        "(onset / recorded / first given); needs a lookback or since",
    )
    where_below: str | None = Field(
        default=None, description="threshold parameter: keep only results below it (select: all)"
    )

    @property
    def concepts(self) -> tuple[str, ...]:
        """The concepts as a tuple."""
        return (self.concept,) if isinstance(self.concept, str) else tuple(self.concept)

    @property
    def kinds(self) -> frozenset[str] | None:
        """The fact kinds kept (None: every kind)."""
        if self.kind is None:
            return None
        return frozenset([self.kind] if isinstance(self.kind, str) else self.kind)


class Compare(_Strict):
    """Compare an input's (latest) value with a threshold parameter."""

    input: str
    threshold: str


class Spaced(_Strict):
    """At least ``count`` results of an input, each at least ``min_gap`` after the previous one."""

    input: str
    count: str = Field(description="count parameter")
    min_gap: str = Field(description="hours parameter")


class Condition(_Strict):
    """One predicate or combinator; exactly one member is set. Evaluated in three-valued logic."""

    all: list[Condition] | None = None
    any: list[Condition] | None = None
    not_: Condition | None = Field(default=None, alias="not")
    present: str | None = None
    absent: str | None = None
    below: Compare | None = None
    at_least: Compare | None = None
    above: Compare | None = None
    spaced: Spaced | None = None
    possibly: Condition | None = Field(
        default=None,
        description="true unless the inner condition is certainly false (it holds or cannot be ruled out): "
        "e.g. offer the cautious suggestion when renal impairment cannot be ruled out",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Condition:
        set_members = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(set_members) != 1:
            raise ValueError(
                f"a condition has exactly one of all/any/not/possibly/present/absent/below/at_least/above/"
                f"spaced; got {set_members or 'none'}"
            )
        return self

    def walk(self) -> list[Condition]:
        """This condition and every nested one."""
        found = [self]
        nested = [*(self.all or []), *(self.any or []), *([self.not_] if self.not_ else [])]
        nested += [self.possibly] if self.possibly else []
        for child in nested:
            found.extend(child.walk())
        return found


class Escalator(_Strict):
    """Named escalating evidence: when the rule fires and ``when`` holds, the decision lists it in
    ``escalators`` (an alert whose escalators gain an id is re-opened by the store, like a higher severity)."""

    id: str = Field(pattern=SLUG, description="stable id, compared between decisions")
    label: str = Field(min_length=3, description="what escalated, in clinical words (shown in the alert history)")
    when: Condition


class SeverityTier(_Strict):
    """A card indicator and when it applies; tiers are tried in order, a tier without ``when`` always applies."""

    level: Literal["info", "warning", "critical"]
    when: Condition | None = None


class CodingSpec(_Strict):
    """A FHIR Coding as written in a rule file."""

    system: str
    code: str
    display: str


class SourceSpec(_Strict):
    """The card's source: who says so, and where to read more."""

    label: str
    url: str = Field(pattern=r"^https?://")
    topic: CodingSpec | None = None


class ActionSpec(_Strict):
    """A suggestion action; ``resource`` is a FHIR R4 resource template (strings may use Jinja2)."""

    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None


class SuggestionSpec(_Strict):
    """A suggestion: a label and the actions that carry it out."""

    id: str = Field(pattern=SLUG, description="stable id, used to derive the suggestion uuid")
    label: str
    is_recommended: bool = False
    when: Condition | None = Field(default=None, description="offered only when this holds (default: always)")
    actions: list[ActionSpec] = Field(min_length=1)


class LinkSpec(_Strict):
    """A link shown on the card."""

    label: str
    url: str = Field(pattern=r"^https?://")
    type: Literal["absolute", "smart"] = "absolute"


class CardSpec(_Strict):
    """The card template (Jinja2 in summary, detail, labels and resource strings)."""

    summary: str = Field(min_length=5)
    detail: str = Field(min_length=5)
    source: SourceSpec
    suggestions: list[SuggestionSpec] = Field(default_factory=list)
    selection_behavior: Literal["at-most-one", "any"] | None = None
    links: list[LinkSpec] = Field(default_factory=list)
    override_reasons: list[CodingSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _selection(self) -> CardSpec:
        if self.suggestions and self.selection_behavior is None:
            raise ValueError("selection_behavior is required when there are suggestions (CDS Hooks 2.0)")
        return self


class Expectation(_Strict):
    """What an embedded test expects."""

    outcome: Literal["fires", "not-fires", "indeterminate"]
    severity: Literal["info", "warning", "critical"] | None = None
    resolves: bool | None = None
    summary_contains: list[str] = Field(default_factory=list)
    detail_contains: list[str] = Field(default_factory=list)
    detail_excludes: list[str] = Field(default_factory=list, description="text the card detail must not contain")
    escalators: list[str] | None = Field(default=None, description="ids of the escalators that hold, in order")
    suggestions: list[str] | None = Field(default=None, description="ids of the suggestions offered, in order")


class RuleTest(_Strict):
    """An embedded test case with a pinned "now" and its facts (shorthand or FHIR resources)."""

    name: str
    now: datetime
    patient: str = "test-patient"
    facts: list[dict[str, Any]] = Field(default_factory=list)
    expect: Expectation

    @field_validator("now")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("now must carry a time zone (e.g. 2024-05-01T12:00:00Z)")
        return value


@cache
def encounter_class_codes() -> dict[str, str]:
    """HL7 v3 ActCode encounter classes a rule may name (rules/valuesets/context.yaml)."""
    return dict(load_valueset("context")["encounter_classes"]["codes"])


class Applicability(_Strict):
    """Where a rule applies, decided by the engine from the patient's context facts at the evaluation instant.

    A rule that does not apply does not fire (``not-fires``, with the reason), so an open alert of it closes."""

    min_age_years: int | None = Field(
        default=18, ge=0, le=130, description="youngest age (whole years at the evaluation instant); null: any age"
    )
    encounter_classes: list[str] | None = Field(
        default=None,
        description="HL7 v3 ActCode classes of the encounter in progress (IMP, EMER, ...); null: any setting, "
        "including no encounter",
    )
    unknown_age: Literal["apply", "skip"] = Field(
        default="apply", description="no Patient birth date for the patient: apply the rule anyway, or skip it"
    )
    unknown_encounter: Literal["apply", "skip"] = Field(
        default="apply",
        description="no Encounter of the patient in the last encounter_lookback_hours (the feed sends none): "
        "apply the rule anyway, or skip it",
    )
    encounter_lookback_hours: float = Field(
        default=8760,
        gt=0,
        description="an Encounter that ended longer ago than this does not tell where the patient is now; with "
        "none in this window the encounter is unknown",
    )
    source: str = Field(
        default="DESIGN.md §2: adults only (>= 18 y) until paediatric ranges exist",
        min_length=3,
        description="why the rule applies there",
    )

    @field_validator("encounter_classes")
    @classmethod
    def _known_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        known = encounter_class_codes()
        unknown = [code for code in value if code not in known]
        if unknown:
            raise ValueError(f"{unknown} not HL7 v3 ActCode encounter classes ({', '.join(known)})")
        if not value:
            raise ValueError("an empty list would never apply; omit it (or null) for any setting")
        return value

    def text(self) -> str:
        """The applicability as a decision records it."""
        age = f"from {self.min_age_years} y" if self.min_age_years else "any age"
        where = ", ".join(self.encounter_classes) if self.encounter_classes else "any setting"
        return f"{age}; {where}; unknown age: {self.unknown_age}; unknown encounter: {self.unknown_encounter}"


class Rule(_Strict):
    """A declarative clinical rule."""

    id: str = Field(pattern=SLUG)
    version: str = Field(pattern=SEMVER)
    status: Literal["draft", "shadow", "active", "retired"]
    title: str = Field(min_length=5)
    description: str = Field(min_length=10)
    citations: list[Citation] = Field(min_length=1)
    parameters: dict[str, Parameter]
    inputs: dict[str, InputSpec] = Field(min_length=1)
    when: Condition
    severity: list[SeverityTier] = Field(min_length=1)
    resolve_when: Condition
    escalation: list[Escalator] = Field(
        default_factory=list, description="escalating evidence beyond a higher severity (torsades, K < 3.0, ...)"
    )
    applicability: Applicability = Field(
        default_factory=Applicability, description="where the rule applies: age, encounter classes, unknown context"
    )
    card: CardSpec
    tests: list[RuleTest] = Field(min_length=1)

    _site_profile: str | None = PrivateAttr(default=None)
    _display_zone: str = PrivateAttr(default="UTC")
    _record: dict[str, str] | None = PrivateAttr(default=None)

    @property
    def site_profile(self) -> str | None:
        """The site profile whose overrides this rule carries (None: the rule file as shipped)."""
        return self._site_profile

    @property
    def display_zone(self) -> str:
        """The IANA time zone card text shows times in (configuration, passed in when the catalog is set up)."""
        return self._display_zone

    def configured(self, *, site_profile: str | None, display_zone: str) -> Rule:
        """This rule as a deployment runs it (a copy): the site profile it carries and the card time zone."""
        copy = self.model_copy()
        copy._site_profile, copy._display_zone, copy._record = site_profile, display_zone, None
        return copy

    def parameter_record(self) -> dict[str, str]:
        """The parameter values a decision of this rule used (and its applicability and site profile)."""
        if self._record is None:
            record = {name: param.text() for name, param in self.parameters.items()}
            record["applicability"] = self.applicability.text()
            record["site_profile"] = self._site_profile or "none"
            self._record = record
        return self._record

    @model_validator(mode="after")
    def _references(self) -> Rule:
        _check_inputs(self)
        roots = [("when", self.when), ("resolve_when", self.resolve_when)]
        roots += [(f"severity[{i}].when", t.when) for i, t in enumerate(self.severity) if t.when]
        roots += [(f"escalation[{i}].when", e.when) for i, e in enumerate(self.escalation)]
        roots += [(f"card.suggestions[{i}].when", s.when) for i, s in enumerate(self.card.suggestions) if s.when]
        for where, root in roots:
            for condition in root.walk():
                try:
                    _check_condition(self, condition)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from exc
        if self.severity[-1].when is not None:
            raise ValueError("severity: the last tier must have no `when` (the default)")
        ids = [e.id for e in self.escalation]
        if len(ids) != len(set(ids)):
            raise ValueError(f"escalation: ids must be unique (got {ids})")
        return self


def _param(rule: Rule, name: str, kind: Literal["threshold", "hours", "count"], where: str) -> Parameter:
    param = rule.parameters.get(name)
    if param is None:
        raise ValueError(f"{where}: unknown parameter {name!r} (declared: {sorted(rule.parameters)})")
    actual = "threshold" if param.value is not None else "hours" if param.hours is not None else "count"
    if actual != kind:
        raise ValueError(f"{where}: parameter {name!r} is a {actual}, a {kind} is needed")
    return param


def _check_threshold_unit(rule: Rule, spec: InputSpec, param_name: str, where: str) -> None:
    param = _param(rule, param_name, "threshold", where)
    for concept in spec.concepts:
        if concept not in quantitative_concepts():
            raise ValueError(f"{where}: concept {concept!r} has no value to compare")
        table = analyte_units(concept)
        for unit in [param.unit, *(e.unit for e in param.equivalents)]:
            if table.factor(unit) is None:
                raise ValueError(
                    f"{where}: unit {unit!r} of parameter {param_name!r} is not a {concept} unit "
                    f"({sorted(table.factors)})"
                )
        if unit_key(param.unit) != unit_key(table.canonical):
            raise ValueError(f"{where}: parameter {param_name!r} must be in the canonical unit {table.canonical}")
        for equivalent in param.equivalents:
            converted = equivalent.value * (table.factor(equivalent.unit) or Decimal(0))
            assert param.value is not None
            if param.value and abs(converted - param.value) > EQUIVALENT_TOLERANCE * abs(param.value):
                raise ValueError(
                    f"{where}: equivalent {format_decimal(equivalent.value, 4)} {equivalent.unit} of parameter "
                    f"{param_name!r} is {format_decimal(converted, 4)} {table.canonical}, not "
                    f"{format_decimal(param.value, 4)} {table.canonical} (give equivalents that match the value)"
                )


def _check_inputs(rule: Rule) -> None:
    seen: list[str] = []
    for name, spec in rule.inputs.items():
        where = f"inputs.{name}"
        if spec.lookback:
            _param(rule, spec.lookback, "hours", f"{where}.lookback")
        for link in ("anchor", "since"):
            target = getattr(spec, link)
            if target and target not in seen:
                raise ValueError(f"{where}.{link}: {target!r} must be an input declared before {name!r}")
        if spec.since and (spec.lookback or spec.anchor):
            raise ValueError(f"{where}: since replaces lookback / anchor; give one or the other")
        if spec.started_in_window and not (spec.lookback or spec.since):
            raise ValueError(f"{where}.started_in_window needs a window (lookback or since)")
        if spec.where_below:
            if spec.select != "all":
                raise ValueError(f"{where}.where_below only applies to select: all")
            _check_threshold_unit(rule, spec, spec.where_below, f"{where}.where_below")
        seen.append(name)


def _check_condition(rule: Rule, condition: Condition) -> None:
    def need_input(name: str, where: str) -> InputSpec:
        if name not in rule.inputs:
            raise ValueError(f"{where}: unknown input {name!r} (declared: {sorted(rule.inputs)})")
        return rule.inputs[name]

    for name in (condition.present, condition.absent):
        if name:
            need_input(name, "condition present/absent")
    for op in ("below", "at_least", "above"):
        compare: Compare | None = getattr(condition, op)
        if compare:
            spec = need_input(compare.input, op)
            if spec.select != "latest":
                raise ValueError(f"{op}: input {compare.input!r} must use select: latest")
            _check_threshold_unit(rule, spec, compare.threshold, op)
    if condition.spaced:
        need_input(condition.spaced.input, "spaced")
        _param(rule, condition.spaced.count, "count", "spaced.count")
        _param(rule, condition.spaced.min_gap, "hours", "spaced.min_gap")


Condition.model_rebuild()
SuggestionSpec.model_rebuild()


def rule_json_schema() -> dict[str, Any]:
    """JSON Schema for rule files, generated from :class:`Rule`."""
    schema = Rule.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/ehr-alerts/ehr-alerts/rules/rule.schema.json"
    return schema
