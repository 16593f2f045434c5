"""Rule files: every catalog file validates and self-tests; a broken file is refused, naming file and field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rules.catalog import RuleLoadError, load_catalog, load_rules, parse_rule_file
from rules.datafiles import CATALOG_DIR, PACKAGE_DIR
from rules.model import rule_json_schema

CATALOG_FILES = sorted(CATALOG_DIR.glob("*.yaml"))
SCHEMA_FILE = PACKAGE_DIR / "rule.schema.json"
HYPOK_FILE = CATALOG_DIR / "hypokalemia-without-magnesium.yaml"


def _load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_there_are_catalog_files():
    assert len(CATALOG_FILES) == 7


@pytest.mark.parametrize("path", CATALOG_FILES, ids=lambda p: p.name)
def test_catalog_file_validates_and_self_tests(path: Path):
    rule = parse_rule_file(path)
    assert path.stem == rule.id
    catalog = load_rules([path])
    assert [r.id for r in catalog.rules] == [rule.id]
    assert all(report.passed for report in catalog.test_reports)
    assert len(catalog.test_reports) == len(rule.tests) > 0


@pytest.mark.parametrize("path", CATALOG_FILES, ids=lambda p: p.name)
def test_catalog_file_validates_against_the_generated_json_schema(path: Path):
    schema = rule_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(_load_yaml(path))


def test_committed_schema_matches_the_model():
    committed = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert committed == rule_json_schema(), "regenerate: ehr-alerts rules schema > rules/rule.schema.json"


@pytest.mark.parametrize("path", CATALOG_FILES, ids=lambda p: p.name)
def test_catalog_file_validates_against_the_committed_schema(path: Path):
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(_load_yaml(path))


def test_json_schema_rejects_an_unknown_top_level_key():
    data = _load_yaml(HYPOK_FILE) | {"colour": "red"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(rule_json_schema()).validate(data)


# --- broken files ------------------------------------------------------------------------------------


def _unknown_parameter(rule: dict[str, Any]) -> None:
    rule["when"]["all"][0]["below"]["threshold"] = "k_lowest"


def _threshold_not_a_potassium_unit(rule: dict[str, Any]) -> None:
    rule["parameters"]["k_low"]["unit"] = "mg"


def _summary_too_long(rule: dict[str, Any]) -> None:
    rule["card"]["summary"] = "Low K {{ potassium.reported }} " + "x" * 140


def _failing_embedded_test(rule: dict[str, Any]) -> None:
    rule["tests"][0]["expect"]["outcome"] = "not-fires"


def _invalid_suggestion_resource(rule: dict[str, Any]) -> None:
    rule["card"]["suggestions"][0]["actions"][0]["resource"]["colour"] = "red"


def _unknown_input(rule: dict[str, Any]) -> None:
    rule["when"]["all"][1]["absent"] = "magnesiun"


def _undefined_template_name(rule: dict[str, Any]) -> None:
    rule["card"]["summary"] = "Low K {{ potasium.reported }}: check Mg"


def _unknown_field(rule: dict[str, Any]) -> None:
    rule["parameters"]["k_low"]["vaule"] = 3.5


def _no_tests(rule: dict[str, Any]) -> None:
    rule["tests"] = []


def _bad_version(rule: dict[str, Any]) -> None:
    rule["version"] = "1.0"


def _bad_shorthand_fact(rule: dict[str, Any]) -> None:
    rule["tests"][0]["facts"] = [
        {"lab": "potassium", "value": 3.2, "unit": "mmol/L", "status": "bogus", "at": "2024-05-01T08:00:00Z"}
    ]


BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    "unknown-parameter": (_unknown_parameter, ["unknown parameter 'k_lowest'"]),
    "threshold-unit": (_threshold_not_a_potassium_unit, ["'mg'", "parameter 'k_low'", "not a potassium unit"]),
    "summary-too-long": (_summary_too_long, ["tests[0]", "summary", "limit"]),
    "failing-test": (_failing_embedded_test, ["tests[0]", "mild hypokalemia", "expected not-fires, got fires"]),
    "invalid-suggestion": (_invalid_suggestion_resource, ["tests[0]", "order-serum-magnesium", "not valid FHIR"]),
    "unknown-input": (_unknown_input, ["unknown input 'magnesiun'"]),
    "undefined-template-name": (_undefined_template_name, ["tests[0]", "potasium"]),
    "unknown-field": (_unknown_field, ["parameters.k_low.vaule"]),
    "no-tests": (_no_tests, ["tests"]),
    "bad-version": (_bad_version, ["version"]),
    "bad-shorthand-fact": (_bad_shorthand_fact, ["tests[0]", "Observation.status"]),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_broken_rule_file_is_refused(name: str, tmp_path: Path):
    breaker, expected = BREAKAGES[name]
    data = copy.deepcopy(_load_yaml(HYPOK_FILE))
    breaker(data)
    path = tmp_path / f"broken-{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RuleLoadError) as refused:
        load_rules([path])
    problems = refused.value.problems
    assert problems
    assert all(p.startswith(f"{path.name}: ") for p in problems), problems
    joined = "\n".join(problems)
    for fragment in expected:
        assert fragment in joined, (fragment, problems)


def test_cross_reference_problem_says_where_in_the_rule(tmp_path: Path):
    """The same ``below`` shape appears in ``when`` and in ``severity``; the problem must say which one.

    Today the model-level validator reports ``(top level): below: unknown parameter ...``, losing the path
    (rules/model.py ``_check_condition`` passes only the operator name as ``where``)."""
    data = _load_yaml(HYPOK_FILE)
    _unknown_parameter(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RuleLoadError) as refused:
        load_rules([path])
    assert any("when" in p and "k_lowest" in p for p in refused.value.problems), refused.value.problems


def test_unchanged_copy_loads(tmp_path: Path):
    path = tmp_path / HYPOK_FILE.name
    path.write_text(yaml.safe_dump(_load_yaml(HYPOK_FILE), sort_keys=False, allow_unicode=True), encoding="utf-8")
    assert [r.id for r in load_rules([path]).rules] == ["hypokalemia-without-magnesium"]


def test_malformed_yaml_is_refused(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: x\n  - : [unclosed\n", encoding="utf-8")
    with pytest.raises(RuleLoadError) as refused:
        load_rules([path])
    assert refused.value.problems[0].startswith("bad.yaml: cannot read YAML")


def test_duplicate_rule_id_is_refused(tmp_path: Path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(HYPOK_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(RuleLoadError) as refused:
        load_catalog(tmp_path)
    assert any("b.yaml" in p and "already defined in a.yaml" in p for p in refused.value.problems)


def test_one_broken_file_refuses_the_whole_catalog(tmp_path: Path):
    for path in CATALOG_FILES:
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    data = _load_yaml(HYPOK_FILE)
    _failing_embedded_test(data)
    (tmp_path / HYPOK_FILE.name).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(RuleLoadError):
        load_catalog(tmp_path)


def test_empty_catalog_directory_is_refused(tmp_path: Path):
    with pytest.raises(RuleLoadError, match="no rule files"):
        load_catalog(tmp_path)
