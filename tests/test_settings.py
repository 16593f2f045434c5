"""The settings model: environment, YAML file, and errors that name the setting."""

from __future__ import annotations

import pytest

from config.settings import SettingsError, load_settings


def test_defaults_and_environment(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("EHR_ALERTS_BATCH_SIZE", "50")
    monkeypatch.setenv("EHR_ALERTS_INCLUDE_PRELIMINARY", "true")
    settings = load_settings()
    assert settings.batch_size == 50
    assert settings.include_preliminary is True
    assert settings.redis_url is None
    assert settings.key_prefix == "ehr"


def test_redis_url_from_plain_variable(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/3")
    assert load_settings().redis_url == "redis://example:6379/3"


def test_invalid_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("EHR_ALERTS_BATCH_SIZE", "lots")
    with pytest.raises(SettingsError, match="EHR_ALERTS_BATCH_SIZE"):
        load_settings()


def test_out_of_range_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("EHR_ALERTS_VISIBILITY_TIMEOUT", "-1")
    with pytest.raises(SettingsError, match="EHR_ALERTS_VISIBILITY_TIMEOUT"):
        load_settings()


def test_yaml_file_and_environment_precedence(monkeypatch, tmp_path):
    config = tmp_path / "ehr-alerts.yaml"
    config.write_text("batch_size: 25\nkey_prefix: site1\n", encoding="utf-8")
    monkeypatch.setenv("EHR_ALERTS_CONFIG_FILE", str(config))
    monkeypatch.setenv("EHR_ALERTS_KEY_PREFIX", "site2")
    settings = load_settings()
    assert settings.batch_size == 25
    assert settings.key_prefix == "site2"


def test_yaml_file_with_unknown_setting_is_refused(monkeypatch, tmp_path):
    config = tmp_path / "ehr-alerts.yaml"
    config.write_text("batch_sise: 25\n", encoding="utf-8")
    monkeypatch.setenv("EHR_ALERTS_CONFIG_FILE", str(config))
    with pytest.raises(SettingsError, match="batch_sise"):
        load_settings()


def test_cli_refuses_to_start_with_invalid_configuration_and_names_the_setting():
    import os
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).with_name("ehr-alerts")
    env = {**os.environ, "EHR_ALERTS_BATCH_SIZE": "lots"}
    result = subprocess.run([str(cli), "config"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "EHR_ALERTS_BATCH_SIZE" in result.stderr


def test_readme_documents_every_setting():
    from pathlib import Path

    from config.settings import Settings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    missing = [
        "REDIS_URL" if name == "redis_url" else f"EHR_ALERTS_{name.upper()}"
        for name in Settings.model_fields
        if ("REDIS_URL" if name == "redis_url" else f"`EHR_ALERTS_{name.upper()}`") not in readme
    ]
    assert not missing, f"README configuration table lacks {missing}"
