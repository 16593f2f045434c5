"""Runtime settings: one pydantic-settings model, from ``EHR_ALERTS_*`` environment variables (plus ``REDIS_URL``)
and an optional YAML file named by ``EHR_ALERTS_CONFIG_FILE``. Environment variables win over the file.

Every field is documented in the README's configuration table. Invalid configuration raises
:class:`SettingsError` at start, naming the setting and the problem.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "EHR_ALERTS_"
CONFIG_FILE_ENV = "EHR_ALERTS_CONFIG_FILE"


class SettingsError(ValueError):
    """Configuration that cannot be used; the message names each bad setting."""


class _YamlFileSource(PydanticBaseSettingsSource):
    """Settings from the YAML file named by ``EHR_ALERTS_CONFIG_FILE`` (keys are field names)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_FILE_ENV)
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"{CONFIG_FILE_ENV}={path}: cannot read the configuration file: {exc}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"{CONFIG_FILE_ENV}={path}: the file must hold a mapping of setting names to values")
        unknown = sorted(set(data) - set(Settings.model_fields))
        if unknown:
            raise SettingsError(f"{CONFIG_FILE_ENV}={path}: unknown settings {', '.join(unknown)}")
        return data


class Settings(BaseSettings):
    """Every setting the workers and the service read; documented in the README."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", populate_by_name=True)

    # --- storage and broker ---
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "EHR_ALERTS_REDIS_URL", "redis_url"),
        description="Redis for broker, timeline and alerts; unset: embedded mode (in-process fakeredis, Celery eager)",
    )
    key_prefix: str = Field(default="ehr", pattern=r"^[A-Za-z0-9_\-]{1,32}$", description="prefix of every Redis key")

    # --- stream pipeline ---
    include_preliminary: bool = Field(default=False, description="count preliminary lab results")
    visibility_timeout: float = Field(default=60.0, gt=0, description="seconds before an unacked task is redelivered")
    redelivery_timeout: float = Field(
        default=120.0,
        gt=0,
        le=86_400,
        description="seconds after which a batch accepted but not yet finished is delivered again (inbox "
        "sweep; workers sweep every quarter of it, at most every 10 s); a batch still queued then gets a "
        "second doorbell, a no-op",
    )
    batch_size: int = Field(default=200, ge=1, le=10_000, description="events per Celery task")
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="largest accepted request body")
    retention_lab_hours: float = Field(default=24 * 30, gt=0, description="how long lab facts are kept")
    retention_medication_hours: float = Field(default=24 * 30, gt=0, description="kept this long after a med ends")
    retention_condition_hours: float = Field(default=24 * 365, gt=0, description="kept this long after abatement")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor arguments, then environment, then the YAML file."""
        return init_settings, env_settings, _YamlFileSource(settings_cls)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one message that names each bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env = "REDIS_URL" if name == "redis_url" else ENV_PREFIX + name.upper()
            problems.append(f"{env}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


@cache
def get_settings() -> Settings:
    """Read the configuration once per process."""
    return load_settings()
