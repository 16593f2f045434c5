"""Runtime settings, from environment variables with the ``EHR_ALERTS_`` prefix (plus ``REDIS_URL``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"setting {name}={raw!r} is not a number") from exc


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"setting {name}={raw!r} is not a boolean (true/false)")


@dataclass(frozen=True)
class Settings:
    """Every setting the workers and the service read; documented in the README."""

    redis_url: str | None = None  # None: embedded mode (in-process fakeredis, Celery eager)
    include_preliminary: bool = False
    visibility_timeout: float = 60.0  # seconds before an unacknowledged task is redelivered
    batch_size: int = 200  # events per Celery task
    max_body_bytes: int = 10 * 1024 * 1024
    retention_lab_hours: float = 24 * 30
    retention_medication_hours: float = 24 * 30  # after a medication's end
    retention_condition_hours: float = 24 * 365  # after a condition's abatement
    key_prefix: str = "ehr"
    extra: dict[str, str] = field(default_factory=dict)


@cache
def get_settings() -> Settings:
    """Read the environment once per process."""
    return Settings(
        redis_url=os.environ.get("REDIS_URL") or None,
        include_preliminary=_bool("EHR_ALERTS_INCLUDE_PRELIMINARY", False),
        visibility_timeout=_float("EHR_ALERTS_VISIBILITY_TIMEOUT", 60.0),
        batch_size=int(_float("EHR_ALERTS_BATCH_SIZE", 200)),
        max_body_bytes=int(_float("EHR_ALERTS_MAX_BODY_BYTES", 10 * 1024 * 1024)),
        retention_lab_hours=_float("EHR_ALERTS_RETENTION_LAB_HOURS", 24 * 30),
        retention_medication_hours=_float("EHR_ALERTS_RETENTION_MEDICATION_HOURS", 24 * 30),
        retention_condition_hours=_float("EHR_ALERTS_RETENTION_CONDITION_HOURS", 24 * 365),
        key_prefix=os.environ.get("EHR_ALERTS_KEY_PREFIX", "ehr"),
    )
