"""Structured logs without PHI, for the API and the workers.

- ``json`` format: one JSON object per line (time, level, logger, message, correlation ids, whitelisted
  fields). Extra fields not in :data:`SAFE_FIELDS` are dropped: third-party loggers (Celery puts the task
  arguments in ``extra["data"]``) cannot smuggle event payloads into the output.
- Patient ids appear only as :func:`patient_ref`, a keyed HMAC-SHA256 (``EHR_ALERTS_LOG_HASH_KEY``).
- :class:`RedactionFilter` is defence in depth: bearer tokens, JWT-looking strings and ``access_token``
  values are masked in every message and traceback.
- Third-party loggers (uvicorn, celery, kombu ...) are never more verbose than INFO: their DEBUG output
  includes request bodies and task arguments; HTTP clients (httpx) log full URLs and stay at WARNING.
  uvicorn's access log is switched off: it prints raw paths (``/patients/<id>/alerts``); the API's own
  request log (``service.observability``) prints the route template instead.

The standard library formats JSON well enough; a logging library would add a dependency for ~40 lines.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import threading
from datetime import UTC, datetime
from typing import Any

from config.settings import Settings, get_settings
from workers.observability import context

#: Extra fields allowed into a log line (all hold ids, counts, durations or fixed vocabulary).
SAFE_FIELDS = frozenset(
    {
        "events",
        "count",
        "status",
        "duration_ms",
        "method",
        "route",
        "rule",
        "rule_id",
        "outcome",
        "resource_type",
        "reason",
        "worker",
        "queue",
        "service",
        "patients",
        "retries",
        "scheme",
        "actions",
        "task_name",
        "hostname",
    }
)
_THIRD_PARTY = ("uvicorn", "uvicorn.error", "celery", "kombu", "amqp", "redis", "asyncio", "fastapi", "jwt")
#: Loggers that print full URLs (``/patients/<id>/...``) at INFO: WARNING at least.
_URL_LOGGERS = ("httpx", "httpcore", "urllib3")
_PATTERNS = [
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]+=*"), "Bearer [REDACTED]"),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*"), "[REDACTED-JWT]"),
    (
        re.compile(
            r"(?i)((?:access_token|id_token|refresh_token|authorization|client_secret)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"
        ),
        r"\1[REDACTED]",
    ),
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s]+@"), r"\1[REDACTED]@"),  # redis://:password@host
    # pydantic validation errors quote the offending input (event payloads: patient ids, values)
    (re.compile(r"input_value=.*?(, input_type=)"), r"input_value=[REDACTED]\1"),
]
_HANDLER_NAME = "ehr-alerts"
_key_lock = threading.Lock()
_process_key: bytes | None = None


def redact(text: str) -> str:
    """Mask bearer tokens, JWT-looking strings and token assignments in ``text``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _hash_key(settings: Settings) -> bytes:
    global _process_key
    if settings.log_hash_key is not None:
        return settings.log_hash_key.get_secret_value().encode()
    with _key_lock:
        if _process_key is None:
            _process_key = secrets.token_bytes(32)
            logging.getLogger("ehr_alerts.logging").warning(
                "EHR_ALERTS_LOG_HASH_KEY is not set: patient refs use a random per-process key and do not "
                "correlate across processes or restarts"
            )
        return _process_key


def patient_ref(patient_id: str, settings: Settings | None = None) -> str:
    """Pseudonymous, stable (for one key) reference to a patient for logs: ``pt_`` + 16 hex of HMAC-SHA256."""
    key = _hash_key(settings or get_settings())
    return "pt_" + hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


class RedactionFilter(logging.Filter):
    """Masks tokens in the rendered message and drops fields that could carry payloads."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the message once, redact it, and freeze it (args cleared)."""
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the line
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, correlation ids, whitelisted extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as JSON (redacted)."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        entry.update(context.current())
        for name in SAFE_FIELDS.union(("request_id", "hook_instance", "task_id", "patient_ref")):
            value = record.__dict__.get(name)
            if value is not None and name not in entry:
                entry[name] = value if isinstance(value, int | float | bool) else redact(str(value))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the correlation ids, redacted (``EHR_ALERTS_LOG_FORMAT=text``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as text with correlation ids."""
        line = super().format(record)
        ids = " ".join(f"{k}={v}" for k, v in context.current().items())
        return redact(f"{line} [{ids}]" if ids else line)


def build_handler(settings: Settings | None = None) -> logging.Handler:
    """A stderr handler with the configured format and the redaction filter."""
    settings = settings or get_settings()
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(RedactionFilter())
    return handler


def configure_logging(settings: Settings | None = None) -> None:
    """Route every logger (ours, uvicorn's, celery's) through one redacting handler on the root logger.

    Idempotent: calling it again replaces the handler it installed before.
    """
    settings = settings or get_settings()
    level = logging.getLevelName(settings.log_level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    root.addHandler(build_handler(settings))
    root.setLevel(level)
    floor = max(level, logging.INFO)
    for name in _THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(max(logger.level, floor))
    for name in _URL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.WARNING))
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
    logging.captureWarnings(True)
