"""Site profiles (issue 11): a hospital changes rule status, thresholds, windows and applicability without editing the
rules; the file is validated against each rule (unknown keys refused, the error naming the rule, the key and why),
applied when the catalog loads (the pipeline's and the CDS path's ``get_catalog``), shown by ``rules check --site``
and ``config``, recorded in every decision and named in the card source. And the what-if comparison of two
set-ups on the example stream, with its exact added and removed alerts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fhir_builders import (
    HYPOK,
    NOW,
    PATIENT,
    ago,
    encounter,
    facts_of,
    magnesium,
    packaged_catalog,
    patient_resource,
    potassium,
)

from config.settings import SettingsError, get_settings, load_settings
from rules.catalog import Catalog
from rules.engine import evaluate_rule
from rules.site import SiteProfileError, read_site_profile

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("ehr-alerts")
EXAMPLE = ROOT / "examples" / "stream"
SEVERE_MG = "severe-hypomagnesemia-untreated"


def _write(tmp_path: Path, data: Any, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def _apply(tmp_path: Path, data: Any) -> Catalog:
    path = _write(tmp_path, data)
    return packaged_catalog().configure(site=read_site_profile(path), file=path.name)


def _problems(tmp_path: Path, data: Any) -> list[str]:
    with pytest.raises(SiteProfileError) as raised:
        _apply(tmp_path, data)
    return raised.value.problems


K33 = {"name": "k-3.3", "rules": {HYPOK: {"parameters": {"k_low": {"value": 3.3, "source": "P&T 2025-03"}}}}}


def test_a_threshold_change_flips_a_decision_and_every_decision_records_its_parameters(tmp_path: Path):
    k = facts_of(potassium(3.4, at=ago(2)))
    shipped = evaluate_rule(packaged_catalog().get(HYPOK), k, NOW, PATIENT)
    site_rule = _apply(tmp_path, K33).get(HYPOK)
    changed = evaluate_rule(site_rule, k, NOW, PATIENT)
    assert shipped.fires and changed.outcome == "not-fires"
    assert shipped.parameters["k_low"] == "3.5 mmol/L" and shipped.parameters["site_profile"] == "none"
    assert changed.parameters["k_low"] == "3.3 mmol/L" and changed.parameters["site_profile"] == "k-3.3"
    assert changed.parameters["k_lookback"] == "72 h" and "IMP" in changed.parameters["applicability"]
    assert site_rule.parameters["k_low"].source.startswith("site profile k-3.3: P&T 2025-03 (was: StatPearls")
    assert changed.model_dump()["parameters"] == changed.parameters  # serialised with the decision


def test_the_card_source_names_the_site_profile(tmp_path: Path):
    site_rule = _apply(tmp_path, K33).get(HYPOK)
    card = evaluate_rule(site_rule, facts_of(potassium(3.1, at=ago(2))), NOW, PATIENT).card
    assert card["source"]["label"] == "ehr-alerts Mg/K rules (Huang & Kuo, JASN 2007) · site profile k-3.3"
    shipped = evaluate_rule(packaged_catalog().get(HYPOK), facts_of(potassium(3.1, at=ago(2))), NOW, PATIENT).card
    assert "site profile" not in shipped["source"]["label"]


def test_a_site_promotes_a_shadow_rule_and_changes_applicability(tmp_path: Path):
    site = {
        "name": "promote",
        "rules": {
            SEVERE_MG: {"status": "active"},
            HYPOK: {"applicability": {"encounter_classes": ["IMP"], "min_age_years": 16, "source": "adolescent unit"}},
        },
    }
    catalog = _apply(tmp_path, site)
    assert catalog.get(SEVERE_MG).status == "active"
    hypok = catalog.get(HYPOK)
    assert hypok.applicability.encounter_classes == ["IMP"] and hypok.applicability.min_age_years == 16
    emergency = facts_of(
        patient_resource(birth="1950-01-01"), encounter("EMER", start=ago(3)), potassium(3.1, at=ago(2))
    )
    assert evaluate_rule(hypok, emergency, NOW, PATIENT).outcome == "not-fires"
    teen = facts_of(patient_resource(birth=f"{NOW.year - 17}-01-01"), encounter("IMP"), potassium(3.1, at=ago(2)))
    assert evaluate_rule(hypok, teen, NOW, PATIENT).fires
    anywhere = _apply(tmp_path, {"name": "any", "rules": {HYPOK: {"applicability": {"any_encounter_class": True}}}})
    assert anywhere.get(HYPOK).applicability.encounter_classes is None


def test_mg_thresholds_need_their_equivalents_restated(tmp_path: Path):
    ok = {
        "name": "mg",
        "rules": {SEVERE_MG: {"parameters": {"mg_severe": {"value": 0.45, "equivalents": [
            {"value": 1.1, "unit": "mg/dL"}, {"value": 0.9, "unit": "meq/L"}]}}}},
    }  # fmt: skip
    rule = _apply(tmp_path, ok).get(SEVERE_MG)
    assert evaluate_rule(rule, facts_of(magnesium(1.15, "mg/dL", at=ago(2))), NOW, PATIENT).outcome == "not-fires"
    assert evaluate_rule(rule, facts_of(magnesium(1.0, "mg/dL", at=ago(2))), NOW, PATIENT).fires


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ({"name": "x", "rules": {"no-such-rule": {"status": "active"}}}, "rules.no-such-rule: unknown rule (loaded: "),
        (
            {"name": "x", "rules": {HYPOK: {"parameters": {"k_lo": {"value": 3.3}}}}},
            f"rules.{HYPOK}.parameters.k_lo: unknown parameter (declared: ",
        ),
        (
            {"name": "x", "rules": {HYPOK: {"parameters": {"k_low": {"hours": 3}}}}},
            f"rules.{HYPOK}.parameters.k_low: hours does not apply: k_low is a threshold in mmol/L",
        ),
        (
            {"name": "x", "rules": {HYPOK: {"parameters": {"k_lookback": {"value": 48}}}}},
            f"rules.{HYPOK}.parameters.k_lookback: value does not apply: k_lookback is a window in hours",
        ),
        (
            {"name": "x", "rules": {HYPOK: {"parameters": {"k_low": {"value": 13, "unit": "mg/dL"}}}}},
            f"rules.{HYPOK}.parameters.k_low: unit 'mg/dL' is not the rule's unit 'mmol/L'",
        ),
        (
            {"name": "x", "rules": {SEVERE_MG: {"parameters": {"mg_severe": {"value": 0.45}}}}},
            f"rules.{SEVERE_MG}.parameters.mg_severe: value changed but its equivalents (mg/dL, meq/L) were not",
        ),
        (
            {
                "name": "x",
                "rules": {
                    SEVERE_MG: {
                        "parameters": {"mg_severe": {"value": 0.45, "equivalents": [{"value": 1.2, "unit": "mg/dL"}]}}
                    }
                },
            },
            "equivalent 1.2 mg/dL of parameter 'mg_severe' is 0.4936 mmol/L, not 0.45 mmol/L",
        ),
        (
            {"name": "x", "rules": {HYPOK: {"applicability": {"encounter_classes": ["INPT"]}}}},
            f"rules.{HYPOK}.applicability.encounter_classes: ['INPT'] not HL7 v3 ActCode encounter classes (IMP,",
        ),
        (
            {"name": "x", "rules": {HYPOK: {"parameters": {"k_low": {"value": 3.3, "hourz": 2}}}}},
            f"rules.{HYPOK}.parameters.k_low.hourz: unknown key",
        ),
        ({"name": "x", "rules": {HYPOK: {"colour": "red"}}}, f"rules.{HYPOK}.colour: unknown key"),
        ({"name": "x", "sites": {}}, "sites: unknown key"),
        ({"rules": {}}, "name: Field required"),
    ],
)
def test_an_invalid_profile_is_refused_naming_the_rule_the_key_and_why(tmp_path: Path, profile: Any, expected: str):
    problems = _problems(tmp_path, profile)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("site.yaml: ") for p in problems)


def test_every_problem_is_listed_at_once(tmp_path: Path):
    profile = {
        "name": "x",
        "rules": {"ghost": {}, HYPOK: {"parameters": {"k_lo": {"value": 1}, "k_low": {"hours": 1}}}},
    }
    assert len(_problems(tmp_path, profile)) == 3


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path):
    with pytest.raises(SiteProfileError, match="must hold a mapping"):
        read_site_profile(_write(tmp_path, "- just\n- a list\n"))


def test_the_setting_names_a_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("EHR_ALERTS_SITE_PROFILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match=r"EHR_ALERTS_SITE_PROFILE: .*missing\.yaml is not a readable file"):
        load_settings()


def test_the_pipeline_catalog_applies_the_configured_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from workers.pipeline import get_catalog

    monkeypatch.setenv("EHR_ALERTS_SITE_PROFILE", str(_write(tmp_path, K33)))
    monkeypatch.setenv("EHR_ALERTS_DISPLAY_TIMEZONE", "America/New_York")
    get_settings.cache_clear()
    get_catalog.cache_clear()
    try:
        catalog = get_catalog()
        assert catalog.site is not None and catalog.site.name == "k-3.3"
        assert str(catalog.get(HYPOK).parameters["k_low"].value) == "3.3"
        card = evaluate_rule(catalog.get(HYPOK), facts_of(potassium(3.1, at=ago(2))), NOW, PATIENT).card
        assert "on 01 May 2024 06:00 EDT" in card["detail"]
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        get_catalog.cache_clear()


# --- command line ----------------------------------------------------------------------------------------------


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("EHR_ALERTS_")}
    return subprocess.run([str(CLI), *args], env={**clean, "COLUMNS": "200", **env}, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_rules_check_validates_and_shows_the_site_profile(tmp_path: Path):
    good = _run("rules", "check", "--site", str(_write(tmp_path, K33)))
    assert good.returncode == 0, good.stderr
    assert "site profile k-3.3" in good.stdout and "parameters.k_low" in good.stdout and "7 rules OK" in good.stdout
    bad = _run("rules", "check", "--site", str(_write(tmp_path, {"name": "x", "rules": {"ghost": {}}}, "bad.yaml")))
    assert bad.returncode == 2 and "bad.yaml: rules.ghost: unknown rule" in bad.stderr


def test_config_shows_the_site_profile(tmp_path: Path):
    result = _run("config", EHR_ALERTS_SITE_PROFILE=str(_write(tmp_path, K33)))
    assert result.returncode == 0, result.stderr
    assert "EHR_ALERTS_SITE_PROFILE" in result.stdout and "site profile k-3.3" in result.stdout
    assert "value: 3.3, source: P&T 2025-03" in result.stdout


# --- what-if ------------------------------------------------------------------------------------------------------


def test_what_if_on_the_example_stream_lists_the_exact_alerts_added_and_removed(tmp_path: Path):
    """Hypokalemia threshold 3.5 -> 3.3 mmol/L: only ex-charlie's K 3.3 alert goes (ex-echo's 3.3 then 3.2 is the same
    alert, opened later); nothing is added. The reverse comparison adds exactly that alert."""
    site = _write(tmp_path, K33)
    forward = _run("what-if", str(EXAMPLE), "--site", str(site), "--json")
    assert forward.returncode == 0, forward.stderr
    found = json.loads(forward.stdout)
    assert found["patients"] == 12 and found["patient_days"] == 18
    assert [(a["patient"], a["rule"], a["opened"]) for a in found["removed"]] == [
        ("ex-charlie", HYPOK, "2024-03-11T05:50:00Z")
    ]
    assert found["added"] == []
    hypok = next(r for r in found["rules"] if r["rule"] == HYPOK)
    assert (hypok["alerts_base"], hypok["alerts_candidate"], hypok["removed"]) == (7, 6, 1)
    assert (hypok["per_1000_patient_days_base"], hypok["per_1000_patient_days_candidate"]) == (388.9, 333.3)
    assert {r["rule"] for r in found["rules"]} == {r.id for r in packaged_catalog().rules}  # shadow rules included
    backward = json.loads(_run("what-if", str(EXAMPLE), "--base-site", str(site), "--json").stdout)
    assert [(a["patient"], a["rule"]) for a in backward["added"]] == [("ex-charlie", HYPOK)] and not backward["removed"]


def test_what_if_prints_the_table_a_pharmacy_team_reads(tmp_path: Path):
    result = _run("what-if", str(EXAMPLE), "--site", str(_write(tmp_path, K33)))
    assert result.returncode == 0, result.stderr
    assert "12 patients, 18 patient-days" in result.stdout
    assert "alerts removed (base only)" in result.stdout and "ex-charlie" in result.stdout
    assert "alerts added (candidate only): none" in result.stdout
