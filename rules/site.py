"""Site profiles: a hospital's overrides of the shipped rules, without editing them.

A site profile is one YAML file (named by ``EHR_ALERTS_SITE_PROFILE``) that changes, per rule, its status
(``shadow`` -> ``active`` promotes a rule), parameters (thresholds, windows, counts, whether the lab's own
reference range replaces a threshold) and applicability (age, encounter classes, the unknown-context policy)::

    name: general-hospital-2025-03
    description: P&T committee decision of 12 March 2025
    rules:
      hypokalemia-without-magnesium:
        parameters:
          k_low: {value: 3.3, source: "P&T 2025-03: K 3.3-3.4 outpatient noise"}
        applicability: {unknown_encounter: skip}
      severe-hypomagnesemia-untreated:
        status: active

It is validated against the loaded catalog: an unknown rule, parameter or key is refused, and so is a value that
does not fit the parameter (a window given to a threshold, a unit other than the rule's, a Mg threshold whose
mg/dL and mEq/L equivalents no longer match), each error naming the rule, the key and why. The merged rule is
validated like a rule file (its embedded tests are the shipped rule's and are not re-run: they pin the shipped
defaults). Every decision then records the parameter values it used and the card's source names the profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rules.model import Equivalent, Rule


class SiteProfileError(ValueError):
    """A site profile that cannot be applied; ``problems`` lists ``file: rules.<rule>.<key>: why`` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("site profile refused:\n  " + "\n  ".join(problems))
        self.problems = list(problems)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParameterOverride(_Strict):
    """New values for one parameter (only what changes)."""

    value: Decimal | None = None
    unit: str | None = None
    equivalents: list[Equivalent] | None = None
    hours: float | None = Field(default=None, gt=0)
    count: int | None = Field(default=None, ge=1)
    reference_low: bool | None = None
    source: str | None = Field(default=None, description="why the site changed it (a committee decision, ...)")


class ApplicabilityOverride(_Strict):
    """New applicability values (only what changes); see :class:`rules.model.Applicability`."""

    min_age_years: int | None = Field(default=None, ge=0, le=130)
    encounter_classes: list[str] | None = None
    any_encounter_class: bool | None = Field(default=None, description="true: apply in any setting (drops classes)")
    unknown_age: Literal["apply", "skip"] | None = None
    unknown_encounter: Literal["apply", "skip"] | None = None
    encounter_lookback_hours: float | None = Field(default=None, gt=0)
    source: str | None = None


class RuleOverride(_Strict):
    """A site's changes to one rule."""

    status: Literal["draft", "shadow", "active", "retired"] | None = None
    parameters: dict[str, ParameterOverride] = Field(default_factory=dict)
    applicability: ApplicabilityOverride | None = None


class SiteProfile(_Strict):
    """A site profile file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$", description="shown on cards and by config")
    description: str | None = None
    rules: dict[str, RuleOverride] = Field(default_factory=dict)

    def summary(self) -> list[tuple[str, str, str]]:
        """(rule, key, new value) for every override, for ``ehr-alerts config`` and ``rules check --site``."""
        rows = []
        for rule_id, override in sorted(self.rules.items()):
            if override.status:
                rows.append((rule_id, "status", override.status))
            for name, change in sorted(override.parameters.items()):
                rows.append((rule_id, f"parameters.{name}", _shown(change.model_dump(exclude_none=True))))
            if override.applicability:
                for key, value in override.applicability.model_dump(exclude_none=True).items():
                    rows.append((rule_id, f"applicability.{key}", _shown(value)))
        return rows


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shown(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def _where(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return str(error["msg"]).removeprefix("Value error, ")


def read_site_profile(path: Path) -> SiteProfile:
    """Parse a site profile file (structure only; :func:`apply_site_profile` checks it against the rules)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SiteProfileError([f"{path.name}: cannot read YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise SiteProfileError([f"{path.name}: the file must hold a mapping with name and rules"])
    try:
        return SiteProfile.model_validate(data)
    except ValidationError as exc:
        raise SiteProfileError([f"{path.name}: {_where(e['loc'])}: {_message(e)}" for e in exc.errors()]) from exc


def _parameter_problems(rule: Rule, name: str, change: ParameterOverride) -> list[str]:
    """Why an override does not fit the parameter (empty when it does)."""
    base = rule.parameters.get(name)
    if base is None:
        return [f"unknown parameter (declared: {', '.join(sorted(rule.parameters))})"]
    given = {k for k, v in change.model_dump(exclude_none=True).items() if k != "source"}
    allowed = {
        "threshold": {"value", "unit", "equivalents", "reference_low"},
        "hours": {"hours"},
        "count": {"count"},
    }[base.kind]
    wrong = sorted(given - allowed)
    if wrong:
        what = {"threshold": f"a threshold in {base.unit}", "hours": "a window in hours", "count": "a count"}
        return [f"{', '.join(wrong)} does not apply: {name} is {what[base.kind]} (give {', '.join(sorted(allowed))})"]
    problems = []
    if change.unit is not None and change.unit != base.unit:
        problems.append(f"unit {change.unit!r} is not the rule's unit {base.unit!r} (thresholds are in {base.unit})")
    if change.value is not None and base.equivalents and change.equivalents is None:
        units = ", ".join(e.unit for e in base.equivalents)
        problems.append(
            f"value changed but its equivalents ({units}) were not: give `equivalents` matching the new value "
            "(or `equivalents: []` to compare after unit conversion)"
        )
    return problems


def _merged(rule: Rule, override: RuleOverride, site: str) -> dict[str, Any]:
    data = rule.model_dump(by_alias=True, exclude_none=True)
    if override.status:
        data["status"] = override.status
    for name, change in override.parameters.items():
        values = change.model_dump(exclude_none=True)
        why = values.pop("source", None)
        data["parameters"][name].update(values)
        base_source = data["parameters"][name]["source"]
        data["parameters"][name]["source"] = f"site profile {site}: {why or 'no reason given'} (was: {base_source})"
    if override.applicability:
        app = data.get("applicability") or {}
        changes = override.applicability.model_dump(exclude_none=True)
        if changes.pop("any_encounter_class", False):
            app.pop("encounter_classes", None)
        why = changes.pop("source", None)
        app.update(changes)
        app["source"] = f"site profile {site}: {why or 'no reason given'} (was: {app.get('source', 'default')})"
        data["applicability"] = app
    return data


def apply_site_profile(rules: Sequence[Rule], profile: SiteProfile, file: str = "site profile") -> list[Rule]:
    """The rules with the profile's overrides applied; raise :class:`SiteProfileError` naming every problem."""
    by_id = {rule.id: rule for rule in rules}
    problems = [
        f"{file}: rules.{rule_id}: unknown rule (loaded: {', '.join(sorted(by_id))})"
        for rule_id in profile.rules
        if rule_id not in by_id
    ]
    out = []
    for rule in rules:
        override = profile.rules.get(rule.id)
        if override is None:
            out.append(rule)
            continue
        found = [
            f"{file}: rules.{rule.id}.parameters.{name}: {why}"
            for name, change in override.parameters.items()
            for why in _parameter_problems(rule, name, change)
        ]
        if override.applicability and override.applicability.any_encounter_class is False:
            found.append(f"{file}: rules.{rule.id}.applicability.any_encounter_class: only `true` is meaningful")
        if found:
            problems.extend(found)
            continue
        try:
            out.append(Rule.model_validate(_merged(rule, override, profile.name)))
        except ValidationError as exc:
            problems.extend(
                f"{file}: rules.{rule.id}{'.' + _where(e['loc']) if e['loc'] else ''}: {_message(e)}"
                for e in exc.errors()
            )
    if problems:
        raise SiteProfileError(problems)
    return out
