"""Redis key layout. A patient's keys share one hash tag ``{p:<id>}`` so a Lua script may touch them all
atomically, also on Redis Cluster."""

from __future__ import annotations

from config.settings import get_settings


def _prefix() -> str:
    return get_settings().key_prefix


_PATIENT_KEYS = ("facts", "meta", "tl", "exp", "alerts", "open", "applied", "closed")


def patient_keys(patient: str) -> dict[str, str]:
    """Keys of one patient: facts (resource -> newest version), meta (version, clock, due), tl (resource ->
    time up to which a window can read it), exp (resource -> retention expiry), alerts, open (rule -> alert),
    applied (versions, releases before the timeline index), closed (rule -> fingerprint of an alert resolved
    by hand)."""
    tag = f"{_prefix()}:{{p:{patient}}}"
    return {name: f"{tag}:{name}" for name in _PATIENT_KEYS}


def alert_history(patient: str, alert_id: str) -> str:
    """List of every history entry of one alert (the alert record keeps only the latest ones)."""
    return f"{_prefix()}:{{p:{patient}}}:history:{alert_id}"


def due_patients() -> str:
    """Sorted set: patient -> epoch when the patient's alerts are due for re-evaluation by time alone."""
    return f"{_prefix()}:{{due}}:patients"


def feed_clock() -> str:
    """Set while ``ehr-alerts replay`` declares the feed's own clock: the workers' due sweep then waits (the
    replay lets time run itself at the end), so a historical extract is not closed by today's wall clock."""
    return f"{_prefix()}:{{due}}:feed"


def alert_index() -> str:
    """Sorted set of ``patient|alert id`` by last update (epoch seconds), for hospital-wide lists."""
    return f"{_prefix()}:alerts:index"


def closed_alerts() -> str:
    """Sorted set of ``patient|alert id`` of closed alerts by the epoch (wall clock) they closed: what the
    closed-alert retention (``retention_closed_alert_days``) removes, oldest first."""
    return f"{_prefix()}:alerts:closed"


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


def patients_seen() -> str:
    """Sorted set: patient id -> wall-clock epoch of the patient's latest resource or delete; what the inactive
    patient retention (``retention_inactive_patient_days``) walks, oldest first."""
    return f"{_prefix()}:patients:seen"


def retention_backfill() -> str:
    """Hash of the scan cursors (``alerts``, ``patients``; ``done`` once finished) with which the due sweep puts
    what a release before the retention indexes stored into ``closed_alerts`` and ``patients_seen``."""
    return f"{_prefix()}:retention:backfill"


def inbox_batches() -> str:
    """Hash of accepted batches not yet finished: batch id -> events json (see ``workers.inbox``)."""
    return f"{_prefix()}:{{inbox}}:batches"


def inbox_due() -> str:
    """Sorted set: batch id -> epoch seconds when its delivery is repeated if it is still unfinished."""
    return f"{_prefix()}:{{inbox}}:due"


def patient_context() -> str:
    """Hash of patient id -> "<timeline version>\\t<json>": who and where each patient is (name, MRN, birth date,
    sex, the encounter in progress: class, ward, bed), for the review worklist (``workers.state.context_index``)."""
    return f"{_prefix()}:context:patients"
