"""Loading the rule catalog: parse, validate and self-test every rule file.

A rule whose file is invalid, or whose embedded tests fail, is refused with the file, the field or test,
and the reason. Nothing half-loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from rules.datafiles import CATALOG_DIR
from rules.engine import Decision, evaluate_rule
from rules.facts import Fact
from rules.model import Rule
from rules.normalize import normalize_resource
from rules.shorthand import expand
from rules.site import SiteProfile, apply_site_profile


class RuleLoadError(Exception):
    """A rule file could not be loaded; ``problems`` lists ``file: where: why`` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("rule catalog refused:\n  " + "\n  ".join(problems))
        self.problems = list(problems)


@dataclass
class TestReport:
    """Outcome of one embedded test."""

    rule_id: str
    name: str
    passed: bool
    message: str = ""


@dataclass
class Catalog:
    """The loaded, self-tested rules."""

    rules: list[Rule]
    files: dict[str, Path] = field(default_factory=dict)
    test_reports: list[TestReport] = field(default_factory=list)
    site: SiteProfile | None = None  # the site profile applied (None: the rule files as shipped)
    display_zone: str = "UTC"  # the IANA zone card text shows times in

    def configure(self, *, site: SiteProfile | None = None, display_zone: str = "UTC", file: str = "") -> Catalog:
        """The catalog as a deployment runs it: the site profile's overrides applied (validated against these
        rules; :class:`rules.site.SiteProfileError` names every problem) and card times in ``display_zone``."""
        rules = apply_site_profile(self.rules, site, file or "site profile") if site else list(self.rules)
        name = site.name if site else None
        configured = [rule.configured(site_profile=name, display_zone=display_zone) for rule in rules]
        return Catalog(configured, dict(self.files), list(self.test_reports), site, display_zone)

    def evaluated(self) -> list[Rule]:
        """Rules the engine runs: active and shadow (shadow decisions are recorded, never shown)."""
        return [r for r in self.rules if r.status in ("active", "shadow")]

    def get(self, rule_id: str) -> Rule | None:
        """The rule with this id, if loaded."""
        return next((r for r in self.rules if r.id == rule_id), None)


def _location(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error["loc"]) or "(top level)"


def parse_rule_file(path: Path) -> Rule:
    """Parse and validate one YAML rule file; raise RuleLoadError naming the field on failure."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RuleLoadError([f"{path.name}: cannot read YAML: {exc}"]) from exc
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        problems = [f"{path.name}: {_location(e)}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise RuleLoadError(problems) from exc


def test_facts(rule: Rule, index: int) -> tuple[list[Fact], list[str]]:
    """Facts of embedded test ``index`` (through the real normaliser) and any normalisation problems."""
    case = rule.tests[index]
    facts: list[Fact] = []
    problems: list[str] = []
    for i, item in enumerate(case.facts):
        try:
            resource = expand(item, case.patient, i)
        except (KeyError, ValueError) as exc:
            problems.append(f"fact #{i}: {exc}")
            continue
        result = normalize_resource(resource)
        if result.outcome == "rejected":
            problems.append(f"fact #{i}: {result.reason}")
        facts.extend(result.facts)
    return facts, problems


def _check_card(decision: Decision) -> list[str]:
    problems = []
    for suggestion in (decision.card or {}).get("suggestions", []):
        for action in suggestion["actions"]:
            resource = action.get("resource")
            if resource is None:
                continue
            try:
                get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            except (ValidationError, KeyError, TypeError, ValueError) as exc:
                problems.append(f"suggestion {suggestion['id']}: resource is not valid FHIR R4: {exc}")
    return problems


def run_embedded_test(rule: Rule, index: int) -> TestReport:
    """Run one embedded test case of a rule."""
    case = rule.tests[index]
    facts, problems = test_facts(rule, index)
    if problems:
        return TestReport(rule.id, case.name, False, "; ".join(problems))
    try:
        decision = evaluate_rule(rule, facts, case.now, case.patient)
    except Exception as exc:  # a template or engine error is exactly what this test must surface
        return TestReport(rule.id, case.name, False, f"evaluation raised {type(exc).__name__}: {exc}")
    expect = case.expect
    failures = []
    if decision.outcome != expect.outcome:
        failures.append(f"expected {expect.outcome}, got {decision.outcome} ({decision.explanation})")
    if expect.severity and decision.severity != expect.severity:
        failures.append(f"expected severity {expect.severity}, got {decision.severity}")
    if expect.resolves is not None and decision.resolves != expect.resolves:
        failures.append(f"expected resolves={expect.resolves}, got {decision.resolves} ({decision.explanation})")
    card = decision.card or {}
    for text in expect.summary_contains:
        if text not in card.get("summary", ""):
            failures.append(f"summary {card.get('summary')!r} lacks {text!r}")
    for text in expect.detail_contains:
        if text not in card.get("detail", ""):
            failures.append(f"detail lacks {text!r}")
    for text in expect.detail_excludes:
        if text in card.get("detail", ""):
            failures.append(f"detail contains {text!r}")
    escalators = [e["id"] for e in decision.escalators]
    if expect.escalators is not None and escalators != expect.escalators:
        failures.append(f"expected escalators {expect.escalators}, got {escalators}")
    offered = [s["id"] for s in card.get("suggestions", [])]
    if expect.suggestions is not None and offered != expect.suggestions:
        failures.append(f"expected suggestions {expect.suggestions}, got {offered}")
    if card.get("summary", "").endswith("…"):
        failures.append("card summary renders over the limit of 139 characters (it would be cut)")
    failures.extend(_check_card(decision))
    return TestReport(rule.id, case.name, not failures, "; ".join(failures))


def load_rules(paths: Iterable[Path]) -> Catalog:
    """Load, validate and self-test the given rule files; raise RuleLoadError listing every problem."""
    problems: list[str] = []
    rules: list[Rule] = []
    files: dict[str, Path] = {}
    reports: list[TestReport] = []
    for path in sorted(paths):
        try:
            rule = parse_rule_file(path)
        except RuleLoadError as exc:
            problems.extend(exc.problems)
            continue
        if rule.id in files:
            problems.append(f"{path.name}: id {rule.id!r} is already defined in {files[rule.id].name}")
            continue
        for index in range(len(rule.tests)):
            report = run_embedded_test(rule, index)
            reports.append(report)
            if not report.passed:
                problems.append(f"{path.name}: tests[{index}] {report.name!r}: {report.message}")
        files[rule.id] = path
        rules.append(rule)
    if problems:
        raise RuleLoadError(problems)
    return Catalog(rules=rules, files=files, test_reports=reports)


def load_catalog(directory: Path | None = None) -> Catalog:
    """Load every ``*.yaml`` rule file in ``directory`` (default: the packaged catalog)."""
    directory = directory or CATALOG_DIR
    paths = list(directory.glob("*.yaml"))
    if not paths:
        raise RuleLoadError([f"{directory}: no rule files (*.yaml)"])
    return load_rules(paths)
