"""Redis key layout. A patient's keys share one hash tag ``{p:<id>}`` so a Lua script may touch them all
atomically, also on Redis Cluster."""

from __future__ import annotations

from config.settings import get_settings


def _prefix() -> str:
    return get_settings().key_prefix


def patient_keys(patient: str) -> dict[str, str]:
    """Keys of one patient: facts, meta (version, clock), alerts, open (rule -> alert), applied versions,
    closed (rule -> fingerprint of an alert resolved by hand)."""
    tag = f"{_prefix()}:{{p:{patient}}}"
    return {name: f"{tag}:{name}" for name in ("facts", "meta", "alerts", "open", "applied", "closed")}


def alert_index() -> str:
    """Sorted set of ``patient|alert id`` by last update (epoch seconds), for hospital-wide lists."""
    return f"{_prefix()}:alerts:index"


def alert_patients() -> str:
    """Hash of alert id -> patient id, to find an alert by id alone (a CDS card uuid is an alert id)."""
    return f"{_prefix()}:alerts:patient"


def resource_patients() -> str:
    """Hash of "Type/id" -> patient id of every resource stored, so a delete (which names no patient) can be
    applied to the right timeline."""
    return f"{_prefix()}:resources:patient"


def dead_letters() -> str:
    """List of events that failed after their retries."""
    return f"{_prefix()}:deadletters"


def counters() -> str:
    """Hash of pipeline counters (events stored / duplicate / stale, alerts opened / resolved ...)."""
    return f"{_prefix()}:counters"


def patients() -> str:
    """Set of patient ids seen (for alerts-per-1,000-patients figures)."""
    return f"{_prefix()}:patients"


def inbox_batches() -> str:
    """Hash of accepted batches not yet finished: batch id -> events json (see ``workers.inbox``)."""
    return f"{_prefix()}:{{inbox}}:batches"


def inbox_due() -> str:
    """Sorted set: batch id -> epoch seconds when its delivery is repeated if it is still unfinished."""
    return f"{_prefix()}:{{inbox}}:due"
